"""`trainfleet demo` runs a real fleet to the end and leaves no process behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="reads /proc to find leftovers")
def test_demo_trains_every_cpu_job_and_leaves_no_process() -> None:
    pytest.importorskip("sklearn")
    result = subprocess.run([sys.executable, "-m", "trainfleet", "demo"], cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if re.match(r"^(gbt|mlp|transformer)-",
                                                                     line)]
    assert len(table) == 14
    assert sum(" completed " in line for line in table) == 10
    assert all(" pending " in line or " unschedulable " in line  # once a sweep saw them
               for line in table if line.startswith("transformer"))
    assert "requires CUDA" in result.stdout
    state = re.search(r"state in (\S+)", result.stdout)
    assert state is not None
    assert processes_mentioning(state.group(1)) == []
    assert not Path(state.group(1)).exists()  # the temporary state dir was removed

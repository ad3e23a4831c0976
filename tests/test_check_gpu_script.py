"""scripts/check-gpu.sh, the prepared check for a lent GPU host, run here with --cpu so it
cannot rot: a real receiver and worker train the example transformer end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check-gpu.sh"


@pytest.mark.slow
def test_check_gpu_script_trains_the_transformer_end_to_end_on_cpu() -> None:
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu"], capture_output=True, text=True,
                          env={**env, "PYTHON": sys.executable}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '"hostname"' in proc.stdout  # trainfleet capability's JSON
    assert "status:         completed" in proc.stdout
    assert "(sha256 verified)" in proc.stdout
    assert "OK: transformer trained on cpu end to end" in proc.stdout


def test_check_gpu_script_refuses_at_once_where_torch_sees_no_cuda() -> None:
    """Without --cpu on a host without CUDA it fails in seconds, instead of waiting on a job
    no worker here may claim."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the script would train on it")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 1
    assert "FAIL: torch sees no CUDA here" in proc.stdout

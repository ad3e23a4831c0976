"""docs/operator-guide.md is executed: its `sh` blocks run in order, in one bash, against a
live receiver on loopback. A block is skipped only when marked `<!-- illustrative -->`."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.live import serving
from trainfleet.receiver import ReceiverSettings

REPO = Path(__file__).parent.parent
GUIDE = REPO / "docs" / "operator-guide.md"
OPERATOR_TOKEN = "guide-operator-token"
FENCE = re.compile(r"^(<!-- illustrative -->\n)?```(\w*)\n(.*?)^```$", re.M | re.S)
RUN_AS = "daemon" if os.geteuid() == 0 else getpass.getuser()


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    text: str
    illustrative: bool


def blocks(markdown: str) -> list[Block]:
    return [Block(markdown.count("\n", 0, m.start()) + 1, m.group(2), m.group(3),
                  bool(m.group(1))) for m in FENCE.finditer(markdown)]


def test_every_block_is_runnable_shell_or_marked_illustrative() -> None:
    found = blocks(GUIDE.read_text())
    assert len(found) > 15
    assert GUIDE.read_text().count("```") == 2 * len(found), "a fence the parser missed"
    for block in found:
        assert block.language, f"line {block.line}: a fence without a language"
        if block.language == "toml":
            tomllib.loads(block.text)  # configuration shown must at least parse
        elif block.language != "sh":
            assert block.illustrative, f"line {block.line}: {block.language} is not run: mark it"


def substitutions(url: str, state_dir: Path, sandbox: Path) -> dict[str, str]:
    """The guide's example names, mapped onto this machine and the live receiver."""
    return {
        "http://raspberrypi.lab:8470": url,
        "lab-laptop": socket.gethostname(),  # `trainfleet enroll` names this very machine
        "--user lab": f"--user {RUN_AS}",
        "-o trainfleet": f"-o {RUN_AS}",
        "/var/lib/trainfleet": str(state_dir),
        "/var/backups/trainfleet": str(sandbox / "backups"),
    }


def script(sandbox: Path, url: str, state_dir: Path) -> str:
    """One bash script: a prelude (sudo as a pass-through, the operator's environment), then
    every runnable block, each announced so that a failure names its line."""
    mapping = substitutions(url, state_dir, sandbox)
    parts = [
        "set -euo pipefail",
        'sudo() { while [[ "${1:-}" == -* ]]; do [ "$1" = -u ] && shift; shift; done; "$@"; }',
        f"cd {sandbox}",
    ]
    for block in blocks(GUIDE.read_text()):
        if block.language != "sh" or block.illustrative:
            continue
        text = block.text
        for old, new in mapping.items():
            text = text.replace(old, new)
        parts += [f"echo '>>> docs/operator-guide.md line {block.line}'", text]
    return "\n".join(parts) + "\n"


def sandbox_clone(root: Path) -> Path:
    """What the guide runs in: the project's files, its venv, a home of its own."""
    clone = root / "project"
    clone.mkdir()
    for name in ("etc", "examples", "scripts"):
        shutil.copytree(REPO / name, clone / name)
    (clone / ".venv").symlink_to(sys.prefix)
    (root / "home").mkdir()
    return clone


@pytest.mark.slow
def test_the_guide_runs_from_zero_to_a_trained_and_fetched_model(tmp_path: Path) -> None:
    clone = sandbox_clone(tmp_path)
    manifest = clone / "etc" / "training_manifest.toml"
    shutil.copy(clone / "etc" / "training_manifest.toml.example", manifest)
    settings = ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "state",
                                operator_token=OPERATOR_TOKEN, require_worker_token=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINFLEET_", "SUDO_"))}
    with serving(settings) as (host, port):
        url = f"http://{host}:{port}"
        env |= {"PATH": f"{Path(sys.prefix) / 'bin'}:{env['PATH']}",
                "HOME": str(tmp_path / "home"),
                "TRAINFLEET_RECEIVER": url, "TRAINFLEET_OPERATOR_TOKEN": OPERATOR_TOKEN,
                "TRAINFLEET_WORKER_CONFIG": str(tmp_path / "home" / "worker.toml")}
        done = subprocess.run(["bash", "-c", script(clone, url, settings.state_dir)],
                              capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    out = done.stdout
    assert "ok, 14 jobs over 3 models" in out
    assert "would write /etc/systemd/system/trainfleet-receiver.service" in out
    assert "would write /etc/systemd/system/trainfleet-worker.service" in out
    assert "enrolled host" in out and "(sha256 verified)" in out
    assert "revoked host" in out and "requires CUDA" in out
    assert [p for p in (clone / "models").iterdir() if p.is_dir()]
    assert list((clone / "backups").glob("queue-*.db"))

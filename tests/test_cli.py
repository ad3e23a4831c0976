"""The CLI as a user runs it: `python -m trainfleet ...` subprocesses, exit codes, output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import job, manifest_text

EXAMPLE = Path(__file__).parent.parent / "etc" / "training_manifest.toml.example"


def trainfleet(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainfleet", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_manifest_check_summarises_every_job(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(manifest_text([job("a"), job("b", "mlp", require_cuda=True)]))
    result = trainfleet("manifest", "check", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert " a " in lines[0] and "gbt" in lines[0]
    assert "require_cuda" in lines[1]
    assert lines[2].endswith("ok, 2 jobs over 3 models")


def test_manifest_check_reports_the_error_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(manifest_text([job("a", min_ram_gib=-1)]))
    result = trainfleet("manifest", "check", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {path}: jobs[0] \"a\".min_ram_gib: expected")


def test_example_manifest_is_valid() -> None:
    result = trainfleet("manifest", "check", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "14 jobs" in result.stdout


def test_capability_prints_json_and_marks_overrides(tmp_path: Path) -> None:
    override = tmp_path / "cap.json"
    override.write_text(json.dumps({"hostname": "gpu-x", "cuda": True,
                                    "gpus": [{"index": 0, "name": "Fake", "vram_gib": 24}]}))
    result = trainfleet("capability", "--capability-file", str(override))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["hostname"] == "gpu-x" and data["cuda"] is True
    assert data["overridden"] == ["cuda", "gpus", "hostname"]
    assert data["cpu_count"] >= 1 and data["ram_gib"] > 0


def test_usage_error_exits_2() -> None:
    assert trainfleet("no-such-command").returncode == 2


def test_receiver_refuses_an_invalid_manifest(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(manifest_text([job("a", model="nope")]))
    result = trainfleet("receiver", "--manifest", str(path), "--state-dir",
                        str(tmp_path / "state"), "--port", "0")
    assert result.returncode == 1
    assert "jobs[0]" in result.stderr and "not in" in result.stderr


def test_receiver_refuses_public_bind_without_worker_token(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(manifest_text([job("a")]))
    result = trainfleet("receiver", "--manifest", str(path), "--state-dir",
                        str(tmp_path / "state"), "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 1
    assert "refusing to listen beyond loopback" in result.stderr

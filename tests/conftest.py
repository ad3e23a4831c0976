"""Shared fixtures: real queue files in tmp dirs, manifests built from text, capabilities."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trainfleet import manifest
from trainfleet.capability import Capability, Gpu
from trainfleet.queue.base import JobQueue
from trainfleet.queue.sqlite import SqliteQueue

HEADER = """
schema_version = 1
name = "test"
[trainer]
command = ["{python}", "trainer.py", "--out", "{output_dir}"]
modes = ["realistic", "oracle"]
[defaults]
max_attempts = 2
[models.gbt]
hyper = { lr = "float", n = "int" }
[models.mlp]
hyper = { lr = "float" }
[models.transformer]
hyper = { epochs = "int" }
"""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def manifest_text(jobs: list[dict[str, Any]], hosts: str = "", header: str = HEADER) -> str:
    """A manifest with the test models; each job dict becomes one [[jobs]] table."""
    parts = [header, hosts]
    for job in jobs:
        parts.append("[[jobs]]")
        parts.extend(f"{key} = {toml_value(value)}" for key, value in job.items())
    return "\n".join(parts) + "\n"


def make_manifest(jobs: list[dict[str, Any]], hosts: str = "") -> manifest.Manifest:
    return manifest.loads(manifest_text(jobs, hosts), source="test.toml")


def job(name: str, model: str = "gbt", mode: str = "realistic", **fields: Any) -> dict[str, Any]:
    seed = zlib.crc32(name.encode()) % 10**6
    return {"name": name, "model": model, "mode": mode, "seed": seed, **fields}


def cpu(hostname: str = "cpu-a", ram_gib: float = 16.0, cpu_count: int = 4) -> Capability:
    return Capability(hostname=hostname, os="linux", cpu_count=cpu_count, ram_gib=ram_gib,
                      cuda=False)


def gpu(hostname: str = "gpu-a", vram_gib: float = 24.0, ram_gib: float = 64.0) -> Capability:
    return Capability(hostname=hostname, os="linux", cpu_count=16, ram_gib=ram_gib, cuda=True,
                      gpus=(Gpu(0, "Test GPU", vram_gib),))


@pytest.fixture(params=["sqlite"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobQueue]:
    """Every queue backend, on a fresh real database."""
    q = SqliteQueue(tmp_path / "queue.db", stale_after_s=600.0)
    yield q
    q.close()

"""Shared fixtures: real queue files in tmp dirs, manifests built from text, capabilities."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from trainfleet import manifest
from trainfleet.capability import Capability, Gpu
from trainfleet.queue import open_queue
from trainfleet.queue.base import JobQueue

if TYPE_CHECKING:
    from tests.pg import Cluster

QueueFactory = Callable[[], JobQueue]

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


BACKENDS = ["sqlite", "postgres"]



def execute_on(queue_url: str, statements: list[str]) -> None:
    """Run raw SQL against a queue's database, e.g. to take it back to an older schema."""
    if queue_url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(queue_url.removeprefix("sqlite:///")) as db:
            for statement in statements:
                db.execute(statement)
        return
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(queue_url) as conn:
        for statement in statements:
            conn.execute(statement)

@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throwaway PostgreSQL server for the whole session, started on first use."""
    from tests.pg import Cluster

    with Cluster() as cluster:
        yield cluster


@pytest.fixture(params=BACKENDS)
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend, as the URL `open_queue` takes."""
    return _fresh_url(request, tmp_path)


@pytest.fixture
def queue(queue_url: str) -> Iterator[JobQueue]:
    """Every queue backend, on a fresh real database."""
    q = open_queue(queue_url, stale_after_s=600.0)
    yield q
    q.close()


@pytest.fixture(params=BACKENDS)
def fresh_queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueFactory]:
    """Each backend as a factory of fresh, empty queues (for property tests), closed after."""
    opened: list[JobQueue] = []

    def make() -> JobQueue:
        opened.append(open_queue(_fresh_url(request, tmp_path / str(len(opened)))))
        return opened[-1]

    yield make
    for q in opened:
        q.close()


def _fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        cluster: Cluster = request.getfixturevalue("pg_cluster")
        return cluster.fresh_schema()
    tmp_path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{tmp_path / 'queue.db'}"

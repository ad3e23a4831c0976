"""Several receivers serving one fleet: the shared artifact store, client fail-over, and two
real receivers on one PostgreSQL database, one of them killed mid-run."""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import cpu, job, manifest_text
from tests.fleet import Fleet, wait_for
from tests.live import serving
from tests.pg import Cluster
from trainfleet.cli import receiver_urls
from trainfleet.client import Client
from trainfleet.errors import LeaseLost, ReceiverUnreachable
from trainfleet.receiver import ReceiverSettings
from trainfleet.store import SharedStore
from trainfleet.store.local import Upload

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock and POSIX signals")


def gzip_bundle(content: bytes) -> tuple[str, bytes]:
    data = gzip.compress(content, mtime=0)
    return hashlib.sha256(data).hexdigest(), data


def publish(store: SharedStore, data: bytes, model: str = "gbt") -> bool:
    artifact_id = hashlib.sha256(data).hexdigest()
    with store.begin_upload(artifact_id, 1 << 20) as up:
        up.write(data)
        return up.commit(job_id="j", model=model, mode="realistic", host="h")


def index_lines(root: Path) -> list[str]:
    return (root / "index.jsonl").read_text().splitlines()


# -- the shared store --------------------------------------------------------


def test_an_artifact_published_through_one_receiver_is_seen_by_another(tmp_path: Path) -> None:
    one, two = SharedStore(tmp_path / "models"), SharedStore(tmp_path / "models")
    artifact_id, data = gzip_bundle(b"weights")
    assert not two.has(artifact_id)
    assert publish(one, data) is True
    assert two.has(artifact_id)
    assert two.path(artifact_id).read_bytes() == data
    assert two.entry(artifact_id)["host"] == "h"
    assert [row["artifact_id"] for row in two.entries()] == [artifact_id]
    assert publish(two, data) is False  # already stored: never indexed twice
    assert len(index_lines(tmp_path / "models")) == 1


def _publish_many(root: str, seeds: list[int], done: Any) -> None:
    store = SharedStore(Path(root))
    placed = [publish(store, gzip_bundle(b"model %d" % seed)[1]) for seed in seeds]
    done.put(placed.count(True))


@pytest.mark.slow
def test_receivers_publishing_at_once_never_tear_or_double_the_index(tmp_path: Path) -> None:
    root = tmp_path / "models"
    SharedStore(root)
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Queue()
    # Six "receivers"; each artifact is published by two of them at about the same time.
    seeds = [[(i * 40 + k) % 120 for k in range(40)] for i in range(6)]
    procs = [ctx.Process(target=_publish_many, args=(str(root), s, done)) for s in seeds]
    for p in procs:
        p.start()
    placed = sum(done.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    rows = [json.loads(line) for line in index_lines(root)]  # every line whole JSON
    assert placed == 120 and len(rows) == 120
    assert len({row["artifact_id"] for row in rows}) == 120
    store = SharedStore(root)
    for row in rows:
        path = store.path(row["artifact_id"])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["artifact_id"]


HOLD_UPLOAD = """
import sys, time
from pathlib import Path
from trainfleet.store import SharedStore
store = SharedStore(Path(sys.argv[1]))
upload = store.begin_upload("a" * 64, 1 << 20)
upload.write(b"partial")
print(upload._tmp_path, flush=True)
time.sleep(600)
"""


def test_a_starting_receiver_removes_only_dead_receivers_partial_uploads(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    SharedStore(root)
    with subprocess.Popen([sys.executable, "-c", HOLD_UPLOAD, str(root)],
                          stdout=subprocess.PIPE, text=True) as other:
        try:
            assert other.stdout is not None
            partial = Path(other.stdout.readline().strip())
            assert partial.exists()
            assert SharedStore(root).purge_temp() == 0  # its receiver lives: its upload stays
            assert partial.exists()
        finally:
            other.kill()
    assert SharedStore(root).purge_temp() == 1
    assert not partial.parent.exists()


def test_an_upload_streams_into_the_receivers_own_temp_dir(tmp_path: Path) -> None:
    one, two = SharedStore(tmp_path / "models"), SharedStore(tmp_path / "models")
    uploads: list[Upload] = [s.begin_upload("b" * 64, 100) for s in (one, two)]
    assert uploads[0]._tmp_path.parent != uploads[1]._tmp_path.parent
    for up in uploads:
        up.abort()


# -- the client fails over ---------------------------------------------------


def test_a_worker_client_fails_over_to_the_next_receiver(tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(manifest_text([job("a")]))
    dead = f"http://127.0.0.1:{_closed_port()}"
    with serving(ReceiverSettings(manifest_path=manifest, state_dir=tmp_path / "s")) as (h, p):
        live = f"http://{h}:{p}"
        client = Client(dead, fallback_urls=[live], retries=0, backoff_s=0.01)
        claim = client.claim("w", cpu().to_dict())  # no retries, yet the next URL is tried
        assert claim is not None and client.base_url == live
        assert client.heartbeat(claim["job"]["job_id"], claim["lease"]) == "continue"
        with pytest.raises(ReceiverUnreachable):
            Client(dead, fallback_urls=[dead], retries=1, backoff_s=0.01).health()


def test_worker_takes_receivers_from_repeated_flags_or_a_comma_list() -> None:
    assert receiver_urls(["http://a:1", "http://b:2"], {}) == ["http://a:1", "http://b:2"]
    env = {"TRAINFLEET_RECEIVER": "http://a:1, http://b:2"}
    assert receiver_urls(None, env) == ["http://a:1", "http://b:2"]
    assert receiver_urls("http://c:3", env) == ["http://c:3"]  # from the config file


def _closed_port() -> int:
    from tests.pg import free_port

    return free_port()


# -- two receivers, one database, one store ----------------------------------

JOBS = 2000
WORKERS = 8


class LoopWorker:
    """A worker reduced to its calls: claim, upload a tiny bundle, complete; no trainer.

    It alternates between two clients that list the receivers in opposite orders, so one
    job's calls reach both receivers while both are up.
    """

    def __init__(self, name: str, urls: list[str], scratch: Path) -> None:
        self.name = name
        self.clients = [Client(urls[0], fallback_urls=urls[1:], timeout_s=20.0),
                        Client(urls[-1], fallback_urls=urls[-2::-1], timeout_s=20.0)]
        self.scratch = scratch
        self.completed: list[tuple[str, float]] = []  #: (job id, when)
        self.fenced = 0
        self.errors: list[str] = []

    def run(self, finished: threading.Event, deadline: float) -> None:
        capability = cpu(self.name).to_dict()
        calls = 0
        while not finished.is_set() and time.monotonic() < deadline:
            try:
                claim = self.clients[calls % 2].claim(self.name, capability)
                if claim is None:
                    finished.wait(0.1)
                    continue
                calls += 1
                self._deliver(claim, calls)
            except LeaseLost:
                self.fenced += 1  # swept while we were slow, and someone else has it now
            except Exception as exc:  # any error fails the test, reported there
                self.errors.append(repr(exc))
                return

    def _deliver(self, claim: dict[str, Any], calls: int) -> None:
        job_id, lease = claim["job"]["job_id"], claim["lease"]
        artifact_id, data = gzip_bundle(job_id.encode())
        path = self.scratch / f"{self.name}.bundle"
        path.write_bytes(data)
        self.clients[(calls + 1) % 2].upload(artifact_id, path, job_id, lease)
        self.clients[calls % 2].complete(job_id, lease, artifact_id, {"worker": self.name})
        self.completed.append((job_id, time.monotonic()))


@pytest.mark.slow
def test_two_receivers_complete_every_job_once_and_survive_losing_one(
    pg_cluster: Cluster, tmp_path: Path
) -> None:
    url = pg_cluster.fresh_database("scaleout")
    store = tmp_path / "shared-models"
    with Fleet(tmp_path) as fleet:
        manifest = fleet.manifest([job(f"j{i}", seed=i) for i in range(JOBS)])
        options = {"db": url, "store": str(store), "stale_after": 5, "sweep_interval": 0.5}
        a = fleet.receiver(manifest, tmp_path / "state-a", **options)
        b = fleet.receiver(manifest, tmp_path / "state-b", **options)
        scratch = Path(tempfile.mkdtemp(dir=tmp_path))
        workers = [LoopWorker(f"w{i}", [a.url, b.url] if i % 2 == 0 else [b.url, a.url],
                              scratch) for i in range(WORKERS)]
        finished = threading.Event()
        deadline = time.monotonic() + 240
        threads = [threading.Thread(target=w.run, args=(finished, deadline)) for w in workers]
        for t in threads:
            t.start()
        try:
            wait_for("a third of the jobs", lambda: _done(workers) >= JOBS // 3, 120)
            a.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            assert a.proc.wait(10) == -signal.SIGKILL
            wait_for("every job completed", lambda: _completed(b) == JOBS, 180, 0.2)
        finally:
            finished.set()
            for t in threads:
                t.join(60)
        assert [e for w in workers for e in w.errors] == []
        done = [job_id for w in workers for job_id, _ in w.completed]
        assert len(done) == JOBS and len(set(done)) == JOBS
        after = [w for w in workers if any(at > killed_at for _, at in w.completed)]
        assert len(after) == WORKERS  # every worker carried on through the survivor
        _assert_each_job_completed_once(url)
        _assert_store_holds_each_artifact_once(store)
        assert b.proc.poll() is None


def _done(workers: list[LoopWorker]) -> int:
    return sum(len(w.completed) for w in workers)


def _completed(receiver: Any) -> int:
    return int(receiver.client.health()["counts"]["completed"])


def _assert_each_job_completed_once(url: str) -> None:
    with psycopg.connect(url) as conn:
        statuses = dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"))
        per_job = conn.execute(
            "SELECT count(*) FILTER (WHERE kind = 'completed') FROM events GROUP BY job_id"
        ).fetchall()
    assert statuses == {"completed": JOBS}
    assert sorted({n for (n,) in per_job}) == [1] and len(per_job) == JOBS


def _assert_store_holds_each_artifact_once(store: Path) -> None:
    rows = [json.loads(line) for line in index_lines(store)]
    assert len(rows) == JOBS and len({row["artifact_id"] for row in rows}) == JOBS
    for row in rows[:: JOBS // 50]:
        bundle = store / f"{row['model']}_{row['mode']}" / row["artifact_id"] / "bundle.tar.gz"
        assert hashlib.sha256(bundle.read_bytes()).hexdigest() == row["artifact_id"]

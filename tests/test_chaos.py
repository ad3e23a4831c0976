"""Chaos: load, killed and frozen workers, killed receivers, lost responses, races, full disks.

Every scenario records each client call (tests/chaos/history.py) and ends with the checker
(tests/chaos/checker.py) over that history, the final database and the store: no job lost,
none completed twice, no two leases interleaved, no stale call accepted, no budget overrun,
every artifact whole and indexed, no temp file left.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.proxy import DropProxy
from tests.chaos.rig import Rig, jobs
from tests.chaos.swarm import swarm
from tests.chaos.worker import Behaviour, ChaosWorker
from tests.conftest import cpu, make_manifest
from tests.fleet import wait_for
from trainfleet.client import Client
from trainfleet.errors import IllegalTransition, LeaseLost, TrainfleetError
from trainfleet.queue.sqlite import SqliteQueue

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, /proc, tmpfs")

FAST_SWEEP = {"stale_after_s": 1.5, "sweep_interval_s": 0.2}
QUICK = ("--heartbeat-s", "0.3")


@pytest.fixture
def rig_root(tmp_path: Path) -> Path:
    return tmp_path / "rig"


def outcomes(rig: Rig, job_id: str) -> list[str | None]:
    return [r["outcome"] for r in rig.rows(
        "SELECT outcome FROM attempts WHERE job_id = ? ORDER BY attempt", job_id)]


def event_kinds(rig: Rig, job_id: str) -> list[str]:
    return [r["kind"] for r in rig.rows(
        "SELECT kind FROM events WHERE job_id = ? ORDER BY id", job_id)]


def in_process_worker(rig: Rig, name: str, url: str | None = None, **behaviour: Any
                      ) -> ChaosWorker:
    client = Client(url or rig.receiver.url, retries=3, backoff_s=0.1, max_backoff_s=0.5,
                    timeout_s=10.0)
    return ChaosWorker(client, rig.history, name, rig.root / "workers" / name,
                       Behaviour(**behaviour))


def run_threads(*workers: ChaosWorker, timeout_s: float = 60.0) -> None:
    threads = [threading.Thread(target=w.run, name=w.name) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "a worker thread did not finish"


# -- load --------------------------------------------------------------------

LOAD_JOBS = int(os.environ.get("TRAINFLEET_CHAOS_JOBS", "10000"))
LOAD_WORKERS = int(os.environ.get("TRAINFLEET_CHAOS_WORKERS", "64"))


@pytest.fixture
def fast_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs, where fsync is free (unless TRAINFLEET_CHAOS_ON_DISK=1).

    On this project's 2-core machines an fsync costs ~2 ms, which caps the receiver near
    150 jobs/s; the load test is about concurrency, so it runs off the disk. The faults
    below run on the real disk.
    """
    if os.environ.get("TRAINFLEET_CHAOS_ON_DISK") or not Path("/dev/shm").is_dir():
        yield tmp_path
        return
    root = Path(tempfile.mkdtemp(prefix="trainfleet-load-", dir="/dev/shm"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_load_every_job_completes_exactly_once_without_5xx(fast_disk: Path) -> None:
    # Every worker may upload at once: the upload cap's 503 is backpressure, not what this
    # test looks for.
    with Rig(fast_disk / "rig", jobs(LOAD_JOBS),
             max_concurrent_uploads=LOAD_WORKERS) as rig:
        rig.start()
        started = time.monotonic()
        stats = asyncio.run(swarm("127.0.0.1", rig.receiver.port, rig.history, LOAD_WORKERS,
                                  unique_every=10, idle_exit_s=1.0))
        elapsed = time.monotonic() - started
        report = rig.check()
        print(f"load: {LOAD_JOBS} jobs, {LOAD_WORKERS} workers, {elapsed:.1f} s, "
              f"{LOAD_JOBS / elapsed:.0f} jobs/s, answers {dict(stats.statuses)}\n"
              f"{report.summary()}")
        report.assert_ok()
        assert stats.server_errors == [] and stats.locked == [] and stats.unreachable == 0
        assert rig.statuses() == {"completed": LOAD_JOBS}
        assert stats.completed == LOAD_JOBS
        assert "database is locked" not in rig.receiver.logs()
        assert "Traceback" not in rig.receiver.logs()


# -- workers killed or frozen ------------------------------------------------


def test_worker_killed_mid_training_loses_nothing(rig_root: Path) -> None:
    with Rig(rig_root, jobs(12), **FAST_SWEEP) as rig:
        rig.start()
        victim = rig.worker("victim", "--train-s", "60", *QUICK)
        job_id = rig.held_by("victim")
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        for i in range(3):
            rig.worker(f"w{i}", "--train-s", "0.1", "--idle-exit-s", "3", *QUICK)
        rig.wait_workers(60)
        report = rig.check()
        report.assert_ok()
        assert rig.statuses() == {"completed": 12}
        assert outcomes(rig, job_id) == ["lost_worker", "completed"]


def test_frozen_worker_past_the_stale_window_is_fenced_once_another_holds_the_job(
    rig_root: Path
) -> None:
    with Rig(rig_root, jobs(1), **FAST_SWEEP) as rig:
        rig.start()
        zombie = rig.worker("zombie", "--train-s", "4", "--max-jobs", "1", *QUICK)
        job_id = rig.held_by("zombie")
        zombie.send_signal(signal.SIGSTOP)
        rig.wait_status(job_id, "pending")
        rig.worker("rival", "--train-s", "3", "--max-jobs", "1", *QUICK)
        rig.held_by("rival")
        zombie.send_signal(signal.SIGCONT)
        rig.wait_workers(30)
        report = rig.check()
        report.assert_ok()
        done = rig.wait_status(job_id, "completed")
        assert done["worker_id"] == "rival" and outcomes(rig, job_id) == [
            "lost_worker", "completed"]
        refused = [op for op in rig.ops() if op.process == "zombie" and op.outcome == "fail"]
        assert refused and all(str(op.value).startswith("409") for op in refused)
        assert not any(op.f in ("upload", "complete") and op.ok for op in rig.ops()
                       if op.process == "zombie")
        stored = {p.parent.name for p in rig.receiver.store_root.glob("*/*/bundle.tar.*")}
        assert stored == {done["artifact_id"]}  # the zombie's bundle stayed out


def test_frozen_worker_gets_its_job_back_when_nobody_took_it(rig_root: Path) -> None:
    with Rig(rig_root, jobs(1), **FAST_SWEEP) as rig:
        rig.start()
        zombie = rig.worker("zombie", "--train-s", "5", "--max-jobs", "1", *QUICK)
        job_id = rig.held_by("zombie")
        zombie.send_signal(signal.SIGSTOP)
        rig.wait_status(job_id, "pending")
        zombie.send_signal(signal.SIGCONT)
        rig.wait_workers(30)
        report = rig.check()
        report.assert_ok()
        done = rig.wait_status(job_id, "completed")
        assert done["worker_id"] == "zombie" and done["attempts"] == 2
        assert outcomes(rig, job_id) == ["lost_worker", "completed"]
        assert "reclaimed" in event_kinds(rig, job_id)
        leases = {r["lease"] for r in rig.rows("SELECT lease FROM attempts")}
        assert len(leases) == 1  # the same lease, revived


# -- the receiver killed -----------------------------------------------------


@pytest.mark.slow
def test_receiver_killed_during_a_claim_burst_loses_nothing_acknowledged(rig_root: Path) -> None:
    with Rig(rig_root, jobs(240), stale_after_s=2.0, sweep_interval_s=0.2) as rig:
        rig.start()
        for i in range(6):
            rig.worker(f"w{i}", "--idle-exit-s", "6", *QUICK)
        for threshold in (40, 120):
            wait_for(f"{threshold} completions", lambda t=threshold:
                     rig.statuses().get("completed", 0) >= t, timeout_s=40)
            rig.receiver.kill()
            rig.receiver.restart()
        rig.wait_workers(60)
        report = rig.check()
        report.assert_ok()
        assert rig.statuses() == {"completed": 240}
        unknown = [op for op in rig.ops() if op.outcome == "unknown"]
        assert unknown  # the kills did cut calls in flight
        print(f"claim burst: 240 jobs, 6 workers, 2 kills, {len(unknown)} calls cut, "
              f"{report.figures}")


def test_receiver_killed_mid_upload_leaves_no_partial_artifact(rig_root: Path) -> None:
    with Rig(rig_root, jobs(2), max_upload_bytes=1 << 30) as rig:
        rig.start()
        tmp_dir = rig.receiver.store_root / ".tmp"
        rig.worker("w", "--artifact-kib", str(48 << 10), "--idle-exit-s", "2", *QUICK)
        partial = wait_for("an upload in progress", lambda: [
            p for p in tmp_dir.glob("*.part") if p.stat().st_size > (1 << 20)],
            timeout_s=40, interval_s=0.002)
        rig.receiver.kill()
        assert partial[0].exists()  # what the crash left
        rig.receiver.restart()
        assert not partial[0].exists()  # purged at start (the worker's retry may be streaming)
        rig.wait_workers(90)
        report = rig.check()
        report.assert_ok()
        assert rig.statuses() == {"completed": 2}
        assert report.figures["artifacts"] == 2


def test_receiver_killed_between_upload_and_complete_keeps_the_artifact(
    rig_root: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    with Rig(rig_root, jobs(2)) as rig:
        rig.start()
        rig.worker("w", "--gate", str(gate), "--idle-exit-s", "2", *QUICK)
        ready = wait_for("an uploaded, not yet completed job", lambda: list(gate.glob("ready-*")))
        job_id = ready[0].name.removeprefix("ready-")
        rig.receiver.kill()
        rig.receiver.restart()
        (gate / "go").write_text("go")
        rig.wait_workers(60)
        report = rig.check()
        report.assert_ok()
        assert rig.statuses() == {"completed": 2}
        assert outcomes(rig, job_id) == ["completed"]  # the same attempt, across the restart


@pytest.mark.slow
def test_receiver_killed_during_reloads_keeps_every_job(rig_root: Path) -> None:
    count = 1500
    with Rig(rig_root, jobs(count), stale_after_s=2.0, sweep_interval_s=0.2) as rig:
        rig.start()
        stop = threading.Event()
        in_flight = threading.Event()
        reloads: Counter[str] = Counter()

        def reload_forever() -> None:
            flip = 0
            while not stop.is_set():
                flip ^= 1  # each reload changes every pending job's priority
                rig.write_manifest(jobs(count, priority=flip))
                in_flight.set()
                started = time.monotonic()
                try:
                    rig.receiver.client().reload_manifest()
                    reloads["ok"] += 1
                    reloads["ok_ms"] += round((time.monotonic() - started) * 1000)
                except TrainfleetError:  # the receiver is being killed
                    reloads["cut"] += 1
                    time.sleep(0.05)

        def run_swarm() -> None:
            asyncio.run(swarm("127.0.0.1", rig.receiver.port, rig.history, 8,
                              unique_every=25, idle_exit_s=6.0))

        threads = [threading.Thread(target=reload_forever), threading.Thread(target=run_swarm)]
        for t in threads:
            t.start()
        try:
            for _ in range(3):
                time.sleep(random.uniform(0.3, 0.8))
                in_flight.clear()
                in_flight.wait(10)
                time.sleep(random.uniform(0.0, 0.05))
                rig.receiver.kill()
                rig.receiver.restart()
        finally:
            stop.set()
            threads[0].join(30)
        threads[1].join(120)
        assert not threads[1].is_alive()
        report = rig.check()
        print(f"reload kills: {count} jobs, 8 workers, 3 kills, reloads {dict(reloads)} "
              f"(~{reloads['ok_ms'] // max(reloads['ok'], 1)} ms each), "
              f"{report.figures}")
        report.assert_ok()
        assert rig.statuses() == {"completed": count}
        assert reloads["cut"] >= 1 and reloads["ok"] >= 1


# -- lost responses ------------------------------------------------------------

DROPS = {
    "claim": r"^POST /v1/job/claim ",
    "upload": r"^PUT /v1/model/",
    "complete": r"^POST /v1/job/\w+/complete ",
}


@pytest.mark.parametrize("call", list(DROPS))
def test_a_lost_response_is_retried_safely(rig_root: Path, call: str) -> None:
    with Rig(rig_root, jobs(3), **FAST_SWEEP) as rig:
        rig.start()
        with DropProxy("127.0.0.1", rig.receiver.port) as proxy:
            proxy.drop(DROPS[call])
            worker = in_process_worker(rig, "w", proxy.url, idle_exit_s=3.0, heartbeat_s=0.3)
            run_threads(worker)
            assert len(proxy.dropped) == 1, proxy.dropped
        report = rig.check()
        report.assert_ok()
        assert rig.statuses() == {"completed": 3}
        ops = rig.ops()
        assert all(op.ok for op in ops), [op for op in ops if not op.ok]
        attempts = Counter(tuple(outcomes(rig, job_id)) for job_id in rig.job_ids)
        if call == "claim":  # the lost claim's job sat claimed until the sweep
            assert attempts == {("completed",): 2, ("lost_worker", "completed"): 1}
        else:
            assert attempts == {("completed",): 3}
        if call == "upload":  # the retry found the bytes already stored
            assert [op.value for op in ops if op.f == "upload"].count(False) == 1


# -- races -------------------------------------------------------------------

T0 = 1_000_000.0


def test_cancel_racing_complete_ends_in_exactly_one_terminal_state_1000_times(
    tmp_path: Path
) -> None:
    """Two connections (as two receivers would be), released together by a barrier."""
    rounds = 1000
    db = tmp_path / "queue.db"
    worker_side, operator_side = SqliteQueue(db), SqliteQueue(db)
    try:
        manifest = make_manifest([{"name": f"r{i}", "model": "gbt", "mode": "realistic",
                                   "seed": i} for i in range(rounds)])
        worker_side.sync_manifest(manifest, now=T0)
        claims = [worker_side.claim_next("w", cpu(), now=T0 + 1) for _ in range(rounds)]
        assert all(claims)
        barrier = threading.Barrier(2)
        won: dict[str, list[str]] = {"complete": [], "cancel": []}

        def complete_all() -> None:
            for claim in claims:
                assert claim is not None
                barrier.wait()
                try:
                    worker_side.complete(claim.job.job_id, claim.lease, "f" * 64, now=T0 + 2)
                    won["complete"].append(claim.job.job_id)
                except LeaseLost:
                    pass

        def cancel_all() -> None:
            for claim in claims:
                assert claim is not None
                barrier.wait()
                try:
                    operator_side.cancel(claim.job.job_id, now=T0 + 2)
                    won["cancel"].append(claim.job.job_id)
                except IllegalTransition:
                    pass

        threads = [threading.Thread(target=complete_all), threading.Thread(target=cancel_all)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        completed, cancelled = set(won["complete"]), set(won["cancel"])
        print(f"cancel vs complete: {rounds} rounds, complete won {len(completed)}, "
              f"cancel won {len(cancelled)}")
        assert completed.isdisjoint(cancelled)
        assert len(completed) + len(cancelled) == rounds
        for job in worker_side.list_jobs():
            kinds = Counter(e.kind for e in worker_side.history(job.job_id))
            if job.job_id in completed:
                assert job.status == "completed" and job.artifact_id == "f" * 64
                assert kinds["completed"] == 1 and kinds["cancelled"] == 0
            else:
                assert job.status == "cancelled" and job.artifact_id is None
                assert kinds["cancelled"] == 1 and kinds["completed"] == 0
    finally:
        worker_side.close()
        operator_side.close()


# -- a full disk ---------------------------------------------------------------


def random_bundle(size: int, seed: str) -> tuple[str, bytes]:
    """Gzip magic then incompressible bytes: the store accepts it, no disk can shrink it."""
    data = b"\x1f\x8b" + random.Random(seed).randbytes(size)
    return hashlib.sha256(data).hexdigest(), data


def put(rig: Rig, artifact_id: str, data: bytes, job_id: str, lease: str
        ) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One streamed PUT of a bundle (a refusal may come before all of it is sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", rig.receiver.port, timeout=30)
    try:
        query = urllib.parse.urlencode({"job_id": job_id, "lease": lease})
        conn.putrequest("PUT", f"/v1/model/{artifact_id}?{query}")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders()
        try:
            for start in range(0, len(data), 1 << 16):
                conn.send(data[start:start + (1 << 16)])
        except OSError:
            pass  # refused early: the answer is waiting
        response = conn.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        conn.close()


@pytest.fixture
def small_tmpfs(rig_root: Path) -> Iterator[Path]:
    """The store's directory on a 2 MiB tmpfs (root only: skipped where mount is refused)."""
    models = rig_root / "state" / "models"
    models.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(models)],
                             capture_output=True) if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs (needs root)")
    try:
        yield models
    finally:
        subprocess.run(["umount", "-l", str(models)], check=False)


@pytest.mark.parametrize("limit", ["enospc-tmpfs", "efbig-rlimit"])
def test_a_full_store_answers_507_and_the_job_stays_retryable(
    rig_root: Path, limit: str, request: pytest.FixtureRequest
) -> None:
    if limit == "enospc-tmpfs":
        request.getfixturevalue("small_tmpfs")
        size, fsize = 3 << 20, None
    else:
        size, fsize = 12 << 20, 8 << 20
    with Rig(rig_root, jobs(1), fsize_bytes=fsize) as rig:
        rig.start()
        client = rig.receiver.client()
        claim = client.claim("w", {"hostname": "h", "cpu_count": 1, "ram_gib": 1})
        assert claim is not None
        job_id, lease = claim["job"]["job_id"], claim["lease"]
        big_id, big = random_bundle(size, "big")

        status, body, _ = put(rig, big_id, big, job_id, lease)
        assert status == 507, body
        assert set(body) == {"error", "detail"} and "storage" in body["error"].lower(), body
        assert list((rig.receiver.store_root / ".tmp").iterdir()) == []
        assert client.heartbeat(job_id, lease) == "continue"  # the database still takes writes
        assert rig.wait_status(job_id, "running")["lease"] == lease

        small_id, small = random_bundle(4096, "small")
        status, body, _ = put(rig, small_id, small, job_id, lease)
        assert status == 201, body
        assert client.complete(job_id, lease, small_id, {})["status"] == "completed"
        report = rig.check()
        report.assert_ok()
        assert "Traceback" not in rig.receiver.logs()


# -- budgets -----------------------------------------------------------------


@pytest.mark.parametrize(("mode", "kind"), [("fail-trainer", "trainer_error"),
                                            ("fail-timeout", "timeout")])
def test_a_trainer_that_always_fails_fails_the_job_after_exactly_max_attempts(
    rig_root: Path, mode: str, kind: str
) -> None:
    with Rig(rig_root, jobs(1, max_attempts=3)) as rig:
        rig.start()
        run_threads(in_process_worker(rig, "w", mode=mode, idle_exit_s=0.5, heartbeat_s=0.3))
        report = rig.check()
        report.assert_ok()
        [job] = rig.rows("SELECT * FROM jobs")
        assert job["status"] == "failed"
        assert (job["attempts"], job["attempts_charged"], job["lost_count"]) == (3, 3, 0)
        assert outcomes(rig, job["job_id"]) == [kind] * 3
        assert [op.f for op in rig.ops() if op.ok and op.f == "fail"] == ["fail"] * 3


def test_a_worker_that_always_dies_fails_the_job_after_exactly_max_lost(rig_root: Path) -> None:
    with Rig(rig_root, jobs(1, max_lost=3, max_attempts=2), stale_after_s=1.0,
             sweep_interval_s=0.1) as rig:
        rig.start()
        [job_id] = rig.job_ids
        deaths = 0
        while rig.rows("SELECT status FROM jobs")[0]["status"] != "failed":
            assert deaths < 3, "the job outlived its lost-worker budget"
            proc = rig.worker(f"dies-{deaths}", "--mode", "die-after-claim")
            assert proc.wait(30) == -signal.SIGKILL
            deaths += 1
            rig.wait_status(job_id, "pending", "failed")
        assert deaths == 3
        report = rig.check()
        report.assert_ok()
        [job] = rig.rows("SELECT * FROM jobs")
        assert (job["attempts"], job["attempts_charged"], job["lost_count"]) == (3, 0, 3)
        assert outcomes(rig, job_id) == ["lost_worker"] * 3
        assert job["error"] == "lost worker dies-2"

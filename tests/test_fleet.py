"""End to end: a real receiver and real workers as subprocesses, training with a tiny trainer.

Each test asserts on exit codes, job states over the HTTP API and files on disk.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import signal
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import job
from tests.fleet import Fleet, Receiver, Worker, pid_alive, wait_for
from trainfleet import bundle, manifest
from trainfleet.capability import Capability
from trainfleet.client import Client
from trainfleet.errors import LeaseLost
from trainfleet.matching import Slot, hard_reasons, merge_policy

GPU_A = {"hostname": "gpu-a", "cuda": True, "cpu_count": 8, "ram_gib": 64,
         "gpus": [{"index": 0, "name": "Fake", "vram_gib": 24}]}
CPU_A = {"hostname": "cpu-a", "cuda": False, "gpus": [], "ram_gib": 8, "cpu_count": 4}
CPU_B = {**CPU_A, "hostname": "cpu-b"}
SIGTERM_EXIT = (0, -signal.SIGTERM)  # uvicorn re-raises the signal it shut down for

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and /proc")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path) as f:
        yield f


def sha256_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def stored_bundle(receiver: Receiver, job_resource: dict[str, Any]) -> Path:
    """The one bundle file of a completed job's artifact, checked against its sha256."""
    artifact_id = job_resource["artifact_id"]
    folder = receiver.models_dir / f"{job_resource['model']}_{job_resource['mode']}" / artifact_id
    files = sorted(folder.glob("bundle.tar.*"))
    assert len(files) == 1, f"{folder}: {files}"
    assert sha256_of(files[0]) == artifact_id
    return files[0]


def history_kinds(job_resource: dict[str, Any]) -> list[str]:
    return [event["kind"] for event in job_resource["history"]]


def stop_receiver(receiver: Receiver) -> None:
    """SIGTERM: the receiver shuts down cleanly (its lifespan ends), then exits."""
    assert receiver.stop() in SIGTERM_EXIT
    assert "Application shutdown complete" in receiver.log_path.read_text()


# -- 1. the whole fleet ------------------------------------------------------

FLEET_HOSTS = """
[hosts.gpu-a]
deny_jobs = ["mlp"]
[hosts.cpu-a]
allow_jobs = ["gbt", "mlp"]
"""
QUICK = {"sleep_s": 0.3}
FLEET_JOBS = [
    job("anywhere", hyper=QUICK),
    job("only-cpu-a", hyper=QUICK, allowed_hosts=["cpu-a"]),
    job("big-ram", hyper=QUICK, min_ram_gib=32),
    job("mlp", model="mlp", hyper=QUICK),
    job("tf-by-policy", model="transformer", hyper=QUICK),
    job("tf-cuda", model="transformer", hyper=QUICK, require_cuda=True, min_vram_gib=16),
    job("dup-1", mode="oracle", hyper={"output": "same bytes"}),
    job("dup-2", mode="oracle", hyper={"output": "same bytes"}),
    job("tf-huge", model="transformer", require_cuda=True, min_vram_gib=48),
    job("mlp-big", model="mlp", min_ram_gib=32),
]
PLACED = {"only-cpu-a": "cpu-a", "big-ram": "gpu-a", "mlp": "cpu-a", "tf-by-policy": "gpu-a",
          "tf-cuda": "gpu-a"}
# Why the jobs no worker may take stay pending: a fragment of each reason, per host.
NEVER = {
    "tf-huge": {"gpu-a": ["needs 48 GiB VRAM"],
                "cpu-a": ["host policy: cpu-a only allows gbt, mlp", "requires CUDA",
                          "needs 48 GiB VRAM"]},
    "mlp-big": {"gpu-a": ["host policy: gpu-a denies 'mlp'"],
                "cpu-a": ["needs 32 GiB RAM; cpu-a has 8"]},
}


def worker_slots(receiver: Receiver, manifest_path: Path) -> dict[str, Slot]:
    """Each worker's slot as the receiver sees it, with the manifest's host policy."""
    hosts = manifest.load(manifest_path).hosts
    slots = {}
    for w in receiver.client.workers():
        policy = merge_policy(hosts.get(w["hostname"]), w["allow_jobs"], w["deny_jobs"])
        slots[w["hostname"]] = Slot(Capability.from_dict(w["capability"]), w["slot_vram_gib"],
                                    policy)
    return slots


@pytest.mark.slow
def test_fleet_trains_every_job_it_can_once_honouring_every_constraint(fleet: Fleet) -> None:
    manifest_path = fleet.manifest(FLEET_JOBS, FLEET_HOSTS)
    receiver = fleet.receiver(manifest_path)
    workers = [fleet.worker(receiver.url, "gpu-a", GPU_A),
               fleet.worker(receiver.url, "cpu-a", CPU_A)]

    def settled() -> dict[str, int] | None:
        counts = receiver.client.health()["counts"]
        live = counts["claimed"] + counts["running"]
        # the jobs no worker can run wait: pending, or unschedulable once a sweep saw it
        counts["waiting"] = counts.pop("pending") + counts.pop("unschedulable")
        return counts if live == 0 and counts["waiting"] <= len(NEVER) else None

    counts = wait_for("every placeable job to end", settled, timeout_s=60)
    assert counts == {"waiting": 2, "claimed": 0, "running": 0, "completed": 8, "failed": 0,
                      "cancelled": 0}
    # Both workers have asked for work since, and still the two jobs wait.
    settled_at = time.time()
    wait_for("both workers to poll again", lambda: all(
        w["last_seen"] > settled_at for w in receiver.client.workers()))
    jobs = receiver.jobs_by_name()
    assert {name for name, j in jobs.items()
            if j["status"] in ("pending", "unschedulable")} == set(NEVER)

    slots = worker_slots(receiver, manifest_path)
    assert set(slots) == {"gpu-a", "cpu-a"}
    for name, by_host in NEVER.items():
        for host, fragments in by_host.items():
            reasons = hard_reasons(SimpleNamespace(**jobs[name]), slots[host])
            assert len(reasons) == len(fragments), (name, host, reasons)
            assert all(f in r for f, r in zip(fragments, reasons, strict=True)), reasons

    completed = {name: j for name, j in jobs.items() if j["status"] == "completed"}
    for name, j in completed.items():
        assert hard_reasons(SimpleNamespace(**j), slots[j["hostname"]]) == [], name
        assert j["attempts"] == 1 and j["metrics"]["score"] >= 0, name
        assert j["progress"]["fraction"] == 1.0
        stored_bundle(receiver, j)
    assert {name: completed[name]["hostname"] for name in PLACED} == PLACED

    # Bit-identical training runs share one artifact; every artifact has one index row.
    assert completed["dup-1"]["artifact_id"] == completed["dup-2"]["artifact_id"]
    artifact_ids = {j["artifact_id"] for j in completed.values()}
    assert len(artifact_ids) == len(completed) - 1
    rows = receiver.index_rows()
    assert sorted(row["artifact_id"] for row in rows) == sorted(artifact_ids)
    stored = {p.parent.name for p in receiver.models_dir.glob("*/*/bundle.tar.*")}
    assert stored == artifact_ids

    for worker in workers:
        assert worker.stop() == 0
    stop_receiver(receiver)


# -- 2. a failing trainer ----------------------------------------------------


def test_failing_trainer_fails_the_job_after_max_attempts_with_its_stderr(fleet: Fleet) -> None:
    line = "trainer-boom: the loss went to NaN at step 7 (xq17)"
    receiver = fleet.receiver(fleet.manifest(
        [job("flaky", hyper={"fail": line}, max_attempts=2)]))
    job_id = receiver.jobs_by_name()["flaky"]["job_id"]
    worker = fleet.worker(receiver.url, "cpu-a", CPU_A, "--max-jobs", "2")

    assert worker.wait_exit(timeout_s=30) == 0  # ran its two jobs: both attempts of "flaky"
    failed = receiver.job(job_id)
    assert failed["status"] == "failed"
    assert failed["attempts"] == 2 and failed["artifact_id"] is None
    assert line in failed["error"] and "exited 3" in failed["error"]
    assert [a["outcome"] for a in failed["attempts_detail"]] == ["trainer_error"] * 2
    assert all(line in a["error"] for a in failed["attempts_detail"])
    assert line in receiver.client.get_log(job_id, attempt=2)
    stop_receiver(receiver)


# -- 3. cancel ---------------------------------------------------------------


def test_cancel_stops_a_running_trainer_and_the_worker_goes_on(fleet: Fleet) -> None:
    receiver = fleet.receiver(fleet.manifest([
        job("long", hyper={"gate": "never"}, priority=1),
        job("next", hyper=QUICK),
    ]))
    ids = {name: j["job_id"] for name, j in receiver.jobs_by_name().items()}
    worker = fleet.worker(receiver.url, "cpu-a", CPU_A)
    pid = fleet.trainer_pid(ids["long"])
    receiver.wait_status(ids["long"], "running")

    assert receiver.client.cancel(ids["long"])["status"] == "cancelled"
    cancelled_at = time.monotonic()
    wait_for("the trainer to be stopped", lambda: not pid_alive(pid), timeout_s=10)
    # Heartbeats come every 0.5 s; a couple of them, and scheduling slack on a busy machine.
    assert time.monotonic() - cancelled_at < 3.0
    assert not fleet.trainer_finished(ids["long"])

    receiver.wait_status(ids["next"], "completed")
    long = receiver.job(ids["long"])
    assert long["status"] == "cancelled" and long["artifact_id"] is None
    assert long["attempts"] == 1
    assert [a["outcome"] for a in long["attempts_detail"]] == ["cancelled"]
    assert worker.stop() == 0
    stop_receiver(receiver)


# -- 4. a worker that dies ---------------------------------------------------


@pytest.mark.slow
def test_job_of_a_killed_worker_is_swept_and_completed_by_another(fleet: Fleet) -> None:
    receiver = fleet.receiver(fleet.manifest([job("orphan", hyper={"gate": "g"})]),
                              stale_after=2, sweep_interval=0.5)
    job_id = receiver.jobs_by_name()["orphan"]["job_id"]
    first = fleet.worker(receiver.url, "cpu-a", CPU_A)
    first_id = first.worker_id
    pid = fleet.trainer_pid(job_id)
    receiver.wait_status(job_id, "running")

    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    fleet.kill_trainer(pid)  # the host died, and its trainer with it
    swept = receiver.wait_status(job_id, "pending", timeout_s=15)
    assert swept["error"] == f"lost worker {first_id}"
    assert swept["attempts_detail"][0]["outcome"] == "lost_worker"

    fleet.release("g")
    second = fleet.worker(receiver.url, "cpu-b", CPU_B)
    done = receiver.wait_status(job_id, "completed")
    assert done["hostname"] == "cpu-b" and done["attempts"] == 2
    assert done["worker_id"] == second.worker_id != first_id
    lost = [e for e in done["history"] if e["kind"] == "failed"]
    assert [(e["attempt"], e["detail"]["outcome"], e["detail"]["error"]) for e in lost] == [
        (1, "lost_worker", f"lost worker {first_id}")]
    stored_bundle(receiver, done)
    assert second.stop() == 0
    stop_receiver(receiver)


# -- 5. fencing --------------------------------------------------------------


def make_bundle(tmp_path: Path, name: str, size: int = 4096) -> bundle.Bundle:
    """A real bundle of seeded random bytes, made in this process."""
    out = tmp_path / f"{name}-out"
    out.mkdir()
    (out / "model.bin").write_bytes(random.Random(name).randbytes(size))
    return bundle.create(out, tmp_path / f"{name}.bundle")


@pytest.mark.slow
def test_a_swept_lease_is_fenced_and_only_the_new_holder_completes(
    fleet: Fleet, tmp_path: Path
) -> None:
    receiver = fleet.receiver(fleet.manifest([job("contested")]), stale_after=2,
                              sweep_interval=0.2)
    job_id = receiver.jobs_by_name()["contested"]["job_id"]
    made = make_bundle(tmp_path, "contested")
    client = Client(receiver.url, retries=0)

    a = client.claim("worker-a", {"hostname": "host-a", "cpu_count": 2, "ram_gib": 8})
    assert a is not None and a["job"]["job_id"] == job_id
    receiver.wait_status(job_id, "pending", timeout_s=15)  # A fell silent: swept
    b = client.claim("worker-b", {"hostname": "host-b", "cpu_count": 2, "ram_gib": 8})
    assert b is not None and b["attempt"] == 2 and b["lease"] != a["lease"]
    assert client.heartbeat(job_id, b["lease"]) == "continue"

    with pytest.raises(LeaseLost):
        client.heartbeat(job_id, a["lease"])
    with pytest.raises(LeaseLost):
        client.upload(made.artifact_id, made.path, job_id, a["lease"])
    assert client.upload(made.artifact_id, made.path, job_id, b["lease"])["new"] is True
    for stale_call in (
        lambda: client.complete(job_id, a["lease"], made.artifact_id, {"by": "a"}),
        lambda: client.fail(job_id, a["lease"], "late", True, "trainer_error"),
    ):
        with pytest.raises(LeaseLost) as caught:
            stale_call()
        assert caught.value.status == 409

    done = client.complete(job_id, b["lease"], made.artifact_id, {"by": "b"})
    assert done["status"] == "completed" and done["worker_id"] == "worker-b"
    assert client.complete(job_id, b["lease"], made.artifact_id, {"by": "b"})["status"] == (
        "completed")  # idempotent for the same lease
    with pytest.raises(LeaseLost):
        client.complete(job_id, a["lease"], made.artifact_id, {"by": "a"})
    final = receiver.job(job_id)
    assert final["metrics"] == {"by": "b"} and final["hostname"] == "host-b"
    assert [a["outcome"] for a in final["attempts_detail"]] == ["lost_worker", "completed"]
    stop_receiver(receiver)


# -- 6. SIGTERM to a worker --------------------------------------------------


@pytest.mark.parametrize("stubborn", [False, True], ids=["trainer-obeys", "trainer-ignores"])
def test_sigterm_hands_the_running_job_back_without_charging_an_attempt(
    fleet: Fleet, stubborn: bool
) -> None:
    hyper = {"gate": "g", "ignore_sigterm": stubborn}
    receiver = fleet.receiver(fleet.manifest([job("long", hyper=hyper)]))
    job_id = receiver.jobs_by_name()["long"]["job_id"]
    grace_s = 1.5
    first = fleet.worker(receiver.url, "cpu-a", CPU_A, "--shutdown-grace", str(grace_s))
    pid = fleet.trainer_pid(job_id)
    receiver.wait_status(job_id, "running")

    first.proc.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    assert first.wait_exit(timeout_s=grace_s + 3) == 0
    if stubborn:  # it got the whole grace, then SIGKILL
        assert time.monotonic() - sent_at >= grace_s
    assert not pid_alive(pid) and not fleet.trainer_finished(job_id)
    back = receiver.job(job_id)
    assert back["status"] == "pending"
    assert (back["attempts"], back["attempts_charged"]) == (1, 0)
    assert back["attempts_detail"][0]["outcome"] == "worker_shutdown"

    fleet.release("g")
    second = fleet.worker(receiver.url, "cpu-b", CPU_B)
    done = receiver.wait_status(job_id, "completed")
    # Only trainer failures and timeouts are charged against max_attempts.
    assert (done["hostname"], done["attempts"], done["attempts_charged"]) == ("cpu-b", 2, 0)
    stored_bundle(receiver, done)
    assert second.stop() == 0
    stop_receiver(receiver)


# -- 7. nothing trained is lost ----------------------------------------------


def spool_record(worker_spool: Path) -> dict[str, Any]:
    """The one spooled delivery, once the worker has written it."""
    records = wait_for("a spool record", lambda: sorted(worker_spool.glob("*.json")))
    assert len(records) == 1
    record: dict[str, Any] = json.loads(records[0].read_text())
    assert Path(record["bundle"]).is_file()
    assert sha256_of(Path(record["bundle"])) == record["artifact_id"]
    return record


def train_through_an_outage(fleet: Fleet) -> tuple[Receiver, str, Worker, dict[str, Any]]:
    """A job trained while its receiver is down: (stopped receiver, job id, worker, record)."""
    # A long stale_after: the outage alone must not requeue the job.
    receiver = fleet.receiver(fleet.manifest([job("through-outage", hyper={"gate": "g"})]),
                              stale_after=600)
    job_id = receiver.jobs_by_name()["through-outage"]["job_id"]
    worker = fleet.worker(receiver.url, "cpu-a", CPU_A)
    fleet.trainer_pid(job_id)
    receiver.wait_status(job_id, "running")
    stop_receiver(receiver)
    fleet.release("g")
    wait_for("the trainer to finish", lambda: fleet.trainer_finished(job_id))
    return receiver, job_id, worker, spool_record(worker.spool_dir)


@pytest.mark.slow
def test_worker_delivers_its_spool_once_the_receiver_is_back(fleet: Fleet) -> None:
    stopped, job_id, worker, record = train_through_an_outage(fleet)
    # Past the client's own retries: from here only the spool keeps the result.
    wait_for("the worker to give up this delivery round",
             lambda: "result kept in the spool" in worker.log_path.read_text(), timeout_s=30)
    assert worker.proc.poll() is None and spool_record(worker.spool_dir) == record

    receiver = fleet.restart(stopped, stale_after=600)
    done = receiver.wait_status(job_id, "completed", timeout_s=40)
    assert done["artifact_id"] == record["artifact_id"] and done["attempts"] == 1
    assert stored_bundle(receiver, done).stat().st_size == record["size"]
    wait_for("the spool to empty", lambda: not any(worker.spool_dir.iterdir()))
    assert worker.stop() == 0
    stop_receiver(receiver)


@pytest.mark.slow
def test_restarted_worker_delivers_the_spool_of_its_previous_process(fleet: Fleet) -> None:
    stopped, job_id, first, record = train_through_an_outage(fleet)
    first_id = first.worker_id
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    receiver = fleet.restart(stopped, stale_after=600)
    again = fleet.worker(receiver.url, "cpu-a", CPU_A, state_dir=first.state_dir)
    done = receiver.wait_status(job_id, "completed", timeout_s=30)
    assert done["artifact_id"] == record["artifact_id"] and done["attempts"] == 1
    assert done["worker_id"] == first_id == again.worker_id
    stored_bundle(receiver, done)
    wait_for("the spool to empty", lambda: not any(again.spool_dir.iterdir()))
    assert again.stop() == 0
    stop_receiver(receiver)


# -- 8. a receiver killed mid-upload -----------------------------------------


def start_put(conn: http.client.HTTPConnection, made: bundle.Bundle, job_id: str, lease: str,
              send_bytes: int) -> None:
    """Begin a streamed PUT of the whole bundle, but send only its first send_bytes."""
    query = urllib.parse.urlencode({"job_id": job_id, "lease": lease})
    conn.putrequest("PUT", f"/v1/model/{made.artifact_id}?{query}")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(made.size))
    conn.endheaders()
    with open(made.path, "rb") as fh:
        left = send_bytes
        while left > 0 and (chunk := fh.read(min(left, 1 << 20))):
            conn.send(chunk)
            left -= len(chunk)


@pytest.mark.slow
def test_receiver_killed_mid_upload_leaves_nothing_and_the_retry_succeeds(
    fleet: Fleet, tmp_path: Path
) -> None:
    receiver = fleet.receiver(fleet.manifest([job("big")]))
    job_id = receiver.jobs_by_name()["big"]["job_id"]
    made = make_bundle(tmp_path, "big", size=64 << 20)  # random bytes: zstd cannot shrink them
    client = Client(receiver.url, retries=0)
    claim = client.claim("worker-a", CPU_A)
    assert claim is not None and claim["job"]["job_id"] == job_id
    tmp_dir = receiver.models_dir / ".tmp"

    with closing(http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=30)) as conn:
        start_put(conn, made, job_id, claim["lease"], made.size // 2)
        wait_for("the receiver to be streaming the upload", lambda: [
            p for p in tmp_dir.glob("*.part") if p.stat().st_size >= made.size // 4])
        assert receiver.stop(signal.SIGKILL) == -signal.SIGKILL
    assert list(tmp_dir.glob("*.part"))  # the partial upload a crash leaves behind

    receiver = fleet.restart(receiver)
    assert list(tmp_dir.iterdir()) == []  # purged at start
    assert list(receiver.models_dir.glob(f"*/{made.artifact_id}")) == []
    assert made.artifact_id not in {row["artifact_id"] for row in receiver.index_rows()}
    assert client.has_artifact(made.artifact_id) is False

    with closing(http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=60)) as conn:
        start_put(conn, made, job_id, claim["lease"], made.size)
        response = conn.getresponse()
        answer = json.loads(response.read())
    assert response.status == 201, answer
    assert answer == {"artifact_id": made.artifact_id, "size": made.size, "new": True}
    done = client.complete(job_id, claim["lease"], made.artifact_id, {})
    assert done["status"] == "completed" and done["artifact_id"] == made.artifact_id
    assert stored_bundle(receiver, done).stat().st_size == made.size
    assert [row["artifact_id"] for row in receiver.index_rows()] == [made.artifact_id]
    stop_receiver(receiver)

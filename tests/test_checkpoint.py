"""Resume from checkpoint: the queue keeps a job's last checkpoint across attempts, and real
workers upload a trainer's checkpoints and hand the next attempt (on another host) the last.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cpu, execute_on, job, make_manifest, manifest_text
from tests.fleet import Fleet, Receiver, wait_for
from trainfleet import bundle, checkpoint
from trainfleet.errors import LeaseLost, ManifestError, ReceiverError
from trainfleet.manifest import loads
from trainfleet.queue import open_queue
from trainfleet.queue import sqlite as sqlite_queue
from trainfleet.queue.base import FailureKind, JobQueue, Status

T0 = 1_000_000.0
CKPT = "c" * 64


# -- the queue (both backends) -----------------------------------------------


def test_record_checkpoint_sets_it_with_one_event(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a", checkpoint_interval_s=60)]), now=T0)
    claim = queue.claim_next("w1", cpu(), now=T0 + 1)
    assert claim is not None
    assert (claim.job.checkpoint_id, claim.job.checkpoint_interval_s) == (None, 60.0)
    done = queue.record_checkpoint(claim.job.job_id, claim.lease, CKPT, T0 + 2,
                                   progress={"step": 7, "message": "not kept"})
    assert (done.checkpoint_id, done.checkpoint_at) == (CKPT, T0 + 2)
    assert done.status == Status.CLAIMED  # a checkpoint is not a heartbeat
    [event] = [e for e in queue.history(claim.job.job_id) if e.kind == "checkpoint"]
    assert (event.attempt, event.worker_id) == (1, "w1")
    assert dict(event.detail) == {"artifact_id": CKPT, "step": 7}


def test_a_stale_lease_cannot_record_a_checkpoint(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    first = queue.claim_next("w1", cpu("h1"), now=T0)
    assert first is not None
    queue.record_checkpoint(first.job.job_id, first.lease, CKPT, T0 + 1)
    queue.fail(first.job.job_id, first.lease, "boom", now=T0 + 2)
    second = queue.claim_next("w2", cpu("h2"), now=T0 + 3)
    assert second is not None and second.job.job_id == first.job.job_id
    with pytest.raises(LeaseLost):
        queue.record_checkpoint(first.job.job_id, first.lease, "d" * 64, T0 + 4)
    assert queue.get(first.job.job_id).checkpoint_id == CKPT
    assert [e.kind for e in queue.history(first.job.job_id)].count("checkpoint") == 1


def test_the_checkpoint_survives_sweep_failure_and_requeue_and_is_claimed(
    queue: JobQueue,
) -> None:
    queue.sync_manifest(make_manifest([job("a", max_attempts=1)]), now=T0)
    claim = queue.claim_next("w1", cpu(), now=T0)
    assert claim is not None
    job_id = claim.job.job_id
    queue.record_checkpoint(job_id, claim.lease, CKPT, T0 + 1)

    assert queue.sweep_stale(now=T0 + 10_000) == [job_id]  # lost worker: pending again
    swept = queue.get(job_id)
    assert (swept.status, swept.checkpoint_id) == (Status.PENDING, CKPT)
    again = queue.claim_next("w2", cpu("other"), now=T0 + 10_001)
    assert again is not None and again.job.checkpoint_id == CKPT

    queue.fail(job_id, again.lease, "out of attempts", kind=FailureKind.TRAINER_ERROR,
               now=T0 + 10_002)
    assert queue.get(job_id).status == Status.FAILED
    requeued = queue.requeue(job_id, now=T0 + 10_003)  # the operator's retry resumes too
    assert (requeued.status, requeued.checkpoint_id) == (Status.PENDING, CKPT)
    third = queue.claim_next("w3", cpu("third"), now=T0 + 10_004)
    assert third is not None and third.job.checkpoint_id == CKPT


def test_checkpoint_interval_follows_the_manifest_while_pending(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    [waiting] = queue.list_jobs()
    assert waiting.checkpoint_interval_s == 300.0  # the built-in default
    result = queue.sync_manifest(make_manifest([job("a", checkpoint_interval_s=0)]), now=T0 + 1)
    assert result.updated == 1
    assert queue.get(waiting.job_id).checkpoint_interval_s == 0.0


def test_a_version_2_database_gains_the_checkpoint_columns(queue_url: str) -> None:
    """Every column schema version 3 adds is dropped, then the upgrade puts them back."""
    open_queue(queue_url).close()
    sqlite = queue_url.startswith("sqlite:///")
    module = sqlite_queue if sqlite else pytest.importorskip("trainfleet.queue.postgres")
    drops = [f"ALTER TABLE {table} DROP COLUMN {column}" for table, column in
             re.findall(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", module.MIGRATIONS[3])]
    drops.append("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    execute_on(queue_url, drops)
    q = open_queue(queue_url)
    try:
        q.sync_manifest(make_manifest([job("a")]), now=T0)
        claim = q.claim_next("w", cpu(), now=T0)
        assert claim is not None and claim.job.checkpoint_interval_s == 300.0
        assert q.record_checkpoint(claim.job.job_id, claim.lease, CKPT, T0 + 1
                                   ).checkpoint_id == CKPT
    finally:
        q.close()


# -- the manifest and the packing --------------------------------------------


@pytest.mark.parametrize("value", ["-1", '"often"', "true"])
def test_a_bad_checkpoint_interval_is_refused_naming_the_field(value: str) -> None:
    text = manifest_text([job("a")]).replace(
        "[[jobs]]", f"[[jobs]]\ncheckpoint_interval_s = {value}", 1)
    with pytest.raises(ManifestError) as caught:
        loads(text, source="m.toml")
    assert 'jobs[0] "a".checkpoint_interval_s: expected a number of seconds >= 0' in str(
        caught.value)


def test_newest_skips_temp_names_and_unsettled_entries_and_pack_round_trips(
    tmp_path: Path,
) -> None:
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "old.pt").write_text("old")
    (ckpt / ".new.pt.tmp").write_text("half written")
    (ckpt / "run").mkdir()
    (ckpt / "run" / "weights.bin").write_text("dir checkpoint")
    (ckpt / "fresh.pt").write_text("still being written")
    now = (ckpt / "fresh.pt").stat().st_mtime
    old, run = (ckpt / "old.pt"), ckpt / "run" / "weights.bin"
    os.utime(old, (now - 30, now - 30))
    os.utime(run, (now - 20, now - 20))
    os.utime(ckpt / "run", (now - 20, now - 20))
    found = checkpoint.newest(ckpt, settle_s=1.0, now=now + 0.5)
    assert found is not None and found.path.name == "run"  # fresh.pt has not settled
    latest = checkpoint.newest(ckpt, settle_s=0.0, now=now + 0.5)
    assert latest is not None and latest.path.name == "fresh.pt"

    made = checkpoint.pack(found, tmp_path / "work")
    again = checkpoint.pack(found, tmp_path / "work2")
    assert made.artifact_id == again.artifact_id  # content addressed: the same bytes
    resumed = checkpoint.unpack(made.path, tmp_path / "resume")
    assert resumed == tmp_path / "resume" / "run"
    assert (resumed / "weights.bin").read_text() == "dir checkpoint"
    assert run.read_text() == "dir checkpoint"  # the trainer's own file is untouched


# -- real workers --------------------------------------------------------------

# A trainer that counts steps, writes each as a checkpoint file (temp name, then rename)
# and sleeps; it resumes from {resume_from}, and reports where it started in its output.
# Markers steer it: "fail" exits 3; "pause" stops writing checkpoints (it says "paused"),
# and with "torn" as well it writes step-999999.json in place, a byte at a time, forever.
STEP_TRAINER = '''\
import json, os, sys, time
from pathlib import Path

markers, ckpt_dir, resume, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
assert os.environ["TRAINFLEET_RESUME_FROM"] == resume
assert os.environ["TRAINFLEET_CHECKPOINT_DIR"] == str(ckpt_dir)
attempt = os.environ["TRAINFLEET_ATTEMPT"]
step = json.loads(Path(resume).read_text())["step"] if resume else 0
(markers / ("start-" + attempt)).write_text(str(step))
print("attempt", attempt, "starts at step", step, flush=True)
started = step
while not (markers / "release").exists():
    if (markers / "fail").exists():
        sys.exit(3)
    if (markers / "pause").exists():
        (markers / "paused").write_text(str(step))
        if (markers / "torn").exists():
            with open(ckpt_dir / "step-999999.json", "a") as fh:
                fh.write("{")
            (markers / "torn-written").touch()
        time.sleep(0.05)
        continue
    step += 1
    tmp = ckpt_dir / ".step.tmp"
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, ckpt_dir / ("step-%06d.json" % step))
    Path(os.environ["TRAINFLEET_PROGRESS_FILE"]).write_text(json.dumps({"step": step}))
    time.sleep(0.1)
Path(out).mkdir(parents=True, exist_ok=True)
(Path(out) / "metrics.json").write_text(json.dumps({"started_at_step": started, "steps": step}))
'''
STEP_HEADER = """
schema_version = 1
name = "checkpoints"
[trainer]
command = ["{python}", "trainer.py", "%s", "{checkpoint_dir}", "{resume_from}",
           "{output_dir}"]
modes = ["realistic"]
[models.mlp]
hyper = {}
"""
CPU_A = {"hostname": "cpu-a", "cuda": False, "gpus": [], "ram_gib": 8, "cpu_count": 4}
CPU_B = {**CPU_A, "hostname": "cpu-b"}

pytestmark_posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path) as f:
        f.trainer_path.write_text(STEP_TRAINER)
        yield f


def step_receiver(fleet: Fleet, interval_s: float = 0.5, **options: Any
                  ) -> tuple[Receiver, str]:
    header = STEP_HEADER % str(fleet.markers).replace("\\", "\\\\")
    path = fleet.root / "manifest.toml"
    path.write_text(manifest_text([{"name": "long", "model": "mlp", "mode": "realistic",
                                    "checkpoint_interval_s": interval_s}], header=header))
    receiver = fleet.receiver(path, **options)
    return receiver, receiver.jobs_by_name()["long"]["job_id"]


def checkpoint_step(receiver: Receiver, artifact_id: str, tmp_path: Path) -> int:
    """The step inside a stored checkpoint, read back through the API."""
    into = Path(tempfile.mkdtemp(dir=tmp_path))
    got = receiver.client.download(artifact_id, into / "checkpoint.bundle")
    entry = checkpoint.unpack(got, into / "unpacked")
    return int(json.loads(entry.read_text())["step"])


def finish_on_another_host(fleet: Fleet, receiver: Receiver, job_id: str, tmp_path: Path,
                           resume_id: str) -> dict[str, Any]:
    """A second worker resumes the job; it must start at the stored checkpoint's step."""
    second = fleet.worker(receiver.url, "cpu-b", CPU_B)
    wait_for("the second attempt to start", lambda: (fleet.markers / "start-2").exists())
    (fleet.markers / "release").write_text("go")
    done = receiver.wait_status(job_id, "completed", timeout_s=30)
    assert done["hostname"] == "cpu-b" and done["attempts"] == 2
    started = int((fleet.markers / "start-2").read_text())
    assert started == checkpoint_step(receiver, resume_id, tmp_path) > 0
    assert done["metrics"]["started_at_step"] == started
    assert second.stop() == 0
    return done


@pytestmark_posix
@pytest.mark.slow
def test_a_killed_workers_job_resumes_from_its_last_checkpoint_on_another_host(
    fleet: Fleet, tmp_path: Path,
) -> None:
    receiver, job_id = step_receiver(fleet, stale_after=2, sweep_interval=0.5)
    first = fleet.worker(receiver.url, "cpu-a", CPU_A)
    recorded = wait_for("a checkpoint recorded",
                        lambda: receiver.job(job_id)["checkpoint_id"], timeout_s=30)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL  # the host dies with its trainer
    swept = receiver.wait_status(job_id, "pending", timeout_s=20)
    last = swept["checkpoint_id"]  # `recorded`, or a later one
    assert last is not None and recorded is not None
    assert last in [e["detail"]["artifact_id"] for e in swept["history"]
                    if e["kind"] == "checkpoint"]

    finish_on_another_host(fleet, receiver, job_id, tmp_path, last)


@pytestmark_posix
@pytest.mark.slow
def test_sigterm_uploads_the_newest_checkpoint_before_handing_the_job_back(
    fleet: Fleet, tmp_path: Path,
) -> None:
    receiver, job_id = step_receiver(fleet, interval_s=3600)  # no periodic upload is due
    first = fleet.worker(receiver.url, "cpu-a", CPU_A)
    written = wait_for("the trainer's third checkpoint", lambda: [
        path for path in first.state_dir.rglob("checkpoints/step-000003.json")], timeout_s=30)
    assert receiver.job(job_id)["checkpoint_id"] is None
    pause_until_settled(fleet, written[0].parent)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait_exit(timeout_s=20) == 0
    back = receiver.job(job_id)
    assert back["status"] == "pending" and back["attempts_charged"] == 0
    newest_on_disk = max(written[0].parent.glob("step-*.json"))
    step_on_disk = json.loads(newest_on_disk.read_text())["step"]
    assert checkpoint_step(receiver, back["checkpoint_id"], tmp_path) == step_on_disk
    kinds = [e["kind"] for e in back["history"]]
    assert kinds[-2:] == ["checkpoint", "failed"] and kinds.count("checkpoint") == 1

    finish_on_another_host(fleet, receiver, job_id, tmp_path, back["checkpoint_id"])


def pause_until_settled(fleet: Fleet, ckpt_dir: Path) -> None:
    """Stop the trainer writing checkpoints, and wait until its newest is settled: older than
    SETTLE_S (the worker passes over an entry changed within SETTLE_S of the trainer's end)."""
    (fleet.markers / "pause").touch()
    wait_for("the trainer to pause", (fleet.markers / "paused").exists)
    newest_mtime = max(p.stat().st_mtime for p in ckpt_dir.glob("step-*.json"))
    wait_for("its newest checkpoint to settle",
             lambda: time.time() > newest_mtime + checkpoint.SETTLE_S + 0.2)


@pytestmark_posix
@pytest.mark.slow
def test_a_checkpoint_torn_by_the_trainers_end_is_not_kept_the_settled_one_is(
    fleet: Fleet, tmp_path: Path,
) -> None:
    """A trainer stopped mid in-place write leaves a torn file: the worker's last upload
    must take the newest settled checkpoint instead, or every retry resumes from garbage."""
    receiver, job_id = step_receiver(fleet, interval_s=3600)  # only the last upload
    first = fleet.worker(receiver.url, "cpu-a", CPU_A)
    [third] = wait_for("the trainer's third checkpoint", lambda: [
        path for path in first.state_dir.rglob("checkpoints/step-000003.json")], timeout_s=30)
    pause_until_settled(fleet, third.parent)
    good = max(third.parent.glob("step-0*.json"))
    (fleet.markers / "torn").touch()
    wait_for("the in-place write to begin", (fleet.markers / "torn-written").exists)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait_exit(timeout_s=20) == 0
    back = receiver.job(job_id)
    assert back["status"] == "pending" and back["checkpoint_id"] is not None
    assert checkpoint_step(receiver, back["checkpoint_id"], tmp_path) == json.loads(
        good.read_text())["step"]


def test_pack_drops_a_bundle_when_the_entry_is_rewritten_in_place(tmp_path: Path) -> None:
    """pack hard-links the trainer's files: a rewrite in place after `newest` looked would
    leak into the bundle, so the entry is fingerprinted again after packing."""
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    entry = ckpt / "latest.bin"
    entry.write_bytes(b"epoch 1 weights")
    os.utime(entry, (T0, T0))
    found = checkpoint.newest(ckpt)
    assert found is not None
    with open(entry, "r+b") as fh:  # the trainer starts its next save in place
        fh.write(b"EPOCH 2")
    with pytest.raises(checkpoint.Changed, match="latest.bin changed while it was packed"):
        checkpoint.pack(found, tmp_path / "work")
    assert not (tmp_path / "work" / "checkpoint.bundle").exists()
    again = checkpoint.newest(ckpt, settle_s=0.0)
    assert again is not None
    made = checkpoint.pack(again, tmp_path / "work")  # unchanged since: packed
    unpacked = checkpoint.unpack(made.path, tmp_path / "resume")
    assert unpacked.read_bytes() == b"EPOCH 2 weights"


class HoldingProxy:
    """A slow link, for real workers: a loopback HTTP proxy in front of a receiver that
    holds each checkpoint upload (PUT ...kind=checkpoint) until `release` is set."""

    def __init__(self, target_url: str) -> None:
        self.target = urllib.parse.urlsplit(target_url)
        self.held = threading.Event()  #: a checkpoint upload came and is being held
        self.release = threading.Event()
        self.answered = threading.Event()  #: the receiver answered a held upload
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                hold = self.command == "PUT" and "kind=checkpoint" in self.path
                if hold:
                    proxy.held.set()
                    proxy.release.wait(60)
                conn = http.client.HTTPConnection(proxy.target.hostname or "127.0.0.1",
                                                  proxy.target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                if hold:  # before answering: the worker may be gone (a broken pipe)
                    proxy.answered.set()
                self.send_response(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in ("connection", "content-length",
                                            "transfer-encoding", "server", "date"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HoldingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


@pytestmark_posix
@pytest.mark.slow
def test_heartbeats_go_on_while_the_last_checkpoint_uploads_after_a_failure(
    fleet: Fleet, tmp_path: Path,
) -> None:
    """The last upload of a large checkpoint on a slow link must not outlast the stale
    timeout: the worker heartbeats while it waits for it."""
    receiver, job_id = step_receiver(fleet, interval_s=3600)  # only the last upload
    with HoldingProxy(receiver.url) as proxy:
        first = fleet.worker(proxy.url, "cpu-a", CPU_A, "--max-jobs", "1")
        [third] = wait_for("the trainer's third checkpoint", lambda: [
            path for path in first.state_dir.rglob("checkpoints/step-000003.json")],
            timeout_s=30)
        pause_until_settled(fleet, third.parent)
        (fleet.markers / "fail").touch()  # the trainer exits 3: its last checkpoint is kept
        wait_for("the last checkpoint's upload", proxy.held.is_set)
        for _ in range(2):
            before = receiver.job(job_id)["heartbeat_at"]
            wait_for("a heartbeat while the upload is held",
                     lambda b=before: receiver.job(job_id)["heartbeat_at"] > b)
        assert receiver.job(job_id)["checkpoint_id"] is None  # still on its way
        proxy.release.set()
        assert first.wait_exit(timeout_s=30) == 0
    back = receiver.job(job_id)
    assert back["status"] == "pending" and back["checkpoint_id"] is not None
    assert [e["kind"] for e in back["history"]][-2:] == ["checkpoint", "failed"]
    assert checkpoint_step(receiver, back["checkpoint_id"], tmp_path) >= 3


@pytestmark_posix
@pytest.mark.slow
def test_a_finished_trainer_completes_without_waiting_for_a_checkpoint_upload(
    fleet: Fleet,
) -> None:
    """A periodic upload still on its way when the trainer exits 0 is of no use: the job
    completes at once, and the abandoned upload records nothing afterwards."""
    receiver, job_id = step_receiver(fleet, interval_s=0.5)
    with HoldingProxy(receiver.url) as proxy:
        first = fleet.worker(proxy.url, "cpu-a", CPU_A, "--max-jobs", "1")
        wait_for("a periodic checkpoint upload", proxy.held.is_set, timeout_s=30)
        (fleet.markers / "release").write_text("go")
        receiver.wait_status(job_id, "completed")
        assert not proxy.answered.is_set()  # completed while the upload was held
        proxy.release.set()
        wait_for("the held upload to be answered", proxy.answered.is_set)
        assert first.wait_exit(timeout_s=30) == 0
    done = receiver.job(job_id)
    assert done["status"] == "completed" and done["checkpoint_id"] is None
    assert "checkpoint" not in [e["kind"] for e in done["history"]]


@pytestmark_posix
def test_the_checkpoint_call_is_fenced_and_needs_a_stored_artifact(
    fleet: Fleet, tmp_path: Path,
) -> None:
    receiver, job_id = step_receiver(fleet)
    client = receiver.client
    claim = client.claim("fake-worker", CPU_A)
    assert claim is not None and claim["resume_from"] is None
    with pytest.raises(ReceiverError) as missing:
        client.checkpoint(job_id, claim["lease"], CKPT, attempt=1)
    assert missing.value.status == 400 and "artifact_id" in missing.value.message
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "step.json").write_text('{"step": 3}')
    made = bundle.create(src, tmp_path / "ckpt.bundle")
    client.upload(made.artifact_id, made.path, job_id, claim["lease"], attempt=1,
                  kind="checkpoint")
    with pytest.raises(LeaseLost):
        client.checkpoint(job_id, "not-the-lease", made.artifact_id, attempt=1)
    with pytest.raises(LeaseLost):
        client.checkpoint(job_id, claim["lease"], made.artifact_id, attempt=2)
    answer = client.checkpoint(job_id, claim["lease"], made.artifact_id, attempt=1,
                               progress={"step": 3})
    assert answer["checkpoint_id"] == made.artifact_id
    client.fail(job_id, claim["lease"], "boom", True, "trainer_error", attempt=1)
    again = client.claim("fake-worker-2", CPU_B)
    assert again is not None and again["resume_from"] == made.artifact_id
    receiver.stop()


# -- the example trainer -------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trainer" / "run.py"


def run_example(tmp_path: Path, name: str, epochs: int, *args: str) -> dict[str, Any]:
    """The example mlp trainer as a worker starts it; its metrics (stdout kept in `log`)."""
    pytest.importorskip("sklearn")
    hyper = tmp_path / f"{name}.json"
    hyper.write_text(json.dumps({"epochs": epochs, "hidden": 16}))
    out = tmp_path / name
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", "mlp", "--mode", "oracle", "--seed", "3",
         "--hyper", str(hyper), "--out", str(out), *args],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {**json.loads((out / "metrics.json").read_text()), "log": proc.stdout}


def test_example_mlp_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    run_example(tmp_path, "first-half", 3, "--checkpoint-dir", str(ckpt))
    assert sorted(p.name for p in ckpt.iterdir()) == ["mlp.npz"]  # no temp file left
    resumed = run_example(tmp_path, "resumed", 6, "--resume-from", str(ckpt / "mlp.npz"),
                          "--checkpoint-dir", "")
    assert "resumed after epoch 3/6" in resumed["log"]
    assert "epoch 1/6" not in resumed["log"] and "epoch 4/6" in resumed["log"]
    whole = run_example(tmp_path, "whole", 6)
    assert resumed["accuracy"] == whole["accuracy"]  # a warm start, not a fresh one


class _Plant:
    """Unpickling this makes a directory: proof that a checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("form", ["pickle", "npz-with-object-array"])
def test_example_mlp_loads_a_planted_checkpoint_as_data_and_refuses_it(
    tmp_path: Path, form: str,
) -> None:
    """A checkpoint comes from another host: a pickle in it must not run here."""
    pytest.importorskip("sklearn")
    import numpy as np

    marker = tmp_path / "code-ran"
    planted = tmp_path / "mlp.npz"
    if form == "pickle":
        planted.write_bytes(pickle.dumps({"model": _Plant(marker), "epoch": 3}))
    else:
        payload = np.empty(1, dtype=object)
        payload[0] = _Plant(marker)
        with open(planted, "wb") as fh:
            np.savez(fh, meta=payload)
    hyper = tmp_path / "hyper.json"
    hyper.write_text(json.dumps({"epochs": 6, "hidden": 16}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINFLEET_")}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", "mlp", "--mode", "oracle", "--seed", "3",
         "--hyper", str(hyper), "--out", str(tmp_path / "out"), "--resume-from", str(planted),
         "--checkpoint-dir", ""],
        capture_output=True, text=True, env=env, timeout=120)
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr
    assert "--resume-from:" in proc.stderr and "not an mlp checkpoint" in proc.stderr

"""The worker daemon: claim a job, run the project's trainer, deliver its bundle, repeat.

Standard library only. A finished attempt is spooled to disk before any upload, so nothing
trained is lost to a receiver outage or a worker restart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from trainfleet import bundle, capability, checkpoint, trainer_process
from trainfleet.capability import Capability, Gpu, detect, self_test
from trainfleet.client import Client
from trainfleet.errors import LeaseLost, ReceiverError, ReceiverUnreachable, TrainfleetError
from trainfleet.failures import Diagnosis, diagnose

log = logging.getLogger("trainfleet.worker")
_T = TypeVar("_T")

CHILD_POLL_S = 0.2
#: How often the trainer's GPU memory is sampled (nvidia-smi costs ~50 ms, so never below 2 s);
#: also at each heartbeat, and the peak goes with the heartbeat, the failure and the completion.
VRAM_SAMPLE_S = 3.0
LOG_TAIL_BYTES = 4096  #: sent with each heartbeat
ERROR_TAIL_BYTES = 2048  #: sent as a failed attempt's error
MAX_LOG_BYTES = 8 << 20  #: the most of a trainer log uploaded (its end)
MAX_MESSAGE_CHARS = 500
PLACEHOLDER = re.compile(r"\{(\w+)\}")
PROGRESS_TYPES: dict[str, tuple[type, ...]] = {
    "fraction": (int, float),
    "step": (int,),
    "message": (str,),
}

if sys.platform == "win32":
    _STOP_SIGNALS = (signal.SIGINT, signal.SIGBREAK)  # Ctrl-C, Ctrl-Break / service stop
else:
    _STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # kill <pid> / systemd stop, Ctrl-C


@dataclass(frozen=True)
class WorkerSettings:
    receiver_url: str
    workdir: Path  #: where the trainer command runs (the project checkout)
    state_dir: Path  #: spool/, jobs/<job_id>/<attempt>/ and the worker_id file
    token: str | None = None
    worker_id: str | None = None  #: default "<hostname>-<8 hex>", kept in state_dir/worker_id
    allow_jobs: tuple[str, ...] | None = None
    deny_jobs: tuple[str, ...] = ()
    heartbeat_interval_s: float = 30.0
    poll_interval_s: float = 10.0
    once: bool = False  #: claim and run at most one job, then exit
    max_jobs: int | None = None
    capability_file: Path | None = None
    shutdown_grace_s: float = 10.0
    python: str = sys.executable
    slot: int = 0  #: this slot's number on its host
    #: CUDA_VISIBLE_DEVICES for the trainer ("" hides every GPU); None leaves it as it is
    visible_devices: str | None = None


class _Outcome(Enum):
    EXITED = "exited"  #: the trainer exited by itself; see its return code
    CANCELLED = "cancelled"  #: the operator cancelled the job
    FENCED = "fenced"  #: the receiver answered 409: our lease is no longer the job's
    TIMEOUT = "timeout"  #: the job's timeout_s ran out
    SHUTDOWN = "shutdown"  #: the worker was asked to stop


#: Outcomes that hand the job back with our lease still live: its last checkpoint is uploaded.
_HANDED_BACK = (_Outcome.SHUTDOWN, _Outcome.TIMEOUT)


@dataclass(frozen=True)
class _Attempt:
    """One claim of a job, and where its files live on this worker."""

    job_id: str
    lease: str
    attempt: int
    run_dir: Path
    resume_from: str = ""  #: the unpacked checkpoint this attempt resumes from; "": none

    @property
    def short(self) -> str:
        return self.job_id[:12]

    @property
    def out_dir(self) -> Path:
        return self.run_dir / "out"

    @property
    def hyper_path(self) -> Path:
        return self.run_dir / "hyper.json"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "trainer.log"

    @property
    def progress_path(self) -> Path:
        return self.run_dir / "progress.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


@dataclass(frozen=True)
class _Delivery:
    """A spool record: everything needed to deliver a finished attempt after a restart."""

    job_id: str
    lease: str
    attempt: int
    artifact_id: str
    bundle: str
    size: int
    metrics: dict[str, Any]
    log: str
    peak_vram_gib: float | None = None  #: the trainer's, sampled up to its exit


class Worker:
    """Runs one slot: claims jobs that fit this host and sees each through to a report."""

    def __init__(
        self, settings: WorkerSettings, client: Client, capability: Capability | None = None
    ) -> None:
        self.settings = settings
        self.client = client
        self.capability = capability
        # Absolute, because the trainer runs in workdir and gets these paths as arguments.
        self.state_dir = settings.state_dir.resolve()
        self.spool_dir = self.state_dir / "spool"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        hostname = capability.hostname if capability else socket.gethostname().split(".")[0]
        self.worker_id = settings.worker_id or _load_worker_id(self.state_dir, hostname)
        self._stopping = False
        self._wake = threading.Event()  #: set only when asked to stop
        self._peak_vram_gib: float | None = None  #: the running attempt's, sampled
        self.pool: GpuPool | None = None  #: set when this is a GPU slot of a SlotGroup
        self._devices: str | None = None  #: the running attempt's CUDA_VISIBLE_DEVICES
        #: the worker ids of the sibling slots the running attempt borrowed: its heartbeats
        #: vouch for them, since a lent slot makes no calls of its own
        self._lent: list[str] = []
        self._last_job = False  #: the job being claimed is this slot's last (--once, max)
        client.stop_event = self._wake

    def run(self) -> int:
        """Claim and run jobs until asked to stop, or `once` / `max_jobs` says; the exit code.

        A GPU slot is in its pool only between a passed self-test and the end of this loop:
        a slot that cannot train, or has stopped, must never lend its GPU to a sibling."""
        try:
            if not self._ready():
                return 1
            if self.pool is not None:
                self.pool.join(self)
                # Claim once every sibling is self-tested: the widest offer from the start.
                while not self.pool.checked.wait(CHILD_POLL_S) and not self._wake.is_set():
                    pass
            return self._loop()
        finally:
            if self.pool is not None:
                self.pool.leave(self)

    def _loop(self) -> int:
        done = 0
        while not self._stopping:
            max_jobs = self.settings.max_jobs
            self._last_job = self.settings.once or (max_jobs is not None and done + 1 >= max_jobs)
            try:
                ran = self.run_once()
            except ReceiverUnreachable as exc:
                log.warning("%s; trying again in %g s", exc, self.settings.poll_interval_s)
                if self.settings.once:
                    return 1
                ran = False
            except ReceiverError as exc:
                log.error("the receiver refused this worker: %s", exc)
                return 1
            done += ran
            if self.settings.once or (max_jobs is not None and done >= max_jobs):
                break
            if not ran:
                self._wake.wait(self.settings.poll_interval_s)
        log.info("worker %s stopped after %d job(s)", self.worker_id, done)
        return 0

    def run_once(self) -> bool:
        """Deliver spooled results, then claim one job and run it; True when a job ran."""
        self._deliver_spool()
        if self._stopping:
            return False
        cap = self._capability()
        if self.pool is not None:
            return self.pool.claim_and_run(self)
        # One slot using the whole host: it offers every GPU, each with its free memory now,
        # and the job gets those with the most (CUDA_VISIBLE_DEVICES names only them).
        known = _known_free([cap])
        free = {gpu: _free_of(gpu, known) for gpu in cap.gpus} if cap.cuda else {}
        claim = self._claim(cap, list(free.values()) if cap.cuda else None)
        if claim is None:
            return False
        if free:
            inherited = self.settings.visible_devices
            if inherited is None:
                inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
            tokens = None if inherited is None else [t.strip() for t in inherited.split(",")]
            taken = _take(free, claim)
            self._devices = ",".join(_device(gpu.index, tokens) for gpu in taken)
        try:
            self._run_job(claim)
        finally:
            self._devices = None
        return True

    def _claim(self, cap: Capability, free_vram_per_gpu: list[float] | None,
               host_gpus: int | None = None) -> dict[str, Any] | None:
        allow = self.settings.allow_jobs
        return self.client.claim(
            self.worker_id,
            cap.to_dict(),
            slot=self.settings.slot,
            slot_vram_gib=cap.max_vram_gib,
            allow_jobs=None if allow is None else list(allow),
            deny_jobs=list(self.settings.deny_jobs),
            free_vram_per_gpu=free_vram_per_gpu,
            host_gpus=host_gpus,
        )

    def request_stop(self) -> None:
        """Ask the loop to stop: no new claims, and a running trainer is terminated."""
        self._stopping = True
        # Event.set takes a lock that the interrupted main thread may hold inside
        # Event.wait; setting it from a helper thread cannot deadlock a signal handler.
        threading.Thread(target=self._wake.set, name="trainfleet-stop", daemon=True).start()

    def install_signal_handlers(self) -> None:
        """Make SIGTERM/SIGINT (SIGINT/SIGBREAK on Windows) request a stop; main thread only."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()

    # --- capability ---------------------------------------------------------

    def _capability(self) -> Capability:
        if self.capability is None:
            self.capability = detect(
                self.settings.workdir, override_file=self.settings.capability_file
            )
        return self.capability

    def _ready(self) -> bool:
        """Detect this host and self-test it; False (and why, logged) when it cannot train."""
        cap = self._capability()
        log.info("worker %s: %s", self.worker_id, _describe(cap))
        leftovers = trainer_process.reap_leftovers(self.state_dir)
        if leftovers:
            log.warning("ended %d process(es) left by a trainer of an earlier run: %s",
                        len(leftovers), leftovers)
        for probe, why in cap.problems:
            log.warning("capability %s unknown: %s", probe, why)
        problems = self_test(cap, python=self.settings.python)
        for problem in problems:
            log.error("self-test: %s", problem)
        return not problems

    # --- one job ------------------------------------------------------------

    def _run_job(self, claim: dict[str, Any]) -> None:
        """See one claimed attempt through; a GPU slot's last job takes it out of its pool
        as it ends, while still marked busy, so no sibling borrows the GPU in between."""
        try:
            self._run_attempt(claim)
        finally:
            if self._last_job and self.pool is not None:
                self.pool.leave(self)

    def _run_attempt(self, claim: dict[str, Any]) -> None:
        """See one claimed attempt from spawn to report; each outcome ends in one call."""
        job = claim["job"]
        att = _Attempt(
            job_id=job["job_id"],
            lease=claim["lease"],
            attempt=int(claim["attempt"]),
            run_dir=self.state_dir / "jobs" / job["job_id"] / str(claim["attempt"]),
        )
        what = f"{job.get('name')}, model {job.get('model')}, mode {job.get('mode')}"
        log.info("claimed job %s (%s, attempt %d)", att.short, what, att.attempt)
        _prepare_run_dir(att, job.get("hyper") or {})
        att = dataclasses.replace(att, resume_from=self._fetch_checkpoint(claim, att))
        self._peak_vram_gib = None
        try:
            argv = fill_command(claim["command"], self._placeholders(job, att))
        except TrainfleetError as exc:
            self._report_failure(att, "trainer_error", exc.message, retryable=False)
            return
        try:
            child = self._spawn(argv, att)
        except OSError as exc:
            self._report_failure(att, "trainer_error", f"cannot start {argv[0]!r}: {exc}", True)
            return

        timeout_s = None if claim.get("timeout_s") is None else float(claim["timeout_s"])
        interval_s = min(
            self.settings.heartbeat_interval_s,
            float(claim.get("heartbeat_interval_s") or self.settings.heartbeat_interval_s),
        )
        started = time.monotonic()
        uploads = self._checkpoints(att, float(job.get("checkpoint_interval_s") or 0))
        outcome = self._supervise(child, att, timeout_s, interval_s, uploads)
        elapsed_s = time.monotonic() - started
        stopped_at = time.time()
        trainer_process.signal_group(child, kill=True)  # leftovers of a finished trainer
        trainer_process.finished(self.state_dir)
        if outcome in _HANDED_BACK or (outcome is _Outcome.EXITED and child.returncode != 0):
            # The lease is still ours: keep the trainer's last checkpoint.
            self._beating_while(att, interval_s, lambda: uploads.final(stopped_at), uploads)
        else:
            uploads.abandon()  # completed, cancelled or fenced: a checkpoint is of no use

        if outcome is _Outcome.EXITED and child.returncode == 0:
            log.info("job %s: trainer finished in %.0f s", att.short, elapsed_s)
            record = self._spool(att)
            if record is not None:
                self._deliver(record)
        elif outcome is _Outcome.EXITED:
            rc = child.returncode
            log.warning("job %s: trainer exited %d after %.0f s", att.short, rc, elapsed_s)
            tail = _tail(att.log_path, ERROR_TAIL_BYTES)
            self._report_failure(att, "trainer_error", f"trainer exited {rc}:\n{tail}",
                                 retryable=True, diagnosis=diagnose(rc, tail))
        elif outcome is _Outcome.TIMEOUT:
            log.warning("job %s: timed out after %.0f s; trainer stopped", att.short, elapsed_s)
            tail = _tail(att.log_path, ERROR_TAIL_BYTES)
            self._report_failure(att, "timeout", f"timed out after {timeout_s:g} s:\n{tail}",
                                 retryable=True, diagnosis=diagnose(None, tail, timed_out=True))
        elif outcome is _Outcome.SHUTDOWN:
            log.info("job %s: worker shutting down; trainer stopped", att.short)
            self._report_failure(att, "worker_shutdown", "worker shutting down", retryable=True)
        elif outcome is _Outcome.CANCELLED:
            log.info("job %s: cancelled by the operator; trainer stopped", att.short)
        else:
            log.warning("job %s: lease lost; trainer stopped, nothing reported", att.short)

    def _fetch_checkpoint(self, claim: dict[str, Any], att: _Attempt) -> str:
        """Download and unpack the job's last checkpoint; its path, or "" to start afresh
        (a checkpoint that cannot be had never fails the job)."""
        artifact_id = claim.get("resume_from")
        if not artifact_id:
            return ""
        try:
            got = self.client.download(str(artifact_id), att.run_dir / "resume.bundle")
            try:
                path = checkpoint.unpack(got, att.run_dir / "resume")
            finally:
                got.unlink(missing_ok=True)
        except (OSError, TrainfleetError) as exc:
            log.warning("job %s: checkpoint %s unavailable, starting from scratch: %s",
                        att.short, str(artifact_id)[:12], exc)
            shutil.rmtree(att.run_dir / "resume", ignore_errors=True)
            return ""
        log.info("job %s: resuming from checkpoint %s", att.short, str(artifact_id)[:12])
        return str(path)

    def _checkpoints(self, att: _Attempt, interval_s: float) -> checkpoint.Uploader:
        return checkpoint.Uploader(
            self.client, att.job_id, att.lease, att.attempt, att.checkpoint_dir,
            att.run_dir / "checkpoint-upload", interval_s,
            lambda: read_progress(att.progress_path))

    def _placeholders(self, job: dict[str, Any], att: _Attempt) -> dict[str, str]:
        seed = job.get("seed")
        return {
            "python": self.settings.python,
            "model": str(job["model"]),
            "mode": str(job["mode"]),
            "seed": "" if seed is None else str(seed),
            "split_recipe": str(job.get("split_recipe") or ""),
            "train_hosts": ",".join(job.get("train_hosts") or ()),
            "hyper_json": str(att.hyper_path),
            "output_dir": str(att.out_dir),
            "job_id": att.job_id,
            "checkpoint_dir": str(att.checkpoint_dir),
            "resume_from": att.resume_from,
        }

    def _spawn(self, argv: list[str], att: _Attempt) -> subprocess.Popen[bytes]:
        """Start the trainer in its own process group, stdout and stderr into trainer.log."""
        env = os.environ | {
            "TRAINFLEET_JOB_ID": att.job_id,
            "TRAINFLEET_ATTEMPT": str(att.attempt),
            "TRAINFLEET_OUTPUT_DIR": str(att.out_dir),
            "TRAINFLEET_PROGRESS_FILE": str(att.progress_path),
            "TRAINFLEET_CHECKPOINT_DIR": str(att.checkpoint_dir),
            "TRAINFLEET_RESUME_FROM": att.resume_from,
            "TRAINFLEET_RECEIVER": self.settings.receiver_url,
        }
        env.setdefault("PYTHONUNBUFFERED", "1")  # so heartbeat log tails are live
        devices = self._devices if self._devices is not None else self.settings.visible_devices
        if devices is not None:  # the slot's own GPU (and any it borrowed), or none
            env["CUDA_VISIBLE_DEVICES"] = devices
        return trainer_process.start(argv, self.settings.workdir, env, att.log_path,
                                     self.state_dir)

    def _supervise(
        self,
        child: subprocess.Popen[bytes],
        att: _Attempt,
        timeout_s: float | None,
        interval_s: float,
        uploads: checkpoint.Uploader | None = None,
    ) -> _Outcome:
        """Watch the trainer, heartbeating (and uploading its checkpoints) when due; stop it
        on cancel, 409, timeout or stop."""
        started = time.monotonic()
        next_beat = next_sample = started
        while child.poll() is None:
            now = time.monotonic()
            outcome: _Outcome | None = None
            if uploads is not None and uploads.due(now):
                uploads.start(now)
            if self._stopping:
                outcome = _Outcome.SHUTDOWN
            elif timeout_s is not None and now - started >= timeout_s:
                outcome = _Outcome.TIMEOUT
            elif now >= next_beat:
                self._sample_vram(child)
                outcome = self._beat(att)
                next_beat = now + interval_s
                next_sample = now + VRAM_SAMPLE_S
            elif now >= next_sample:  # so a peak after the last heartbeat is not lost
                self._sample_vram(child)
                next_sample = now + VRAM_SAMPLE_S
            if outcome is not None:
                self._terminate(child)
                return outcome
            self._wake.wait(CHILD_POLL_S)
        return _Outcome.EXITED

    def _beating_while(self, att: _Attempt, interval_s: float, work: Callable[[], None],
                       uploads: checkpoint.Uploader) -> None:
        """Run `work` (the last checkpoint upload) on a thread and heartbeat meanwhile, so a
        large checkpoint on a slow link does not outlast the stale timeout; when a heartbeat
        says the lease is lost or the job cancelled, abandon it and go on."""
        thread = threading.Thread(target=work, name=f"checkpoint-final-{att.short}",
                                  daemon=True)
        thread.start()
        while True:
            thread.join(interval_s)
            if not thread.is_alive():
                return
            if self._beat(att) is not None:
                uploads.abandon()
                return

    def _sample_vram(self, child: subprocess.Popen[bytes]) -> None:
        """Keep the most GPU memory the trainer and its helpers have held on one GPU
        (nvidia-smi): per GPU, as the job's min_vram_gib is declared."""
        if self.capability is None or not self.capability.cuda:
            return
        held = capability.most_vram_on_one_gpu_gib(trainer_process.members(child))
        if held is not None and held > (self._peak_vram_gib or 0.0):
            self._peak_vram_gib = held

    def _beat(self, att: _Attempt) -> _Outcome | None:
        """One heartbeat; the outcome it forces, or None to keep training."""
        try:
            action = self.client.heartbeat(
                att.job_id,
                att.lease,
                progress=read_progress(att.progress_path),
                log_tail=_tail(att.log_path, LOG_TAIL_BYTES),
                peak_vram_gib=self._peak_vram_gib,
                attempt=att.attempt,
                lent_slots=self._lent or None,
            )
        except LeaseLost:
            return _Outcome.FENCED
        except TrainfleetError as exc:
            if isinstance(exc, ReceiverError) and exc.status in (401, 403):
                # The host's token was revoked (its job is already requeued): stop training.
                log.error("job %s: the receiver refused this worker: %s", att.short, exc)
                return _Outcome.FENCED
            # The stale sweep allows minutes; an outage alone must not waste the training.
            log.warning("job %s: heartbeat failed, training on: %s", att.short, exc)
            return None
        return _Outcome.CANCELLED if action == "cancel" else None

    def _terminate(self, child: subprocess.Popen[bytes]) -> None:
        """Stop the trainer's whole group: a polite signal, shutdown_grace_s, then kill."""
        trainer_process.signal_group(child, kill=False)
        try:
            child.wait(timeout=self.settings.shutdown_grace_s)
        except subprocess.TimeoutExpired:
            grace_s = self.settings.shutdown_grace_s
            log.warning(
                "trainer %d ignored the stop signal for %g s; killing it", child.pid, grace_s
            )
        # Kill in any case: helpers the trainer started (data loaders) may outlive it.
        trainer_process.signal_group(child, kill=True)
        child.wait()

    def _report_failure(
        self, att: _Attempt, kind: str, error: str, retryable: bool,
        diagnosis: Diagnosis | None = None,
    ) -> None:
        """Send the log while the lease is surely current, then report the failed attempt
        with its diagnosis, which steers the receiver's retry."""
        self._upload_log(att.job_id, att.lease, att.attempt, att.log_path)
        found = None if diagnosis is None else {
            "cause": diagnosis.cause.value, "signature": diagnosis.signature,
            "peak_vram_gib": self._peak_vram_gib}
        try:
            job = self.client.fail(att.job_id, att.lease, error, retryable, kind, found,
                                   attempt=att.attempt)
        except LeaseLost:
            log.warning("job %s: lease lost; failure (%s) not recorded", att.short, kind)
        except TrainfleetError as exc:
            log.error("job %s: could not report failure (%s): %s", att.short, kind, exc)
        else:
            log.warning("job %s failed (%s); job is now %s", att.short, kind, job.get("status"))

    # --- spool and delivery -------------------------------------------------

    def _spool(self, att: _Attempt) -> Path | None:
        """Bundle the output and record it durably before any upload; the record's path."""
        name = f"{att.job_id}-{att.attempt}"
        try:
            made = bundle.create(att.out_dir, self.spool_dir / f"{name}.bundle")
        except (OSError, ValueError, TrainfleetError) as exc:
            self._report_failure(att, "trainer_error", f"cannot bundle the output: {exc}", True)
            return None
        delivery = _Delivery(
            job_id=att.job_id,
            lease=att.lease,
            attempt=att.attempt,
            artifact_id=made.artifact_id,
            bundle=str(made.path),
            size=made.size,
            metrics=_read_metrics(att.out_dir / "metrics.json"),
            log=str(att.log_path),
            peak_vram_gib=self._peak_vram_gib,
        )
        record = self.spool_dir / f"{name}.json"
        _write_atomic(record, json.dumps(asdict(delivery), indent=2))
        log.info("job %s: bundled %d bytes as %s", att.short, made.size, made.artifact_id[:12])
        return record

    def _deliver_spool(self) -> None:
        """Retry every finished attempt still in the spool (after an outage or a restart)."""
        for record in sorted(self.spool_dir.glob("*.json")):
            if not self._deliver(record):
                break  # the receiver is unreachable: the rest would fail the same way

    def _deliver(self, record: Path) -> bool:
        """Upload, log and complete one spooled attempt; False while the receiver is unreachable.

        Only success or a 409 clears the record. Any other refusal keeps it: a receiver
        fixed later accepts it, or its stale sweep requeues the job and then fences us.
        """
        try:
            d = _Delivery(**json.loads(record.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            log.error("%s: unreadable spool record, set aside: %s", record, exc)
            record.replace(record.with_suffix(".corrupt"))
            return True
        try:
            self._upload_bundle(d)
            self._upload_log(d.job_id, d.lease, d.attempt, Path(d.log))
            self.client.complete(d.job_id, d.lease, d.artifact_id, d.metrics, attempt=d.attempt,
                                 peak_vram_gib=d.peak_vram_gib)
            log.info("job %s: completed with artifact %s", d.job_id[:12], d.artifact_id[:12])
        except LeaseLost as exc:
            log.warning("job %s: %s; its result is discarded", d.job_id[:12], exc.message)
        except ReceiverUnreachable as exc:
            log.warning("job %s: result kept in the spool: %s", d.job_id[:12], exc)
            return False
        except (TrainfleetError, OSError) as exc:
            log.error("job %s: delivery refused, kept in the spool: %s", d.job_id[:12], exc)
            return True
        record.unlink(missing_ok=True)
        Path(d.bundle).unlink(missing_ok=True)
        return True

    def _upload_bundle(self, d: _Delivery) -> None:
        if self.client.has_artifact(d.artifact_id):
            log.info("job %s: artifact %s already stored", d.job_id[:12], d.artifact_id[:12])
            return
        self.client.upload(d.artifact_id, Path(d.bundle), d.job_id, d.lease, attempt=d.attempt)
        log.info("job %s: uploaded %d bytes", d.job_id[:12], d.size)

    def _upload_log(self, job_id: str, lease: str, attempt: int, path: Path) -> None:
        """Best effort: a lost log must never cost a trained model or a failure report."""
        try:
            self.client.upload_log(job_id, lease, attempt, _tail(path, MAX_LOG_BYTES))
        except TrainfleetError as exc:
            log.warning("job %s: trainer log not uploaded: %s", job_id[:12], exc)


def fill_command(template: list[str], values: dict[str, str]) -> list[str]:
    """The trainer's argv: each `{name}` replaced by values[name]; an unknown name is an error."""
    return [_fill_arg(position, arg, values) for position, arg in enumerate(template)]


def _fill_arg(position: int, arg: str, values: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            known = ", ".join(f"{{{key}}}" for key in sorted(values))
            raise TrainfleetError(
                f"trainer.command[{position}] {arg!r}: unknown placeholder {{{name}}}"
                f" (known: {known})",
                detail={"position": position, "placeholder": name},
            )
        return values[name]

    return PLACEHOLDER.sub(substitute, str(arg))


def read_progress(path: Path) -> dict[str, Any] | None:
    """The trainer's progress file as a heartbeat's progress, or None when there is none.

    The trainer may be mid-write or write anything at all, and a bad file must never cost a
    heartbeat: only the known keys with sane values are passed on.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    progress = {key: value for key, value in data.items() if _is_progress_value(key, value)}
    return progress or None


def _is_progress_value(key: str, value: Any) -> bool:
    types = PROGRESS_TYPES.get(key)
    if types is None or isinstance(value, bool) or not isinstance(value, types):
        return False
    if isinstance(value, float):
        return math.isfinite(value)  # NaN is not JSON the receiver can read
    return not isinstance(value, str) or len(value) <= MAX_MESSAGE_CHARS


def _read_metrics(path: Path) -> dict[str, Any]:
    """metrics.json when the trainer wrote a JSON object there; {} otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _tail(path: Path, max_bytes: int) -> str:
    """The last max_bytes of a file as text ("" when unreadable), without reading the rest."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _prepare_run_dir(att: _Attempt, hyper: dict[str, Any]) -> None:
    """A fresh, empty output dir (a rerun attempt must not inherit files) and the hyper JSON."""
    shutil.rmtree(att.run_dir, ignore_errors=True)
    att.out_dir.mkdir(parents=True)
    att.checkpoint_dir.mkdir()
    att.hyper_path.write_text(json.dumps(hyper, indent=2, sort_keys=True), encoding="utf-8")
    att.log_path.touch()


@dataclass(frozen=True)
class SlotSpec:
    """One slot of a host: one of its GPUs, or a CPU-only share of it."""

    name: str  #: "gpu0", "cpu0": the suffix of the slot's worker id
    gpu: Gpu | None  #: None: a CPU slot, whose trainer sees no GPU
    visible_devices: str = ""  #: the trainer's CUDA_VISIBLE_DEVICES

    def narrow(self, cap: Capability) -> Capability:
        """The host's capability as this slot sees it: its own GPU only, or none."""
        if self.gpu is None:
            return dataclasses.replace(cap, cuda=False, gpus=())
        return dataclasses.replace(cap, gpus=(self.gpu,))


def plan_slots(
    cap: Capability, slots: str, cpu_slots: int = 0, inherited_devices: str | None = None
) -> list[SlotSpec]:
    """`--slots auto|N` and `--cpu-slots K` as slots. auto: one per GPU; N: the first N
    GPUs (N CPU slots on a host without CUDA); then K CPU-only slots.

    `inherited_devices` is the worker's own CUDA_VISIBLE_DEVICES: GPU i of the capability
    is its i-th entry, which is what the slot's trainer must be given."""
    gpus = list(cap.gpus) if cap.cuda else []
    if slots == "auto":
        count = max(len(gpus), 1)
    elif slots.isdigit() and int(slots) >= 1:
        count = int(slots)
    else:
        raise TrainfleetError(f"--slots: expected auto or a number >= 1, got {slots!r}")
    if gpus and count > len(gpus):
        raise TrainfleetError(f"--slots: {count} slots, but this host has {len(gpus)} GPU(s)")
    tokens = None if inherited_devices is None else [
        token.strip() for token in inherited_devices.split(",")]
    planned = [SlotSpec(f"gpu{g.index}", g, _device(g.index, tokens)) for g in gpus[:count]] \
        if gpus else [SlotSpec(f"cpu{k}", None) for k in range(count)]
    start = 0 if gpus else count
    return planned + [SlotSpec(f"cpu{k}", None) for k in range(start, start + cpu_slots)]


def _device(index: int, inherited: list[str] | None) -> str:
    return inherited[index] if inherited is not None and index < len(inherited) else str(index)


def _known_free(caps: list[Capability]) -> dict[int, float]:
    """Free memory by GPU index: one nvidia-smi call, or what the capability file says."""
    if any("gpus" not in cap.overridden and cap.gpus for cap in caps):
        return capability.free_vram()
    return {gpu.index: gpu.free_vram_gib for cap in caps for gpu in cap.gpus
            if gpu.free_vram_gib is not None}


def _free_of(gpu: Gpu, known: dict[int, float]) -> float:
    """A GPU's free memory now, or its total when unknown (as the claim goes by)."""
    return known.get(gpu.index, gpu.vram_gib)


def _take(free: dict[_T, float], claim: dict[str, Any], first: _T | None = None) -> list[_T]:
    """The GPUs (or GPU slots) a claimed job runs on, of those offered with their free memory:
    max(gpus, 1) of them with the most free. `first`, the claiming slot, leads when it has
    the memory the job needs, so a one-GPU job does not idle its own slot's GPU."""
    job = claim["job"]
    need = float(job.get("effective_vram_gib") or 0.0)
    ranked = sorted(free, key=lambda k: -free[k])
    if first is not None and free.get(first, -1.0) >= need:
        ranked = [first, *(k for k in ranked if k != first)]
    return ranked[:max(1, int(job.get("gpus") or 0))]


class GpuPool:
    """The GPU slots of one daemon, so a job may take several GPUs of the host at once.

    Claims go one at a time under the lock. A slot offers the receiver the free memory of
    each GPU it can give now, its own and its idle siblings' (no sibling above its own), and
    the pool's size as the host's GPU count (for the receiver's reservation rule). A job with
    gpus = N runs on the slot's GPU and the N-1 siblings with the most free memory (_take),
    which claim nothing until it ends."""

    def __init__(self, slots: list[Worker]) -> None:
        self.lock = threading.Lock()
        #: the slots whose loop runs (self-test passed, run() not returned): only these claim
        #: or are lent; see join/leave
        self.workers: list[Worker] = []
        self._busy: set[int] = set()  #: slots running a job or lent to one, by id()
        self._unchecked = {id(w) for w in slots}  #: slots not yet through their self-test
        self.checked = threading.Event()  #: set once every slot has joined or left
        self._note_checked(None)

    def join(self, worker: Worker) -> None:
        """A slot passed its self-test and starts claiming: it may be offered and lent."""
        with self.lock:
            if worker not in self.workers:
                self.workers.append(worker)
            self._note_checked(worker)

    def leave(self, worker: Worker) -> None:
        """A slot's loop ended (stop, --once/--max-jobs, refused) or its self-test failed:
        lend its GPU no more. If a sibling's job holds it now, that job keeps it to its end."""
        with self.lock:
            if worker in self.workers:
                self.workers.remove(worker)
            self._note_checked(worker)

    def _note_checked(self, worker: Worker | None) -> None:
        if worker is not None:
            self._unchecked.discard(id(worker))
        if not self._unchecked:
            self.checked.set()

    def claim_and_run(self, me: Worker) -> bool:
        """Claim for `me` with the GPUs the host can give now; run the job; True if one ran."""
        with self.lock:
            if id(me) in self._busy:
                return False  # lent to a sibling's job
            idle = [me, *(w for w in self.workers if w is not me and id(w) not in self._busy)]
            caps = [w._capability() for w in idle]
            known = _known_free(caps)
            free = {w: max((_free_of(g, known) for g in cap.gpus), default=0.0)
                    for w, cap in zip(idle, caps, strict=True)}
            # The claiming slot's own GPU is always one of the job's, so a sibling is offered
            # with no more than the slot's own free memory: the N-th best figure then holds
            # for the slot and N-1 siblings (a sibling with more free makes its own offer).
            offer = [min(f, free[me]) for f in free.values()]
            claim = me._claim(me._capability(), offer, max(len(self.workers), 1))
            if claim is None:
                return False
            held = _take(free, claim, me)
            occupied = [me, *(w for w in held if w is not me)]  # `me` even if not in `held`
            self._busy.update(id(w) for w in occupied)
        me._devices = ",".join(w.settings.visible_devices or "" for w in held)
        me._lent = [w.worker_id for w in held if w is not me]
        if held != [me]:
            log.info("job %s takes %d GPU(s): CUDA_VISIBLE_DEVICES=%s",
                     str(claim["job"]["job_id"])[:12], len(held), me._devices)
        try:
            me._run_job(claim)
        finally:
            me._devices, me._lent = None, []
            with self.lock:
                self._busy.difference_update(id(w) for w in occupied)
        return True


class SlotGroup:
    """Several slots of one host in one daemon: each claims and runs on its own thread."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers

    @classmethod
    def build(
        cls, settings: WorkerSettings, make_client: Callable[[], Client], cap: Capability,
        plan: list[SlotSpec],
    ) -> SlotGroup:
        """One Worker per slot: worker id `<id>-<slot>`, its own state dir, its own GPU."""
        state_dir = settings.state_dir.resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        base_id = settings.worker_id or _load_worker_id(state_dir, cap.hostname)
        workers = [
            Worker(dataclasses.replace(
                settings, worker_id=f"{base_id}-{spec.name}", slot=number,
                state_dir=state_dir / "slots" / spec.name, visible_devices=spec.visible_devices,
            ), make_client(), spec.narrow(cap))
            for number, spec in enumerate(plan)
        ]
        gpu_slots = [w for w, spec in zip(workers, plan, strict=True) if spec.gpu is not None]
        pool = GpuPool(gpu_slots)  # each slot joins once its self-test passed
        for worker in gpu_slots:
            worker.pool = pool
        return cls(workers)

    def run(self) -> int:
        """Run every slot until each stops; the worst exit code."""
        codes: dict[int, int] = {}
        threads = [threading.Thread(target=lambda n=n, w=w: codes.__setitem__(n, w.run()),
                                    name=f"slot-{w.settings.slot}", daemon=True)
                   for n, w in enumerate(self.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # short joins, so the main thread still takes signals
                thread.join(0.5)
        return max(codes.values(), default=1)

    def request_stop(self) -> None:
        for worker in self.workers:
            worker.request_stop()

    def install_signal_handlers(self) -> None:
        """Make SIGTERM/SIGINT stop every slot; main thread only."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for signum in _STOP_SIGNALS:
            signal.signal(signum, lambda signum, frame: self.request_stop())


def _load_worker_id(state_dir: Path, hostname: str) -> str:
    """This host's worker id, made once and kept, so a restarted worker keeps its identity."""
    path = state_dir / "worker_id"
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    worker_id = f"{hostname}-{secrets.token_hex(4)}"
    _write_atomic(path, worker_id + "\n")
    return worker_id


def _write_atomic(path: Path, text: str) -> None:
    """Write via a synced temp file and a rename: a crash leaves the old file or the new one."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _describe(cap: Capability) -> str:
    gpus = ", ".join(f"{gpu.name} ({gpu.vram_gib:g} GiB)" for gpu in cap.gpus) or "none"
    return (
        f"host {cap.hostname}: {cap.cpu_count} cores, {cap.ram_gib:g} GiB RAM,"
        f" CUDA {'yes' if cap.cuda else 'no'}, GPUs: {gpus}"
    )

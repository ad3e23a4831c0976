"""A lightweight worker loop for chaos tests: claim, heartbeat, upload, complete, all recorded.

It speaks the real protocol through trainfleet's Client but "trains" by sleeping, so dozens
fit on a small machine. It runs on a thread (`ChaosWorker(...).run()`) or as a process that
tests can SIGKILL or SIGSTOP: `python -m tests.chaos.worker --receiver URL --log FILE ...`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.chaos.history import History, RecordingClient
from trainfleet import bundle
from trainfleet.client import Client
from trainfleet.errors import LeaseLost, ReceiverError, ReceiverUnreachable

MODES = ("normal", "fail-trainer", "fail-timeout", "die-after-claim")


@dataclass(frozen=True)
class Behaviour:
    train_s: float = 0.0  #: how long each job "trains"
    heartbeat_s: float = 0.5
    poll_s: float = 0.1  #: wait after an empty claim or an unreachable receiver
    artifact_kib: int = 1
    unique_every: int = 1  #: every n-th job gets its own artifact; the rest share one
    mode: str = "normal"
    max_jobs: int | None = None
    idle_exit_s: float | None = None  #: stop once claims have come back empty this long
    gate: Path | None = None  #: after the upload, write <gate>/ready-<job> and wait for <gate>/go
    deliver_for_s: float = 60.0  #: how long to keep retrying a delivery the receiver misses


class ChaosWorker:
    def __init__(self, client: Client, history: History, name: str, workdir: Path,
                 behaviour: Behaviour, stop: threading.Event | None = None) -> None:
        self.rc = RecordingClient(client, history, name)
        self.name = name
        self.workdir = workdir
        self.b = behaviour
        self.stop = stop or threading.Event()
        self.capability = {"hostname": f"host-{name}", "os": "linux", "cpu_count": 2,
                           "ram_gib": 8.0, "cuda": False}
        self.jobs_run = 0
        self._shared: bundle.Bundle | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def run(self) -> int:
        idle_since = time.monotonic()
        while not self.stop.is_set():
            if self.b.max_jobs is not None and self.jobs_run >= self.b.max_jobs:
                break
            try:
                claim = self.rc.claim(self.name, self.capability)
            except (ReceiverUnreachable, ReceiverError):
                self.stop.wait(self.b.poll_s)
                continue
            if claim is None:
                if self.b.idle_exit_s is not None and \
                        time.monotonic() - idle_since > self.b.idle_exit_s:
                    break
                self.stop.wait(self.b.poll_s)
                continue
            self.run_job(claim)
            self.jobs_run += 1
            idle_since = time.monotonic()
        return self.jobs_run

    def run_job(self, claim: dict[str, Any]) -> None:
        job_id, lease, attempt = claim["job"]["job_id"], claim["lease"], claim["attempt"]
        if self.b.mode == "die-after-claim":
            os.kill(os.getpid(), signal.SIGKILL)
        if not self._train(job_id, lease, attempt):
            return
        if self.b.mode in ("fail-trainer", "fail-timeout"):
            kind = "trainer_error" if self.b.mode == "fail-trainer" else "timeout"
            self._until_answered(lambda: self.rc.fail(job_id, lease, attempt, kind))
            return
        made = self._artifact(job_id)
        if not self._until_answered(lambda: self.rc.upload(job_id, lease, attempt,
                                                           made.artifact_id, made.path)):
            return  # fenced: the bundle stays out of the store
        if self.b.gate is not None:
            self._wait_gate(job_id)
        self._until_answered(lambda: self.rc.complete(job_id, lease, attempt, made.artifact_id))

    def _train(self, job_id: str, lease: str, attempt: int) -> bool:
        """Sleep train_s, heartbeating; False when fenced or cancelled."""
        deadline = time.monotonic() + self.b.train_s
        while True:
            try:
                if self.rc.heartbeat(job_id, lease, attempt) == "cancel":
                    return False
            except LeaseLost:
                return False
            except (ReceiverUnreachable, ReceiverError):
                pass  # train on: the sweep allows the stale window
            left = deadline - time.monotonic()
            if left <= 0 or self.stop.wait(min(left, self.b.heartbeat_s)):
                return left <= 0

    def _until_answered(self, call: Any) -> bool:
        """Retry a delivery call while the receiver is unreachable; False once refused."""
        deadline = time.monotonic() + self.b.deliver_for_s
        while time.monotonic() < deadline:
            try:
                call()
                return True
            except (LeaseLost, ReceiverError):
                return False
            except ReceiverUnreachable:
                if self.stop.wait(self.b.poll_s):
                    return False
        return False

    def _artifact(self, job_id: str) -> bundle.Bundle:
        """A real bundle whose bytes this worker and job decide, so a zombie's differs."""
        unique = self.b.unique_every <= 1 or self.jobs_run % self.b.unique_every == 0
        if not unique and self._shared is not None:
            return self._shared
        seed = f"{self.name}-{job_id[:16]}" if unique else f"{self.name}-shared"
        out = self.workdir / f"out-{seed}"
        out.mkdir(exist_ok=True)
        (out / "model.bin").write_bytes(random.Random(seed).randbytes(self.b.artifact_kib << 10))
        made = bundle.create(out, self.workdir / f"{seed}.bundle", compression="gzip")
        if not unique:
            self._shared = made
        return made

    def _wait_gate(self, job_id: str) -> None:
        assert self.b.gate is not None
        (self.b.gate / f"ready-{job_id}").write_text(self.name)
        while not (self.b.gate / "go").exists() and not self.stop.wait(0.05):
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.worker")
    p.add_argument("--receiver", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--log", type=Path, required=True, help="history JSONL, appended")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--train-s", type=float, default=0.0)
    p.add_argument("--heartbeat-s", type=float, default=0.5)
    p.add_argument("--artifact-kib", type=int, default=1)
    p.add_argument("--mode", choices=MODES, default="normal")
    p.add_argument("--max-jobs", type=int)
    p.add_argument("--idle-exit-s", type=float)
    p.add_argument("--gate", type=Path)
    args = p.parse_args(argv)
    behaviour = Behaviour(train_s=args.train_s, heartbeat_s=args.heartbeat_s,
                          artifact_kib=args.artifact_kib, mode=args.mode,
                          max_jobs=args.max_jobs, idle_exit_s=args.idle_exit_s, gate=args.gate)
    client = Client(args.receiver, retries=args.retries, backoff_s=0.1, max_backoff_s=1.0,
                    timeout_s=10.0)
    history = History(args.log)
    stop = threading.Event()
    # Event.set from a helper thread: the main thread may hold the event's lock in wait().
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=stop.set).start())
    try:
        ChaosWorker(client, history, args.name, args.workdir, behaviour, stop).run()
    finally:
        history.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

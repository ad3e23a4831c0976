"""`trainfleet demo`: a real fleet on loopback: one receiver, two workers, real training.

Everything runs as real subprocesses of this one; all are stopped (by PID) on the
way out, whatever happens.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from trainfleet import matching
from trainfleet.capability import Capability
from trainfleet.client import Client
from trainfleet.errors import TrainfleetError

DEADLINE_S = 110.0
#: The two demo hosts, as capability overrides: different sizes, neither with CUDA.
HOSTS = {
    "demo-cpu-a": {"hostname": "demo-cpu-a", "cpu_count": 4, "ram_gib": 8, "cuda": False,
                   "gpus": []},
    "demo-cpu-b": {"hostname": "demo-cpu-b", "cpu_count": 2, "ram_gib": 2, "cuda": False,
                   "gpus": []},
}


def run(manifest: Path, keep: Path | None = None) -> int:
    """Run the demo; 0 when every job a demo host can run was trained."""
    workdir = Path.cwd()
    if not manifest.exists():
        raise TrainfleetError(f"{manifest}: no such manifest (run the demo from the checkout)")
    with ExitStack() as stack:
        state = keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tf-demo-")))
        state.mkdir(parents=True, exist_ok=True)
        token_file = state / "operator.token"
        token_file.write_text(secrets.token_hex(16))
        started = time.monotonic()
        url = stack.enter_context(_receiver(manifest, state, token_file))
        print(f"receiver on {url}, state in {state}")
        for name, capability in HOSTS.items():
            stack.enter_context(_worker(url, name, capability, state, workdir))
        client = Client(url, retries=2, backoff_s=0.2)
        jobs, workers = _watch(client, started)
        print(f"\nfinished in {time.monotonic() - started:.0f} s\n")
        _report(client, jobs, workers)
        return 0 if _all_trainable_done(jobs, workers) else 1


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not gone within the grace."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _receiver(manifest: Path, state: Path, token_file: Path) -> Iterator[str]:
    argv = [sys.executable, "-m", "trainfleet", "receiver", "--manifest", str(manifest),
            "--state-dir", str(state / "receiver"), "--port", "0", "--log-level", "warning",
            "--operator-token-file", str(token_file), "--sweep-interval", "5"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if "listening on" not in line:
            raise TrainfleetError(f"the receiver did not start (exit {proc.wait()})")
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        _stop(proc)
        if proc.stdout:
            proc.stdout.close()


@contextmanager
def _worker(
    url: str, name: str, capability: dict[str, Any], state: Path, workdir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    home = state / name
    home.mkdir(parents=True, exist_ok=True)
    cap_file = home / "capability.json"
    cap_file.write_text(json.dumps(capability))
    argv = [sys.executable, "-m", "trainfleet", "worker", "--receiver", url,
            "--workdir", str(workdir), "--state-dir", str(home), "--worker-id", name,
            "--capability-file", str(cap_file), "--poll-interval", "0.5",
            "--heartbeat-interval", "1"]
    # One BLAS/OpenMP thread per trainer: the two demo workers share this machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with open(home / "worker.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"worker {name}: {capability['cpu_count']} cores, {capability['ram_gib']} GiB RAM,"
              f" no GPU (log: {home / 'worker.log'})")
        try:
            yield proc
        finally:
            _stop(proc)


def _watch(client: Client, started: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Print progress until nothing runs and no pending job fits a live worker."""
    last = ""
    while True:
        jobs, workers = client.jobs(), client.workers()
        line = _progress_line(jobs, started)
        if line != last:
            print(line, flush=True)
            last = line
        live = [j for j in jobs if j["status"] in ("claimed", "running")]
        if workers and not live and _all_trainable_done(jobs, workers):
            return jobs, workers
        if time.monotonic() - started > DEADLINE_S:
            print(f"demo: gave up after {DEADLINE_S:.0f} s")
            return jobs, workers
        time.sleep(1.0)


def _progress_line(jobs: list[dict[str, Any]], started: float) -> str:
    done = sum(j["status"] == "completed" for j in jobs)
    running = [
        f"{j['name']} {100 * (j['progress'] or {}).get('fraction', 0):.0f}% on {j['hostname']}"
        for j in jobs if j["status"] in ("claimed", "running")
    ]
    elapsed = time.monotonic() - started
    return f"[{elapsed:5.1f} s] {done}/{len(jobs)} completed; " + ("; ".join(running) or "idle")


def _slots(workers: list[dict[str, Any]]) -> list[matching.Slot]:
    slots = []
    for w in workers:
        if not w["alive"]:
            continue
        allow = w["allow_jobs"]
        policy = matching.Policy(None if allow is None else frozenset(allow),
                                 frozenset(w["deny_jobs"]))
        slots.append(matching.Slot(Capability.from_dict(w["capability"]), w["slot_vram_gib"],
                                   policy))
    return slots


class _JobView:
    """A job resource seen through matching's JobLike fields."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.model: str = job["model"]
        self.priority: int = job["priority"]
        self.require_cuda: bool = job["require_cuda"]
        self.prefer_cuda: bool = job["prefer_cuda"]
        self.min_vram_gib: float = job["min_vram_gib"]
        self.min_ram_gib: float = job["min_ram_gib"]
        self.allowed_hosts: tuple[str, ...] = tuple(job["allowed_hosts"])
        self.prefer_wait_s: float = job["prefer_wait_s"]
        self.manifest_index: int = job["manifest_index"]
        self.effective_vram_gib: float = job.get("effective_vram_gib", self.min_vram_gib)
        self.effective_ram_gib: float = job.get("effective_ram_gib", self.min_ram_gib)
        self.avoid_hosts: tuple[str, ...] = tuple(job.get("avoid_hosts", ()))
        self.gpus: int = job.get("gpus", 0)


def _reasons(job: dict[str, Any], slots: list[matching.Slot]) -> dict[str, list[str]]:
    view = _JobView(job)
    return {s.hostname: matching.hard_reasons(view, s) for s in slots}


def _all_trainable_done(jobs: list[dict[str, Any]], workers: list[dict[str, Any]]) -> bool:
    slots = _slots(workers)
    for job in jobs:
        if job["status"] in ("claimed", "running"):
            return False
        if job["status"] == "pending" and any(not r for r in _reasons(job, slots).values()):
            return False
    return True


def _report(client: Client, jobs: list[dict[str, Any]], workers: list[dict[str, Any]]) -> None:
    print(f"{'job':<32} {'status':<10} {'host':<11} {'accuracy':>8}  artifact")
    for job in jobs:
        accuracy = (job["metrics"] or {}).get("accuracy")
        acc = f"{accuracy:.3f}" if isinstance(accuracy, int | float) else "-"
        artifact = (job["artifact_id"] or "-")[:12]
        print(f"{job['name']:<32} {job['status']:<10} {job['hostname'] or '-':<11} {acc:>8}  "
              f"{artifact}")
    stored = client.models()
    print(f"\n{len(stored)} artifacts in the store:")
    for row in stored:
        print(f"  {row['path']}")
    slots = _slots(workers)
    waiting = [j for j in jobs if j["status"] in ("pending", "unschedulable")]
    if waiting:
        print("\nleft pending (no demo host can run them):")
    for job in waiting:
        print(f"  {job['name']}")
        for host, reasons in _reasons(job, slots).items():
            print(f"    {host}: {'; '.join(reasons)}")


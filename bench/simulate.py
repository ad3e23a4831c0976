"""Figure 6: a simulated lab, with the failure-aware scheduler on and off.

A discrete-event simulation over the real `SqliteQueue` in this process: every claim,
completion and failure is the product's own call, given the simulated clock as `now=`, so
the real matching, retry policy, quarantine and unschedulable marking decide. Nothing
sleeps and nothing trains: a job's duration and how each attempt ends are drawn from a
seeded RNG, and a failure is reported the way the worker reports it (kind, and the cause
and signature of `failures.diagnose` on a synthetic stderr tail, and the peak VRAM).

*Scheduler on* is the product as shipped. *Scheduler off* is a naive FIFO retry: the same
queue with `failure_aware=False` (a failure only uses up an attempt: no raised VRAM, no
avoided host, no code-bug verdict, no quarantine) and workers that claim by total VRAM, not
free VRAM. Every (job, attempt number) draws the same random numbers in both modes, so the
two runs differ only by where and when the scheduler puts attempts.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sqlite3
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import measure, report
from bench.options import Options
from trainfleet.capability import Capability, Gpu
from trainfleet.failures import Cause, diagnose
from trainfleet.manifest import HostSpec, JobSpec, Manifest, ModelSpec, TrainerSpec
from trainfleet.queue.base import Claim, FailureKind
from trainfleet.queue.sqlite import SqliteQueue

HOUR = 3600.0
POLL_S = 300.0  #: an idle slot claims again this often (and whenever an attempt ends)
GIVE_UP_S = 48 * HOUR  #: nothing running and no claim for this long: the rest is stuck
TRANSIENT_RATE = 0.03  #: any attempt, anywhere: a flaky NFS read
TENANT_PERIOD_S = 6 * HOUR  #: the notebook on the shared GPU: 6 h on, 6 h off


@dataclass(frozen=True)
class Host:
    name: str
    gpus: tuple[float, ...]  #: VRAM of each GPU, GiB; one slot per GPU
    ram_gib: float
    cpu_slots: int = 0
    speed: float = 1.0  #: a job's duration is its A100 duration times this
    flaky: float = 0.0  #: share of attempts that die with a hardware error
    tenant_gib: float = 0.0  #: VRAM of GPU 0 a notebook holds half of the time


@dataclass(frozen=True)
class Model:
    name: str
    share: float  #: of the jobs
    require_cuda: bool
    declared_vram_gib: float  #: min_vram_gib in the manifest
    peak_vram_gib: float  #: what it really needs
    ram_gib: float
    median_h: float  #: lognormal duration on an A100 (or the CPU host)
    sigma: float
    bug: str | None = None  #: a real bug: this error ends every attempt, on every host


HOSTS = (
    Host("a100-1", (80.0, 80.0), 512.0),
    Host("a100-2", (80.0, 80.0), 512.0, flaky=0.7),  # one GPU's ECC errors take the box down
    Host("rtx-1", (24.0,), 128.0, speed=1.6),
    Host("rtx-2", (24.0,), 128.0, speed=1.6, tenant_gib=10.0),
    Host("gtx-1", (12.0,), 64.0, speed=2.5),
    Host("cpu-1", (), 256.0, cpu_slots=4),
)
FLAKY_HOST = "a100-2"
MODELS = (
    Model("resnet50", 0.35, True, 8.0, 6.5, 16.0, 0.75, 0.6),
    Model("vit-large", 0.20, True, 20.0, 18.0, 32.0, 2.5, 0.5),
    Model("llm-lora", 0.125, True, 16.0, 30.0, 64.0, 3.0, 0.4),  # declares 16, needs 30
    Model("gbm-tabular", 0.275, False, 0.0, 0.0, 8.0, 0.33, 0.7),
    Model("seg-unet", 0.05, True, 10.0, 8.0, 16.0, 1.5, 0.5, bug="KeyError: 'mask_weights'"),
)
OOM_MODEL, BUG_MODEL, CPU_MODEL = "llm-lora", "seg-unet", "gbm-tabular"
TRACEBACK = ('Traceback (most recent call last):\n  File "/home/lab/train.py", line {line}, '
             'in <module>\n    main()\n  File "/home/lab/train.py", line 88, in main\n'
             "    loss = step(batch)\n")


@dataclass(frozen=True)
class SimSlot:
    worker_id: str
    host: Host
    capability: Capability
    vram_gib: float  #: 0 for a CPU slot
    gpu: int | None

    def tenant_gib(self, t: float) -> float:
        busy = self.gpu == 0 and int(t // TENANT_PERIOD_S) % 2 == 1
        return self.host.tenant_gib if busy else 0.0


@dataclass(frozen=True)
class Outcome:
    ok: bool
    after_s: float
    tail: str = ""
    peak_vram_gib: float | None = None


@dataclass
class Tally:
    attempts: int = 0
    wasted_gpu_h: float = 0.0
    used_gpu_h: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    bug_attempts: int = 0
    oom_attempts: int = 0
    flaky_attempts: int = 0
    flaky_detected_h: float | None = None
    completions: list[float] = field(default_factory=list)  #: when each job completed


def lab_slots() -> list[SimSlot]:
    slots = []
    for host in HOSTS:
        gpus = tuple(Gpu(i, "sim", vram) for i, vram in enumerate(host.gpus))
        cap = Capability(hostname=host.name, os="linux", cpu_count=32, ram_gib=host.ram_gib,
                         cuda=bool(gpus), gpus=gpus, python="3.11.7", version="sim")
        slots += [SimSlot(f"{host.name}/gpu{g.index}", host, cap, g.vram_gib, g.index)
                  for g in gpus]
        slots += [SimSlot(f"{host.name}/cpu{i}", host, cap, 0.0, None)
                  for i in range(host.cpu_slots)]
    return slots


def lab_manifest(n_jobs: int, seed: int) -> tuple[Manifest, dict[str, tuple[Model, float]]]:
    """`n_jobs` jobs over MODELS in a seeded order; each job's model and A100 hours by id.

    GPU hosts deny the CPU model, as a lab keeps its GPUs for GPU work."""
    rng = random.Random(f"lab:{seed}")
    counts = [round(m.share * n_jobs) for m in MODELS]
    counts[0] += n_jobs - sum(counts)
    models = [m for m, c in zip(MODELS, counts, strict=True) for _ in range(c)]
    rng.shuffle(models)
    specs, truth = [], {}
    for i, m in enumerate(models):
        spec = JobSpec(name=f"{m.name}-{i}", model=m.name, mode="sim", hyper={"i": i},
                       seed=seed, require_cuda=m.require_cuda, min_vram_gib=m.declared_vram_gib,
                       min_ram_gib=m.ram_gib, max_attempts=3, manifest_index=i)
        specs.append(spec)
        truth[spec.job_id] = (m, rng.lognormvariate(math.log(m.median_h), m.sigma))
    hosts = {h.name: HostSpec(h.name, None, (CPU_MODEL,)) for h in HOSTS if h.gpus}
    manifest = Manifest(name="simulated-lab", trainer=TrainerSpec(("train",), ("sim",)),
                        models={m.name: ModelSpec(m.name, {"i": "int"}) for m in MODELS},
                        hosts=hosts, jobs=tuple(specs))
    return manifest, truth


def outcome(model: Model, a100_h: float, slot: SimSlot, start: float, rng: random.Random
            ) -> Outcome:
    """How this attempt ends, from the job's truth, the slot and the attempt's own draws."""
    draws = [rng.random() for _ in range(4)]  # drawn in full: equal draws in both modes
    duration = a100_h * HOUR * (slot.host.speed if slot.gpu is not None else 1.0)
    free = slot.vram_gib - slot.tenant_gib(start)
    if model.bug:
        return Outcome(False, duration * (0.01 + 0.04 * draws[0]),
                       TRACEBACK.format(line=211) + f"{model.bug}\n")
    if slot.gpu is not None and model.peak_vram_gib > free:
        tail = (TRACEBACK.format(line=140) + "torch.OutOfMemoryError: CUDA out of memory. "
                f"Tried to allocate 2.00 GiB. GPU {slot.gpu} has a total capacity of "
                f"{slot.vram_gib:.2f} GiB of which 0.31 GiB is free.\n")
        return Outcome(False, duration * 0.1 * draws[1], tail, round(free - 0.3, 2))
    if draws[2] < slot.host.flaky:
        tail = (TRACEBACK.format(line=97) + "RuntimeError: CUDA error: uncorrectable ECC error "
                "encountered\nCUDA kernel errors might be asynchronously reported at some "
                "other API call.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n")
        return Outcome(False, duration * (0.05 + 0.65 * draws[3]), tail)
    if draws[2] - slot.host.flaky < TRANSIENT_RATE * (1 - slot.host.flaky):
        tail = (TRACEBACK.format(line=64) + "OSError: [Errno 5] Input/output error: "
                f"'/nfs/datasets/shard-{int(draws[3] * 1e5):05d}.tar'\n")
        return Outcome(False, duration * draws[3], tail)
    return Outcome(True, duration, peak_vram_gib=model.peak_vram_gib)


def simulate(n_jobs: int, seed: int, scheduler: bool, work: Path) -> dict[str, Any]:
    """One run of the lab until every job is completed or failed for good; its figures."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{'on' if scheduler else 'off'}-{seed}.db"
    queue = SqliteQueue(path, synchronous="OFF", stale_after_s=1e9, failure_aware=scheduler)
    try:
        return _run(queue, n_jobs, seed, scheduler, path)
    finally:
        queue.close()


def _run(queue: SqliteQueue, n_jobs: int, seed: int, scheduler: bool, path: Path
         ) -> dict[str, Any]:
    manifest, truth = lab_manifest(n_jobs, seed)
    queue.sync_manifest(manifest, now=0.0)
    slots = lab_slots()
    tally = Tally()
    running: list[tuple[float, int, int, Claim, Outcome, float]] = []  # heap by end time
    idle = set(range(len(slots)))
    t = last_claim = last_end = 0.0
    seq = 0
    while True:
        for i in sorted(idle):
            slot = slots[i]
            free = None
            if scheduler and slot.gpu is not None:
                free = slot.vram_gib - slot.tenant_gib(t)
            claim = queue.claim_next(slot.worker_id, slot.capability, slot.vram_gib, now=t,
                                     free_vram_gib=free)
            if claim is None:
                continue
            model, a100_h = truth[claim.job.job_id]
            rng = random.Random(f"{seed}:{claim.job.job_id}:{claim.attempt}")
            end = outcome(model, a100_h, slot, t, rng)
            heapq.heappush(running, (t + end.after_s, seq, i, claim, end, t))
            seq += 1
            idle.discard(i)
            last_claim = t
            tally.attempts += 1
            tally.bug_attempts += model.bug is not None
            tally.flaky_attempts += slot.host.name == FLAKY_HOST
        if not running:
            open_jobs = sum(queue.counts()[s] for s in ("pending", "unschedulable"))
            if open_jobs == 0 or t - max(last_claim, last_end) > GIVE_UP_S:
                break
        t = min(running[0][0], t + POLL_S) if running else t + POLL_S
        while running and running[0][0] <= t:
            t_end, _, i, claim, end, started = heapq.heappop(running)
            _report(queue, slots[i], claim, end, t_end, started, tally)
            if not end.ok and slots[i].host.name == FLAKY_HOST \
                    and tally.flaky_detected_h is None and _quarantined(queue, FLAKY_HOST, t_end):
                tally.flaky_detected_h = t_end / HOUR
            idle.add(i)
            last_end = t_end
        if scheduler:
            queue.reschedule(now=t)  # as the receiver's periodic sweep does
    return _figures(queue, path, tally, last_end, n_jobs)


def _report(queue: SqliteQueue, slot: SimSlot, claim: Claim, end: Outcome, now: float,
            started: float, tally: Tally) -> None:
    """Complete or fail the attempt as the worker would."""
    gpu_h = (now - started) / HOUR if slot.gpu is not None else 0.0
    tally.used_gpu_h += gpu_h
    if end.ok:
        queue.complete(claim.job.job_id, claim.lease, "0" * 64, {"sim": True}, now=now)
        tally.completions.append(now)
        return
    tally.wasted_gpu_h += gpu_h
    found = diagnose(1, end.tail)
    tally.failures[found.cause.value] = tally.failures.get(found.cause.value, 0) + 1
    tally.oom_attempts += found.cause is Cause.CUDA_OOM
    last = end.tail.strip().splitlines()[-1]
    queue.fail(claim.job.job_id, claim.lease, f"trainer exited with status 1: {last}", True,
               FailureKind.TRAINER_ERROR, now=now, cause=found.cause,
               signature=found.signature, peak_vram_gib=end.peak_vram_gib)


def _quarantined(queue: SqliteQueue, hostname: str, now: float) -> bool:
    return any(w.quarantined_until for w in queue.workers(now=now) if w.hostname == hostname)


def _figures(queue: SqliteQueue, path: Path, tally: Tally, last_end: float, n_jobs: int
             ) -> dict[str, Any]:
    counts = queue.counts()
    by_model: dict[str, dict[str, int]] = {}
    for job in queue.list_jobs():
        by_model.setdefault(job.model, {}).setdefault(job.status, 0)
        by_model[job.model][job.status] += 1
    with sqlite3.connect(path) as db:  # read only: what the hosts table says at the end
        quarantines = dict(db.execute("SELECT hostname, quarantines FROM hosts").fetchall())
    failed_non_bug = sum(n for model, statuses in by_model.items() if model != BUG_MODEL
                         for status, n in statuses.items() if status == "failed")
    return {
        "jobs": n_jobs,
        "makespan_h": last_end / HOUR,
        "wasted_gpu_h": tally.wasted_gpu_h,
        "used_gpu_h": tally.used_gpu_h,
        "attempts": tally.attempts,
        "completed": counts["completed"],
        "failed": counts["failed"],
        "failed_non_bug": failed_non_bug,
        "left": n_jobs - counts["completed"] - counts["failed"],
        "bug_attempts": tally.bug_attempts,
        "oom_attempts": tally.oom_attempts,
        "flaky_attempts": tally.flaky_attempts,
        "flaky_detected_h": tally.flaky_detected_h,
        "completed_at_h": sorted(t / HOUR for t in tally.completions),
        "failures": tally.failures,
        "quarantines": quarantines,
        "by_model": by_model,
    }


# -- the figure ---------------------------------------------------------------------------

ROWS = (  # key, row name, unit
    ("makespan_h", "makespan", "h"),
    ("common_h", "hours until k jobs completed (k: the fewer of on/off)", "h"),
    ("wasted_gpu_h", "wasted GPU-hours", "GPU-h"),
    ("attempts", "attempts used", "attempts"),
    ("completed", "jobs completed", "jobs"),
    ("failed", "jobs failed for good", "jobs"),
    ("failed_non_bug", "of which not the code bug", "jobs"),
    ("bug_attempts", f"attempts on the code-bug model ({BUG_MODEL})", "attempts"),
    ("oom_attempts", f"CUDA out-of-memory attempts ({OOM_MODEL} mostly)", "attempts"),
    ("flaky_attempts", f"attempts on the flaky host ({FLAKY_HOST})", "attempts"),
)
HIGHER_IS_BETTER = {"completed"}
OFF = "scheduler off (FIFO retry)"


def run(options: Options, work: Path) -> dict[str, Any]:
    """`options.runs` seeds, each simulated with the scheduler on and off; medians."""
    seeds = list(range(1, options.runs + 1))
    on = [simulate(options.sim_jobs, s, True, work) for s in seeds]
    off = [simulate(options.sim_jobs, s, False, work) for s in seeds]
    for a, b in zip(on, off, strict=True):  # like for like: the same number of jobs done
        k = min(a["completed"], b["completed"])
        for r in (a, b):
            r["common_k"] = k
            r["common_h"] = r.pop("completed_at_h")[k - 1] if k else 0.0
    rows = [measure.row("simulate", f"{name}, {options.sim_jobs} jobs", unit,
                        [r[key] for r in on], {OFF: [r[key] for r in off]},
                        higher_is_better=key in HIGHER_IS_BETTER)
            for key, name, unit in ROWS]
    detected = [r["flaky_detected_h"] for r in on if r["flaky_detected_h"] is not None]
    if detected:
        rows.append(measure.row("simulate", f"flaky host quarantined after, {len(detected)}/"
                                f"{len(on)} seeds", "h", detected, higher_is_better=False,
                                note="the scheduler off never detects it"))
    return {"rows": rows, "runs": {"seeds": seeds, "on": on, "off": off}}


def summary(figure: dict[str, Any]) -> str:
    """One line per seed: what each mode did, for the README and the terminal."""
    lines = []
    for seed, on, off in zip(figure["runs"]["seeds"], figure["runs"]["on"],
                             figure["runs"]["off"], strict=True):
        for mode, r in (("on ", on), ("off", off)):
            lines.append(
                f"seed {seed} {mode}: makespan {r['makespan_h']:.1f} h, wasted "
                f"{r['wasted_gpu_h']:.1f} of {r['used_gpu_h']:.1f} GPU-h, {r['attempts']} "
                f"attempts, {r['completed']} completed, {r['failed']} failed, failures "
                f"{json.dumps(r['failures'], sort_keys=True)}, quarantines "
                f"{json.dumps(r['quarantines'], sort_keys=True)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench simulate`: this figure alone, its table and a line per seed."""
    p = argparse.ArgumentParser(prog="python -m bench simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=Options.sim_jobs, help="jobs in the lab (200)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N; medians over them (3)")
    p.add_argument("--json", type=Path, help="also write the figure's results here")
    args = p.parse_args(argv)
    options = Options(runs=args.seeds, sim_jobs=args.jobs)
    with tempfile.TemporaryDirectory(prefix="trainfleet-sim-") as tmp:
        figure = run(options, Path(tmp))
    print(report.table({"figures": {"simulate": figure}}))
    print()
    print(summary(figure))
    ratio = statistics.median(r["makespan_h"] for r in figure["runs"]["on"]) / \
        statistics.median(r["makespan_h"] for r in figure["runs"]["off"])
    print(f"\nmakespan on/off (medians): {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figure, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

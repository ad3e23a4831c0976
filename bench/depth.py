"""Figure 2: claim cost against queue depth, in process (SqliteQueue.claim_next).

Half of the pending jobs are ineligible for the claiming host (CUDA required, other hosts
only, model denied by its host policy), in two layouts: interleaved with the eligible ones,
and ranked ahead of them (so the claim must walk past them all). Each timed claim is handed
back with a retryable failure, untimed, so the depth stays what it says. Every queue is open
at once and each round claims once from each, so a noisy moment hits all depths alike.
Floor: the raw UPDATE … RETURNING claim on a table of the same depth.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import floor, measure, workload
from bench.options import Options
from trainfleet.queue.sqlite import SqliteQueue

NEVER_FAILS = 10**9  #: max_attempts, so the handed-back job stays pending
LAYOUTS = {"interleaved": False, "ineligible ahead": True}


def run(options: Options, work: Path) -> dict[str, Any]:
    claimers: dict[tuple[str, int], Callable[[], float]] = {}
    closers: list[Callable[[], None]] = []
    try:
        for depth in options.depths:
            for layout, ahead in LAYOUTS.items():
                queue = ours_at_depth(options, depth, ahead, work / f"{layout[:5]}-{depth}.db")
                closers.append(queue.close)
                claimers[(layout, depth)] = timed_claim(queue, depth)
            raw = floor.RawQueue(work / f"raw-{depth}.db", options.synchronous)
            closers.append(raw.close)
            raw.load(depth)
            claimers[("raw sqlite", depth)] = timed_raw_claim(raw)
        runs = [one_run(options, claimers) for _ in range(options.runs)]
    finally:
        for close in closers:
            close()
    return {"rows": _rows(options, runs), "runs": [
        {f"{who} {depth}": found for (who, depth), found in r.items()} for r in runs]}


def one_run(options: Options, claimers: dict[tuple[str, int], Callable[[], float]]
            ) -> dict[tuple[str, int], dict[str, float]]:
    latencies: dict[tuple[str, int], list[float]] = {key: [] for key in claimers}
    for _ in range(options.depth_claims):
        for key, claim in claimers.items():
            latencies[key].append(claim())
    return {key: measure.latency_summary(found) for key, found in latencies.items()}


def _rows(options: Options, runs: list[dict[tuple[str, int], dict[str, float]]]
          ) -> list[dict[str, Any]]:
    rows = []
    low, high = min(options.depths), max(options.depths)
    for layout in LAYOUTS:
        for depth in options.depths:
            for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
                rows.append(measure.row(
                    "depth", f"claim_next {label} @{depth:,} ({layout})", "ms",
                    [r[(layout, depth)][key] for r in runs],
                    {"raw sqlite": [r[("raw sqlite", depth)][key] for r in runs]},
                    higher_is_better=False))
        rows.append(measure.row(
            "depth", f"p50 @{high:,} / p50 @{low:,} ({layout})", "x",
            measure.ratios([r[(layout, high)]["p50_ms"] for r in runs],
                           [r[(layout, low)]["p50_ms"] for r in runs]),
            higher_is_better=False, note="claim cost must not grow with depth"))
    return rows


def ours_at_depth(options: Options, depth: int, ahead: bool, path: Path) -> SqliteQueue:
    queue = SqliteQueue(path, synchronous=options.synchronous)
    queue.sync_manifest(workload.manifest(
        workload.half_ineligible(depth, ahead=ahead, max_attempts=NEVER_FAILS)))
    return queue


def timed_claim(queue: SqliteQueue, depth: int) -> Callable[[], float]:
    capability = workload.cpu_capability()

    def claim() -> float:
        t0 = time.perf_counter()
        found = queue.claim_next("bench-depth", capability)
        elapsed = time.perf_counter() - t0
        if found is None:
            raise RuntimeError(f"depth {depth}: nothing eligible to claim")
        queue.fail(found.job.job_id, found.lease, "bench: handed back", retryable=True)
        return elapsed

    return claim


def timed_raw_claim(queue: floor.RawQueue) -> Callable[[], float]:
    def claim() -> float:
        t0 = time.perf_counter()
        claimed = queue.claim()
        elapsed = time.perf_counter() - t0
        if claimed is None:
            raise RuntimeError("raw depth: empty")
        queue.db.execute("UPDATE jobs SET status = 'pending' WHERE job_id = ?", (claimed[0],))
        return elapsed

    return claim

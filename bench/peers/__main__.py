"""`python -m bench.peers`: the Python queue libraries on trainfleet's claim workload.

Issue 8, item 6: huey (SqliteHuey), RQ (Worker and SimpleWorker, on a redis-server the run
starts on loopback) and the raw PostgreSQL SKIP LOCKED loop of figure 7, each against
trainfleet's own in-process SqliteQueue loop measured in the same run. In process, no HTTP,
every store as durable as the library lets it be. Optional extras: a peer whose library or
server is missing is skipped with the reason printed. See bench/README.md, "Peers (item 6)".
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

from bench import measure
from bench.peers.rq_side import Rq
from bench.peers.sides import Huey, Ours, Side, SkipLocked

PEERS: dict[str, Callable[[], Side]] = {
    "huey": Huey, "rq": lambda: Rq("fork"), "rq-simple": lambda: Rq("simple"),
    "postgres": SkipLocked}
UNAVAILABLE = {"huey": Huey.unavailable, "rq": Rq.unavailable, "rq-simple": Rq.unavailable,
               "postgres": SkipLocked.unavailable}
RESULTS = Path(__file__).resolve().parent.parent / "results"


def run(jobs: int, seconds: float, workers: tuple[int, ...], runs: int, peers: tuple[str, ...],
        log: TextIO = sys.stderr) -> dict[str, Any]:
    """Every available side, `runs` times for each W, back to back, the order alternating."""
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp, ExitStack() as stack:
        sides: list[Side] = [stack.enter_context(Ours())]
        for key in peers:
            reason = UNAVAILABLE[key]()
            if reason is None:
                try:
                    sides.append(stack.enter_context(PEERS[key]()))
                    continue
                except Exception as exc:  # a server that would not start: skip, say why
                    reason = f"could not start: {exc}"
            skipped[key] = reason
            print(f"skipped {key}: {reason}", file=log, flush=True)
        found: dict[str, dict[str, list[dict[str, Any]]]] = {
            f"W={w}": {side.name: [] for side in sides} for w in workers}
        for r in range(runs):
            for n, w in enumerate(workers):
                order = sides if (r + n) % 2 == 0 else sides[::-1]
                for side in order:
                    work = Path(tmp) / f"{slug(side.name)}-{r}-{w}"
                    work.mkdir()
                    result = side.cycle(jobs, seconds, w, work)
                    found[f"W={w}"][side.name].append(result)
                    print(f"run {r + 1}/{runs} W={w} {side.name}: "
                          f"{result['jobs_per_s']:.0f} jobs/s, {result['completed']} done, "
                          f"exactly once: {bool(result['exactly_once'])}", file=log, flush=True)
        durability = {side.name: side.durability for side in sides}
    ours = Ours.name
    rows = [measure.row("peers", f"{name} W={w}", "jobs/s",
                        [r["jobs_per_s"] for r in found[f"W={w}"][ours]],
                        {name: [r["jobs_per_s"] for r in by]})
            for w in workers for name, by in found[f"W={w}"].items() if name != ours]
    return {"jobs": jobs, "seconds": seconds, "workers": list(workers), "runs_each": runs,
            "skipped": skipped, "durability": durability, "rows": rows, "runs": found}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table(results: dict[str, Any]) -> str:
    """A line per W for trainfleet, and per peer: its jobs/s and trainfleet's ratio to it."""
    lines = [f"{'side':<34} {'jobs/s median (min–max)':>26} {'trainfleet/peer':>22}  once"]
    ours = Ours.name
    for w in results["workers"]:
        by = results["runs"][f"W={w}"]
        for name, runs in by.items():
            rate = measure.spread([r["jobs_per_s"] for r in runs])
            once = all(r["exactly_once"] for r in runs)
            ratio = ""
            if name != ours:
                spread = measure.spread(measure.ratios([r["jobs_per_s"] for r in by[ours]],
                                                       [r["jobs_per_s"] for r in runs]))
                ratio = f"{spread['median']:.2f} ({spread['min']:.2f}–{spread['max']:.2f})"
            jobs_s = f"{rate['median']:.0f} ({rate['min']:.0f}–{rate['max']:.0f})"
            lines.append(f"{name + f' W={w}':<34} {jobs_s:>26} {ratio:>22}  "
                         f"{'yes' if once else 'NO'}")
    lines.append("")
    lines += [f"durability, {name}: {setting}" for name, setting in results["durability"].items()]
    lines += [f"skipped {key}: {reason}" for key, reason in results["skipped"].items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--jobs", type=int, default=8000, help="jobs pre-loaded per run")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="a run stops after this long (0: when drained; default 3)")
    parser.add_argument("--workers", default="1,4", help="W values (default 1,4)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"any of {','.join(PEERS)} (default all)")
    parser.add_argument("--out", type=Path,
                        help="results JSON (default bench/results/<date>-peers.json)")
    args = parser.parse_args(argv)
    peers = tuple(p for p in args.peers.split(",") if p)
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"--peers: unknown {', '.join(sorted(unknown))}")
    workers = tuple(int(w) for w in args.workers.split(","))
    results = run(args.jobs, args.seconds, workers, args.runs, peers)
    print(table(results))
    out = args.out or RESULTS / f"{datetime.date.today().isoformat()}-peers.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

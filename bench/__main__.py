"""`python -m bench`: run the benchmarks, print ours / floor / ratio and the goals, save JSON.

Quick: `python -m bench --quick`; one figure: `--figures claim`; the simulated lab alone, with a
line per seed: `python -m bench simulate`; see bench/README.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from pathlib import Path
from types import FrameType

from bench import report, suite
from bench.options import FIGURES, QUICK, Options


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in text.split(",") if part)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = set(names) - set(FIGURES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown figure(s) {sorted(unknown)}; "
                                         f"choose from {', '.join(FIGURES)}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes, 3 runs (about 1.5 min)")
    p.add_argument("--figures", type=_names, help=f"comma-separated, of: {', '.join(FIGURES)}")
    p.add_argument("--runs", type=int, help="runs per figure (median, min–max); default 5")
    p.add_argument("--claim-jobs", type=int, help="jobs pre-loaded per claim run (10,000)")
    p.add_argument("--claim-seconds", type=float,
                   help="a claim run stops after this long; 0 = when all jobs are done (3)")
    p.add_argument("--workers", type=_ints, dest="claim_workers", help="W values (1,4,16,64)")
    p.add_argument("--depths", type=_ints, help="pending jobs (100,10000,100000)")
    p.add_argument("--upload-mib", type=int, help="bundle size (512)")
    p.add_argument("--reload-sizes", type=_ints, help="jobs per reload (1000,10000,100000)")
    p.add_argument("--load-sizes", type=_ints, help="jobs per TOML manifest parsed (1000,10000)")
    p.add_argument("--sim-jobs", type=int, help="jobs in the simulated lab (200)")
    p.add_argument("--pg-workers", type=_ints, dest="pg_workers",
                   help="W values of the PostgreSQL claim cycle (1,4,16)")
    p.add_argument("--idle-window", type=float, dest="idle_window_s",
                   help="seconds per idle-worker measurement window (10)")
    p.add_argument("--http", choices=["auto", "h11", "httptools"],
                   help="uvicorn HTTP implementation for every server (auto, as the CLI)")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], help="uvicorn event loop")
    p.add_argument("--synchronous", choices=["FULL", "NORMAL"],
                   help="SQLite synchronous; NORMAL is a what-if the product does not ship")
    p.add_argument("--out", type=Path, help="results file (default bench/results/<date>.json, "
                   "or <date>-custom.json when any size or figure differs from the full run)")
    return p


def options_from(args: argparse.Namespace) -> Options:
    options = QUICK if args.quick else Options()
    changes = {name: getattr(args, name) for name in (
        "runs", "claim_jobs", "claim_seconds", "claim_workers", "depths", "upload_mib",
        "reload_sizes", "load_sizes", "idle_window_s", "http", "loop", "synchronous",
        "sim_jobs", "pg_workers")
        if getattr(args, name) is not None}
    if args.figures:
        changes["figures"] = args.figures
    return replace(options, **changes)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds, so every started process is stopped


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        from bench import simulate

        return simulate.main(argv[1:])
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    results = suite.run(options_from(args), args.out)
    print()
    print(f"trainfleet benchmarks, {results['date']}: {results['machine']['cpus']} CPUs, "
          f"uvicorn http={results['machine']['http']} loop={results['machine']['loop']}, "
          f"SQLite synchronous={results['machine']['synchronous']}"
          + (" (what-if, not the product's setting)" if results["machine"]["what_if"] else ""))
    print()
    print(report.table(results))
    print()
    print(report.goals_text(results["goals"]))
    print()
    print(report.load_text(results))
    for name, figure in results["figures"].items():
        if figure.get("skipped"):
            print(f"\nfigure {name} skipped: {figure['skipped']}")
    for name, error in results["errors"].items():
        print(f"\nfigure {name} failed:\n{error}")
    print(f"\nwritten to {results['out']} in {results['duration_s']:.0f} s")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

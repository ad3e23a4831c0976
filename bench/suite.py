"""Runs the chosen figures in a temporary directory and writes bench/results/<date>.json.

A figure that fails is recorded with its error and the others still run.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import report
from bench.options import Options

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run(options: Options, out: Path | None = None, log: Any = sys.stderr) -> dict[str, Any]:
    """Every figure of `options`; the results as written to `out` (default: a dated file,
    `<date>.json` for the full run and `<date>-custom.json` for any other)."""
    started = time.time()
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(options),
        "options": asdict(options),
        "figures": {},
        "errors": {},
    }
    with tempfile.TemporaryDirectory(prefix="trainfleet-bench-") as tmp:
        for name in options.figures:
            print(f"== {name}", file=log, flush=True)
            t0 = time.monotonic()
            work = Path(tmp) / name
            work.mkdir()
            try:
                module = importlib.import_module(f"bench.{name}")
                extra = {"claim": results["figures"].get("claim")} if name == "footprint" else {}
                results["figures"][name] = module.run(options, work, **extra)
            except Exception as exc:  # record it; the other figures still say something
                results["errors"][name] = "".join(traceback.format_exception(exc))
                print(results["errors"][name], file=log, flush=True)
            results.setdefault("load", {})[name] = load()
            print(f"   {time.monotonic() - t0:.0f} s", file=log, flush=True)
    results["duration_s"] = time.time() - started
    results["goals"] = report.goals(results)
    suffix = "" if options == Options() else "-custom"
    out = out or RESULTS_DIR / f"{results['date']}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    results["out"] = str(out)
    return results


def machine(options: Options) -> dict[str, Any]:
    """Where the figures come from, including what uvicorn's "auto" picks here."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "http": resolved(options.http, "httptools", "h11"),
        "loop": resolved(options.loop, "uvloop", "asyncio"),
        "synchronous": options.synchronous.upper(),
        "what_if": options.what_if,
        "versions": versions(),
    }


def load() -> dict[str, float]:
    """How busy the machine was, from the kernel: other work here skews every figure."""
    found: dict[str, float] = {}
    try:
        found["loadavg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
        for kind in ("cpu", "io"):
            some = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
            found[f"{kind}_pressure_avg60_pct"] = float(some.split()[2].split("=")[1])
    except (OSError, ValueError, IndexError):
        pass
    return found


def resolved(choice: str, fast: str, fallback: str) -> str:
    if choice != "auto":
        return choice
    try:
        importlib.import_module(fast)
    except ImportError:
        return fallback
    return fast


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("trainfleet", "fastapi", "starlette", "uvicorn", "pydantic", "h11",
                 "httptools", "uvloop"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found

"""Samples reduced to what the report prints: median, min and max of runs, and percentiles."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

MIB = 1 << 20


def spread(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of one figure's runs, with the runs themselves."""
    values = [float(v) for v in samples]
    if not values:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def ratios(ours: Sequence[float], floor: Sequence[float]) -> list[float]:
    """Per-run ratios ours/floor: each pair was measured back to back, so noise mostly cancels."""
    return [o / f for o, f in zip(ours, floor, strict=True) if f]


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile q (0..100) of values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of latencies given in seconds, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "max_ms": max(ms, default=float("nan")), "count": len(ms)}


def row(
    figure: str,
    name: str,
    unit: str,
    ours: Sequence[float],
    floors: dict[str, Sequence[float]] | None = None,
    *,
    higher_is_better: bool = True,
    note: str = "",
) -> dict[str, Any]:
    """One line of the report: our runs, each floor's runs, and the per-run ratios to each."""
    return {
        "figure": figure,
        "name": name,
        "unit": unit,
        "higher_is_better": higher_is_better,
        "ours": spread(ours),
        "floors": [
            {"name": floor_name, **spread(runs), "ratio": spread(ratios(ours, runs))}
            for floor_name, runs in (floors or {}).items()
        ],
        "note": note,
    }

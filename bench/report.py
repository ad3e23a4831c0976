"""The printed table and the goals of issue 8, each marked PASS or MISS, from a run's results."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

Results = dict[str, Any]


def number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def spread_text(spread: dict[str, Any]) -> str:
    if spread.get("median") is None:
        return "-"
    if len(spread["runs"]) == 1:
        return number(spread["median"])
    return f"{number(spread['median'])} ({number(spread['min'])}–{number(spread['max'])})"


def table(results: Results) -> str:
    """One line per figure row, and one more per extra floor; ratios are per-run ours/floor."""
    head = ("figure", "unit", "ours (median, min–max)", "floor", "floor (median, min–max)",
            "ours/floor")
    lines: list[tuple[str, ...]] = [head]
    for figure in results["figures"].values():
        for row in figure.get("rows", []):
            floors = row["floors"] or [None]
            for n, floor in enumerate(floors):
                first = n == 0
                lines.append((
                    row["name"] if first else "",
                    row["unit"] if first else "",
                    spread_text(row["ours"]) if first else "",
                    floor["name"] if floor else "",
                    spread_text(floor) if floor else "",
                    spread_text(floor["ratio"]) if floor else "",
                ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     .rstrip() for line in lines)


# -- goals -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    text: str
    measure: Callable[[Results], float | None]
    limit: float
    at_least: bool  #: True: measured >= limit passes; False: measured <= limit passes

    def judge(self, results: Results) -> dict[str, Any]:
        try:
            value = self.measure(results)
        except (LookupError, TypeError, StopIteration):
            value = None
        if value is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if (value >= self.limit if self.at_least else
                                 value <= self.limit) else "MISS"
        return {"goal": self.text, "measured": value, "verdict": verdict}


def rows(results: Results) -> Iterator[dict[str, Any]]:
    for figure in results["figures"].values():
        yield from figure.get("rows", [])


def find(results: Results, name: str) -> dict[str, Any]:
    for row in rows(results):
        if row["name"] == name:
            return row
    raise LookupError(name)


def ratio(name: str, floor: str) -> Callable[[Results], float | None]:
    def measured(results: Results) -> float | None:
        for f in find(results, name)["floors"]:
            if f["name"] == floor:
                return f["ratio"]["median"]  # type: ignore[no-any-return]
        raise LookupError(floor)
    return measured


def ours(name: str, key: str = "median") -> Callable[[Results], float | None]:
    return lambda results: find(results, name)["ours"][key]


def double_completions(results: Results) -> float | None:
    runs = results["figures"]["claim"]["runs"]
    found = [r for w, by in runs.items() if w.startswith("W=") for r in by["ours"]]
    if not found:
        return None
    return float(sum(r["double_completions"] + (1 - r["exactly_once"]) for r in found))


def upload_ratio(results: Results) -> float | None:
    row = next(r for r in rows(results) if r["figure"] == "upload" and r["unit"] == "MiB/s")
    found = next(f["ratio"]["median"] for f in row["floors"] if f["name"] == "plain write+fsync")
    return None if found is None else float(found)


def upload_growth(results: Results) -> float | None:
    row = next(r for r in rows(results) if r["figure"] == "upload" and r["unit"] == "MiB")
    return row["ours"]["max"]  # type: ignore[no-any-return]


def pg_exactly_once(results: Results) -> float | None:
    """Runs of the PostgreSQL figure, either side, that were not exactly once."""
    runs = results["figures"]["postgres"]["runs"]
    found = [r for by in runs.values() for side in by.values() for r in side]
    if not found:
        return None
    return float(sum(r["double_completions"] + (1 - r["exactly_once"]) for r in found))


GOALS = [
    Goal("claim cycle >= 0.6 x starlette+sqlite floor at W=16",
         ratio("claim cycle W=16", "starlette+sqlite"), 0.6, True),
    Goal("claim cycle >= 0.6 x starlette+sqlite floor at W=64",
         ratio("claim cycle W=64", "starlette+sqlite"), 0.6, True),
    Goal("claim p99 <= 30 ms at W=16 (median of runs)", ours("claim p99 W=16"), 30.0, False),
    Goal("claim max <= 200 ms at W=16 (worst run)", ours("claim max W=16", "max"), 200.0, False),
    Goal("0 double completions (and every run exactly once)", double_completions, 0.0, False),
    Goal("claim p50 @100,000 <= 1.5 x p50 @100, ineligible interleaved",
         ours("p50 @100,000 / p50 @100 (interleaved)"), 1.5, False),
    Goal("claim p50 @100,000 <= 1.5 x p50 @100, ineligible ranked ahead",
         ours("p50 @100,000 / p50 @100 (ineligible ahead)"), 1.5, False),
    Goal("upload >= 0.8 x plain write+fsync", upload_ratio, 0.8, True),
    Goal("upload peak RSS growth <= 10 MiB (worst run)", upload_growth, 10.0, False),
    Goal("postgresql claim cycle >= 0.6 x raw SKIP LOCKED loop at W=1",
         ratio("postgresql claim cycle W=1", "raw skip locked"), 0.6, True),
    Goal("postgresql claim cycle >= 0.6 x raw SKIP LOCKED loop at W=4",
         ratio("postgresql claim cycle W=4", "raw skip locked"), 0.6, True),
    Goal("postgresql claim cycle >= 0.6 x raw SKIP LOCKED loop at W=16",
         ratio("postgresql claim cycle W=16", "raw skip locked"), 0.6, True),
    Goal("postgresql: every run exactly once, both sides", pg_exactly_once, 0.0, False),
    Goal("sync of 10,000 jobs <= 1 s", ours("sync 10,000 jobs into an empty queue"), 1.0, False),
    Goal("idempotent sync of 10,000 jobs <= 0.5 s", ours("sync 10,000 jobs again (idempotent)"),
         0.5, False),
    Goal("receiver idle RSS <= 60 MiB", ours("receiver RSS, idle"), 60.0, False),
    Goal("worker idle CPU <= 1 % of a core (poll 10 s, the default)",
         ours("worker CPU, idle (poll 10 s)"), 1.0, False),
    Goal("worker idle CPU <= 1 % of a core (poll 1 s)", ours("worker CPU, idle (poll 1 s)"),
         1.0, False),
]


def goals(results: Results) -> list[dict[str, Any]]:
    return [goal.judge(results) for goal in GOALS]


def goals_text(judged: list[dict[str, Any]]) -> str:
    width = max(len(g["goal"]) for g in judged)
    return "\n".join(f"{g['verdict']:<4}  {g['goal']:<{width}}  measured {number(g['measured'])}"
                     for g in judged)


def load_text(results: Results) -> str:
    """The machine's load at the end of each figure: a busy machine lowers every figure."""
    parts = []
    for name, found in results.get("load", {}).items():
        if "cpu_pressure_avg60_pct" in found:
            parts.append(f"{name} {found['loadavg_1m']:.1f} "
                         f"(cpu {found['cpu_pressure_avg60_pct']:.0f}%, "
                         f"io {found['io_pressure_avg60_pct']:.0f}%)")
        elif "loadavg_1m" in found:
            parts.append(f"{name} {found['loadavg_1m']:.1f}")
    cpus = results["machine"]["cpus"]
    return (f"load average after each figure on {cpus} CPUs (CPU and IO pressure, share of "
            f"time some task waited, last 60 s): " + ", ".join(parts))

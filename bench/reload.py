"""Figure 4: manifest reload, `SqliteQueue.sync_manifest` of n jobs into an empty queue, then
the same manifest again (idempotent: nothing changes); and parsing the manifest from TOML.

Floors: the raw `executemany` INSERT of the same rows into the same schema in one
transaction; reading back every id with its mutable fields (the least a no-op reload must
do); `tomllib.loads` of the same text.
"""

from __future__ import annotations

import sqlite3
import time
import tomllib
from pathlib import Path
from typing import Any

from bench import measure, workload
from bench.options import Options
from trainfleet import manifest as manifest_mod
from trainfleet.manifest import Manifest
from trainfleet.queue import sqlite as sqlite_queue
from trainfleet.queue.sqlite import SqliteQueue


def run(options: Options, work: Path) -> dict[str, Any]:
    rows, details = [], {}
    for n in options.reload_sizes:
        manifest = workload.manifest(workload.half_ineligible(n))
        runs = [reload_once(options, manifest, work / f"reload-{n}-{r}")
                for r in range(options.runs)]
        details[str(n)] = runs

        def pick(key: str, runs: list[dict[str, float]] = runs) -> list[float]:
            return [r[key] for r in runs]

        rows.append(measure.row("reload", f"sync {n:,} jobs into an empty queue", "s",
                                pick("first_s"), {"raw insert": pick("raw_insert_s")},
                                higher_is_better=False))
        rows.append(measure.row("reload", f"sync {n:,} jobs, first, rate", "jobs/s",
                                [n / s for s in pick("first_s")],
                                {"raw insert": [n / s for s in pick("raw_insert_s")]}))
        rows.append(measure.row("reload", f"sync {n:,} jobs again (idempotent)", "s",
                                pick("second_s"), {"raw read-back": pick("raw_read_s")},
                                higher_is_better=False))
    for n in options.load_sizes:
        text = workload.manifest_toml(workload.half_ineligible(n))
        loads = [load_once(text) for _ in range(options.runs)]
        details[f"load {n}"] = loads
        rows.append(measure.row("reload", f"load {n:,}-job manifest (TOML + checks)", "s",
                                [r["load_s"] for r in loads],
                                {"tomllib.loads": [r["tomllib_s"] for r in loads]},
                                higher_is_better=False))
    return {"rows": rows, "runs": details}


def reload_once(options: Options, manifest: Manifest, work: Path) -> dict[str, float]:
    work.mkdir(parents=True)
    queue = SqliteQueue(work / "q.db", synchronous=options.synchronous)
    try:
        t0 = time.perf_counter()
        first = queue.sync_manifest(manifest)
        t1 = time.perf_counter()
        second = queue.sync_manifest(manifest)
        t2 = time.perf_counter()
    finally:
        queue.close()
    if first.added != len(manifest.jobs) or second.unchanged != len(manifest.jobs):
        raise RuntimeError(f"reload: first {first}, second {second}")
    raw_insert_s, raw_read_s = raw_floor(options, manifest, work / "raw.db")
    return {"first_s": t1 - t0, "second_s": t2 - t1, "raw_insert_s": raw_insert_s,
            "raw_read_s": raw_read_s}


def raw_floor(options: Options, manifest: Manifest, path: Path) -> tuple[float, float]:
    """Insert the same rows (prepared beforehand) into the same schema, then read them back."""
    SqliteQueue(path, synchronous=options.synchronous).close()  # the schema
    now = time.time()
    rows = [{**sqlite_queue._spec_row(spec), "now": now} for spec in manifest.jobs]
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA synchronous = {options.synchronous}")
    try:
        t0 = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.executemany(sqlite_queue.INSERT_JOB, rows)
        db.execute("COMMIT")
        t1 = time.perf_counter()
        fields = ", ".join(sqlite_queue.MUTABLE_FIELDS)
        found = {row[0]: row for row in db.execute(f"SELECT job_id, {fields} FROM jobs")}
        t2 = time.perf_counter()
    finally:
        db.close()
    if len(found) != len(rows):
        raise RuntimeError("raw reload floor: rows missing")
    return t1 - t0, t2 - t1


def load_once(text: str) -> dict[str, float]:
    t0 = time.perf_counter()
    manifest_mod.loads(text, source="bench.toml")
    t1 = time.perf_counter()
    tomllib.loads(text)
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "tomllib_s": t2 - t1}

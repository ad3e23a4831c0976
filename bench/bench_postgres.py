"""Claim throughput when scaling out: one receiver on SQLite, one and two on PostgreSQL.

`python -m bench.bench_postgres [--runs N] [--seconds S] [--workers W] [--out FILE]`

Each run starts real `trainfleet receiver` processes (the CLI, tokens on) on a fresh database,
lets W clients (bench.loadgen, in their own processes, split evenly over the receivers) loop
claim → heartbeat → complete for S seconds, stops everything, and checks in the database that
every job completed exactly once. PostgreSQL is a throwaway cluster (tests/pg.py) with fsync
on, so it pays for durability as SQLite with synchronous=FULL does. Figures are the median of
the runs, min–max beside it. All processes share this machine's cores: on a 2-core box the
database server, the receivers and the load generators compete for them, so the two-receiver
figure shows what a second receiver buys when CPU, not the database, is the limit.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg

from bench import process, workload
from bench.claim import OPERATOR_TOKEN, WORKER_TOKEN, run_loadgen, upload_one_artifact
from bench.options import Options
from tests.pg import Cluster

JOBS = 30_000  #: pre-loaded per run: more than any setup here claims in a run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_postgres")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=16, help="clients in all (default 16)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    options = Options(runs=args.runs, claim_seconds=args.seconds)
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp, Cluster(durable=True) as pg:
        work = Path(tmp)
        manifest = workload.write_manifest(
            work / "claim.toml", (workload.eligible_job(i) for i in range(JOBS + 1)))
        setups = {"sqlite, 1 receiver": (None, 1), "postgresql, 1 receiver": (pg, 1),
                  "postgresql, 2 receivers": (pg, 2)}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in setups}
        for r in range(args.runs):
            for name, (cluster, receivers) in setups.items():  # interleaved: drift hits all
                run_dir = work / f"{re.sub(r'[^a-z0-9]+', '-', name)}-{r}"
                results[name].append(run_once(options, manifest, cluster, receivers,
                                              args.workers, run_dir))
    report = {name: summary(runs) for name, runs in results.items()}
    for name, row in report.items():
        print(f"{name:<26} {row['jobs_per_s']:>7.0f} claim cycles/s "
              f"(min {row['min']:.0f}, max {row['max']:.0f}; p99 claim {row['p99_ms']:.1f} ms; "
              f"exactly once: {row['exactly_once']})")
    if args.out:
        args.out.write_text(json.dumps({"summary": report, "runs": results}, indent=2))
    return 0


def run_once(options: Options, manifest: Path, cluster: Cluster | None, receivers: int,
             workers: int, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True)
    db = cluster.fresh_database("bench") if cluster else f"sqlite:///{work / 'queue.db'}"
    (work / "worker.token").write_text(WORKER_TOKEN)
    (work / "operator.token").write_text(OPERATOR_TOKEN)
    with ExitStack() as stack:
        ports = [start_receiver(stack, manifest, db, work, i) for i in range(receivers)]
        artifact_id = upload_one_artifact(ports[0], work)
        shares = [workers // receivers + (i < workers % receivers) for i in range(receivers)]
        started = time.perf_counter()
        answers = run_loadgens(options, ports, shares, artifact_id, work)
        elapsed = time.perf_counter() - started
    completed = sum(a["completed"] for a in answers)
    return {"completed": completed, "elapsed_s": max(a["elapsed_s"] for a in answers),
            "wall_s": elapsed,
            "jobs_per_s": sum(a["jobs_per_s"] for a in answers),
            "p99_ms": max(a["p99_ms"] for a in answers),
            "exactly_once": exactly_once(db, completed + 1)}


def start_receiver(stack: ExitStack, manifest: Path, db: str, work: Path, i: int) -> int:
    argv = process.python(
        "-m", "trainfleet", "receiver", "--manifest", str(manifest), "--db", db,
        "--state-dir", str(work / f"state-{i}"), "--store", str(work / "models"),
        "--port", "0", "--worker-token-file", str(work / "worker.token"),
        "--operator-token-file", str(work / "operator.token"), "--log-level", "warning")
    server = stack.enter_context(process.started(argv, work / f"receiver-{i}.log"))
    port = int(server.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)", 120).group(1))
    process.wait_http_ok(port, "/v1/health", server)
    return port


def run_loadgens(options: Options, ports: list[int], shares: list[int], artifact_id: str,
                 work: Path) -> list[dict[str, Any]]:
    """One load generator per receiver, all running at once."""
    from concurrent.futures import ThreadPoolExecutor

    for i in range(len(ports)):
        (work / f"gen-{i}").mkdir()
    with ThreadPoolExecutor(len(ports)) as pool:
        futures = [pool.submit(run_loadgen, options, port, share, artifact_id, WORKER_TOKEN,
                               work / f"gen-{i}") for i, (port, share) in
                   enumerate(zip(ports, shares, strict=True))]
        return [f.result() for f in futures]


def exactly_once(db: str, acknowledged: int) -> bool:
    """Every acknowledged completion is in the database once, and nothing was claimed twice."""
    checks = ("SELECT count(*) FROM jobs WHERE status = 'completed'",
              "SELECT count(*) FROM events WHERE kind = 'completed'",
              "SELECT count(*) FROM attempts WHERE attempt > 1")
    if db.startswith("postgresql://"):
        with psycopg.connect(db) as conn:
            found = [conn.execute(sql).fetchone()[0] for sql in checks]  # type: ignore[index]
    else:
        import sqlite3

        conn = sqlite3.connect(db.removeprefix("sqlite:///"))
        found = [conn.execute(sql).fetchone()[0] for sql in checks]
        conn.close()
    return found == [acknowledged, acknowledged, 0]


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["jobs_per_s"] for r in runs]
    return {"jobs_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "exactly_once": all(r["exactly_once"] for r in runs)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

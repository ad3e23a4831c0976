"""Where figure 7's time goes: CPU per claim cycle, ours and the raw SKIP LOCKED floor.

`python -m bench.postgres_profile [--cycles 3000]`: one worker (W=1), in process, on a durable
throwaway cluster with pg_stat_statements loaded. For each side it prints the client's Python
CPU per cycle (the thread's CPU time), the server's CPU per cycle (the backends' utime + stime
from /proc), and per statement: calls, execution time, WAL records and bytes, buffer hits.
At W = 4 and 16 both sides are CPU-bound on 2 cores, so figure 7's ratio there is about the
ratio of these totals. Not part of `make bench`; bench/README.md keeps its latest output.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from bench import workload
from bench.postgres import (
    ARTIFACT,
    FLOOR_CLAIM,
    FLOOR_COMPLETE,
    FLOOR_HEARTBEAT,
    FLOOR_LOAD,
    FLOOR_SCHEMA,
    unavailable,
)

TICKS = os.sysconf("SC_CLK_TCK")
WARM_UP = 50  #: cycles before the clock starts: statements prepared, plans cached
STATEMENTS = """
SELECT calls, total_exec_time / calls AS exec_ms, wal_records::float8 / calls AS wal_records,
       wal_bytes::float8 / calls AS wal_bytes, shared_blks_hit::float8 / calls AS hits,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 48) AS query
FROM pg_stat_statements WHERE calls >= %s ORDER BY total_exec_time DESC LIMIT 8
"""


def server_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the server processes `pids` used so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def client_backends(conn: Any) -> list[int]:
    """The server processes of every client connection but `conn`'s own."""
    rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
                        " AND pid <> pg_backend_pid()").fetchall()
    return [int(row[0]) for row in rows]


def measure(side: str, cycle: Callable[[], None], admin_url: str, cycles: int
            ) -> dict[str, Any]:
    import psycopg

    for _ in range(WARM_UP):
        cycle()
    with psycopg.connect(admin_url, autocommit=True) as admin:
        pids = client_backends(admin)
        admin.execute("SELECT pg_stat_statements_reset()")
        server0, python0, wall0 = server_cpu_s(pids), time.thread_time(), time.perf_counter()
        for _ in range(cycles):
            cycle()
        python1, wall1, server1 = time.thread_time(), time.perf_counter(), server_cpu_s(pids)
        statements = admin.execute(STATEMENTS, (cycles,)).fetchall()
    python_ms = (python1 - python0) / cycles * 1e3
    server_ms = (server1 - server0) / cycles * 1e3
    print(f"{side}: {cycles / (wall1 - wall0):,.0f} cycles/s; CPU per cycle: Python "
          f"{python_ms:.3f} ms + server {server_ms:.3f} ms = {python_ms + server_ms:.3f} ms")
    for calls, exec_ms, wal_records, wal_bytes, hits, query in statements:
        print(f"  {exec_ms:6.3f} ms  {wal_records:5.1f} WAL records {wal_bytes:6,.0f} B  "
              f"{hits:5.1f} buffer hits  {calls} × {query}")
    return {"python_ms": python_ms, "server_ms": server_ms}


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m bench.postgres_profile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3000, help="timed cycles per side")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        raise SystemExit(f"skipped: {reason}")
    import psycopg

    from tests.pg import Cluster
    from trainfleet.queue.postgres import PostgresQueue

    found: dict[str, dict[str, Any]] = {}
    settings = ("shared_preload_libraries=pg_stat_statements",)
    with Cluster(durable=True, settings=settings) as pg:
        pg.admin("CREATE EXTENSION pg_stat_statements")
        jobs = args.cycles + WARM_UP
        queue = PostgresQueue(pg.fresh_schema(), pool_size=1)
        try:
            queue.sync_manifest(workload.manifest(workload.eligible_job(i) for i in range(jobs)))
            capability = workload.cpu_capability()

            def ours() -> None:
                claim = queue.claim_next("w", capability)
                assert claim is not None
                queue.heartbeat(claim.job.job_id, claim.lease, {"step": 1})
                queue.complete(claim.job.job_id, claim.lease, ARTIFACT, {"loss": 0.1})

            found["ours"] = measure("ours", ours, pg.url(), args.cycles)
        finally:
            queue.close()
        url = pg.fresh_schema()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(FLOOR_SCHEMA)
            conn.execute(FLOOR_LOAD, (jobs,))
            conn.execute("ANALYZE jobs")

            def floor() -> None:
                row = conn.execute(FLOOR_CLAIM, {"lease": secrets.token_hex(16),
                                                 "worker_id": "w"}).fetchone()
                assert row is not None
                conn.execute(FLOOR_HEARTBEAT, row)
                conn.execute(FLOOR_COMPLETE, row)

            found["raw skip locked"] = measure("raw skip locked", floor, pg.url(), args.cycles)
    ours_ms = found["ours"]["python_ms"] + found["ours"]["server_ms"]
    floor_ms = found["raw skip locked"]["python_ms"] + found["raw skip locked"]["server_ms"]
    print(f"CPU per cycle, floor / ours: {floor_ms / ours_ms:.2f}")
    return found


if __name__ == "__main__":
    main()

"""Figure 7: the claim cycle on PostgreSQL, in process, against a raw SKIP LOCKED loop.

A throwaway cluster (tests/pg.py `Cluster`, durable: fsync and synchronous_commit on) holds, for
each run and W, a fresh schema of `claim_jobs` tiny pending jobs for each side. W threads, each
with a connection of its own, loop claim → heartbeat → complete until the queue is empty or
`claim_seconds` is up:
- ours: `PostgresQueue.claim_next` → `heartbeat` → `complete`, the receiver's calls (pool of W
  connections, full protocol: worker registry, attempts, events, fencing by lease);
- floor: raw psycopg, one committed statement per step: the `UPDATE … WHERE id = (SELECT …
  FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING` claim, an UPDATE heartbeat and an UPDATE complete,
  both fenced by the lease.
Ours and the floor run back to back, the order alternating between runs. Afterwards each
database is checked: every acknowledged job completed exactly once, nothing left claimed.
Without PostgreSQL's server binaries the figure is skipped with the reason printed.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import measure, workload
from bench.options import Options
from trainfleet.queue.base import JobQueue

#: worker i's loop: (i, deadline, its claim latencies) -> jobs it completed
Loop = Callable[[int, float, list[float]], int]

ARTIFACT = "0" * 64  #: the queue does not look artifacts up; the receiver does
FLOOR_SCHEMA = """
CREATE TABLE jobs (
    id           bigint PRIMARY KEY,
    priority     integer NOT NULL DEFAULT 0,
    idx          integer NOT NULL,
    status       text NOT NULL DEFAULT 'pending',
    lease        text,
    worker_id    text,
    claimed_at   float8,
    heartbeat_at float8,
    completions  integer NOT NULL DEFAULT 0
);
CREATE INDEX jobs_pending ON jobs (priority DESC, idx) WHERE status = 'pending';
"""
FLOOR_LOAD = "INSERT INTO jobs (id, idx) SELECT i, i FROM generate_series(1, %s) AS i"
FLOOR_CLAIM = """
UPDATE jobs SET status = 'claimed', lease = %(lease)s, worker_id = %(worker_id)s,
       claimed_at = extract(epoch FROM now()), heartbeat_at = extract(epoch FROM now())
WHERE id = (SELECT id FROM jobs WHERE status = 'pending' ORDER BY priority DESC, idx
            FOR UPDATE SKIP LOCKED LIMIT 1)
  AND status = 'pending'
RETURNING id, lease
"""
FLOOR_HEARTBEAT = """
UPDATE jobs SET status = 'running', heartbeat_at = extract(epoch FROM now())
WHERE id = %s AND lease = %s AND status IN ('claimed', 'running')
"""
FLOOR_COMPLETE = """
UPDATE jobs SET status = 'completed', completions = completions + 1
WHERE id = %s AND lease = %s AND status IN ('claimed', 'running')
"""
SIDES = ("ours", "raw skip locked")


def unavailable() -> str | None:
    """Why this figure cannot run here, or None."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401

        from tests.pg import find_bindir
        find_bindir()
    except (ImportError, RuntimeError) as exc:
        return f"no PostgreSQL here ({exc})"
    return None


def run(options: Options, work: Path) -> dict[str, Any]:
    reason = unavailable()
    if reason:
        print(f"   skipped: {reason}", file=sys.stderr, flush=True)
        return {"rows": [], "skipped": reason}
    from tests.pg import Cluster

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        f"W={w}": {side: [] for side in SIDES} for w in options.pg_workers}
    with Cluster(durable=True) as pg:
        for r in range(options.runs):
            for n, w in enumerate(options.pg_workers):
                order = SIDES if (r + n) % 2 == 0 else SIDES[::-1]
                for side in order:
                    url = pg.fresh_schema()
                    cycle = ours_cycle if side == "ours" else floor_cycle
                    runs[f"W={w}"][side].append(cycle(options, url, w))
                    pg.admin(f"DROP SCHEMA {schema_of(url)} CASCADE")
    return {"rows": _rows(options, runs), "runs": runs}


def schema_of(url: str) -> str:
    return url.rsplit("search_path%3D", 1)[1]


# -- the two sides -------------------------------------------------------------------------


def ours_cycle(options: Options, url: str, w: int) -> dict[str, Any]:
    from trainfleet.queue.postgres import PostgresQueue

    queue = PostgresQueue(url, pool_size=w)
    try:
        # W connections open before the clock starts, as the floor's are (a receiver's pool
        # is warm after its first moments; the pool would otherwise grow while timed).
        queue._pool.resize(min_size=w, max_size=w)
        queue._pool.wait(timeout=30.0)
        queue.sync_manifest(workload.manifest(
            workload.eligible_job(i) for i in range(options.claim_jobs)))
        found = threaded(options, w, queue_loop(queue))
    finally:
        queue.close()
    found.update(verify_ours(url, found["completed"]))
    return found


def queue_loop(queue: JobQueue) -> Loop:
    """Worker i's loop on our queue, as `threaded` runs it: claim → heartbeat → complete until
    the deadline or an empty queue; the jobs it completed (each claim's latency noted)."""
    capability = workload.cpu_capability()

    def loop(i: int, deadline: float, latencies: list[float]) -> int:
        worker_id = f"bench-{i}"
        done = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            claim = queue.claim_next(worker_id, capability)
            latencies.append(time.perf_counter() - t0)
            if claim is None:
                break
            job_id = claim.job.job_id
            if queue.heartbeat(job_id, claim.lease, {"step": 1}) != "continue":
                raise RuntimeError(f"ours: heartbeat of {job_id} said cancel")
            queue.complete(job_id, claim.lease, ARTIFACT, {"loss": 0.1})
            done += 1
        return done

    return loop


def floor_cycle(options: Options, url: str, w: int) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FLOOR_SCHEMA)
        conn.execute(FLOOR_LOAD, (options.claim_jobs,))
        conn.execute("ANALYZE jobs")
    connections = [psycopg.connect(url, autocommit=True) for _ in range(w)]
    try:
        def loop(i: int, deadline: float, latencies: list[float]) -> int:
            conn = connections[i]
            worker_id = f"bench-{i}"
            done = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                row = conn.execute(FLOOR_CLAIM, {"lease": secrets.token_hex(16),
                                                 "worker_id": worker_id}).fetchone()
                latencies.append(time.perf_counter() - t0)
                if row is None:
                    break
                job_id, lease = row
                if conn.execute(FLOOR_HEARTBEAT, (job_id, lease)).rowcount != 1:
                    raise RuntimeError(f"floor: lost the lease of {job_id}")
                if conn.execute(FLOOR_COMPLETE, (job_id, lease)).rowcount != 1:
                    raise RuntimeError(f"floor: lost the lease of {job_id}")
                done += 1
            return done

        found = threaded(options, w, loop)
    finally:
        for conn in connections:
            conn.close()
    found.update(verify_floor(url, found["completed"]))
    return found


def threaded(options: Options, w: int, loop: Loop) -> dict[str, Any]:
    """Run `loop` in w threads started together; jobs/s over the wall time of them all."""
    latencies: list[list[float]] = [[] for _ in range(w)]
    done = [0] * w
    errors: list[BaseException] = []
    gate = threading.Barrier(w + 1)
    deadline = [0.0]

    def body(i: int) -> None:
        gate.wait()
        try:
            done[i] = loop(i, deadline[0], latencies[i])
        except BaseException as exc:  # reported below, after every thread has stopped
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(w)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    deadline[0] = started + options.claim_seconds if options.claim_seconds > 0 else float("inf")
    gate.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    completed = sum(done)
    return {"completed": completed, "elapsed_s": elapsed, "jobs_per_s": completed / elapsed,
            **measure.latency_summary([s for found in latencies for s in found])}


# -- exactly once --------------------------------------------------------------------------


def verify_ours(url: str, acknowledged: int) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(url) as conn:
        def one(sql: str) -> int:
            row = conn.execute(sql).fetchone()
            assert row is not None
            return int(row[0])

        return exactly_once(one, acknowledged)


def exactly_once(one: Callable[[str], int], acknowledged: int) -> dict[str, Any]:
    """Every acknowledged job is completed with one `completed` event and one attempt, and
    nothing is left claimed: read from our queue's tables with `one` (a count query), on
    either backend."""
    completed = one("SELECT count(*) FROM jobs WHERE status = 'completed'")
    events = one("SELECT count(*) FROM events WHERE kind = 'completed'")
    doubled = one("SELECT count(*) FROM (SELECT job_id FROM events WHERE kind = 'completed' "
                  "GROUP BY job_id HAVING count(*) > 1) AS d")
    retried = one("SELECT count(*) FROM attempts WHERE attempt > 1")
    live = one("SELECT count(*) FROM jobs WHERE status IN ('claimed', 'running')")
    return {"double_completions": doubled, "left_live": live, "exactly_once": int(
        completed == events == acknowledged and doubled == retried == live == 0)}


def verify_floor(url: str, acknowledged: int) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE completions > 0), "
            "count(*) FILTER (WHERE completions > 1), "
            "count(*) FILTER (WHERE status IN ('claimed', 'running')) FROM jobs").fetchone()
    assert row is not None
    completed, doubled, live = (int(v) for v in row)
    return {"double_completions": doubled, "left_live": live,
            "exactly_once": int(completed == acknowledged and doubled == live == 0)}


# -- rows ----------------------------------------------------------------------------------


def _rows(options: Options, runs: dict[str, dict[str, list[dict[str, Any]]]]
          ) -> list[dict[str, Any]]:
    rows = []
    for w in options.pg_workers:
        by = runs[f"W={w}"]
        floor = SIDES[1]
        rows.append(measure.row(
            "postgres", f"postgresql claim cycle W={w}", "jobs/s",
            [r["jobs_per_s"] for r in by["ours"]], {floor: [r["jobs_per_s"] for r in by[floor]]},
            note="in process, durable commits"))
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            rows.append(measure.row(
                "postgres", f"postgresql claim {label} W={w}", "ms",
                [r[key] for r in by["ours"]], {floor: [r[key] for r in by[floor]]},
                higher_is_better=False))
    return rows

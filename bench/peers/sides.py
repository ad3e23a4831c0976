"""The in-process sides of bench.peers: trainfleet's SqliteQueue, huey's SqliteHuey, and the
raw PostgreSQL SKIP LOCKED loop of figure 7 (bench/postgres.py, reused as it is).

Each side is a context manager (a server, where it needs one, lives for all its runs) with
`durability`, what it could set, read back from the store itself, and `cycle(jobs, seconds, w,
work)`: a fresh store of `jobs` tiny pending jobs, W threads each looping take one → mark it
done until the store is empty or `seconds` are up, then the store's own exactly-once check.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from bench import postgres, workload
from bench.options import Options


class Side(Protocol):
    name: str
    durability: str

    def __enter__(self) -> Side: ...

    def __exit__(self, *exc: object) -> None: ...

    def cycle(self, jobs: int, seconds: float, w: int, work: Path) -> dict[str, Any]: ...


def _options(jobs: int, seconds: float) -> Options:
    return Options(claim_jobs=jobs, claim_seconds=seconds)


class Ours:
    """trainfleet: `SqliteQueue.claim_next` → `heartbeat` → `complete`, W threads on one queue
    (one connection behind a lock, as the receiver holds it), synchronous=FULL as shipped:
    claim and complete fsync, the heartbeat commits at NORMAL. Full protocol: worker registry,
    attempts, events, leases that fence every later call."""

    name = "trainfleet SqliteQueue"
    durability = ""

    def __enter__(self) -> Ours:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def cycle(self, jobs: int, seconds: float, w: int, work: Path) -> dict[str, Any]:
        from trainfleet.queue.sqlite import SqliteQueue

        path = work / "ours.db"
        queue = SqliteQueue(path)
        try:
            queue.sync_manifest(workload.manifest(
                workload.eligible_job(i) for i in range(jobs)))
            self.durability = "WAL, synchronous={} (claim and complete fsync)".format(
                queue._db.execute("PRAGMA synchronous").fetchone()[0])
            found = postgres.threaded(_options(jobs, seconds), w, postgres.queue_loop(queue))
        finally:
            queue.close()
        found.update(verify_ours(path, found["completed"]))
        return found


def verify_ours(path: Path, acknowledged: int) -> dict[str, Any]:
    """Every acknowledged job is completed with one `completed` event, none was claimed
    twice, nothing is left claimed."""
    conn = sqlite3.connect(path)
    try:
        return postgres.exactly_once(lambda sql: int(conn.execute(sql).fetchone()[0]),
                                     acknowledged)
    finally:
        conn.close()


class Huey:
    """huey's SqliteHuey with fsync=True (synchronous=FULL, WAL, its defaults otherwise). W
    threads each loop what huey's consumer Worker.loop does: `huey.dequeue()` (the row is
    deleted in an exclusive transaction: taken) → `huey.execute(task)` (runs it and stores the
    result: done). No lease, no heartbeat: a worker that dies mid-task loses the task."""

    name = "huey SqliteHuey"
    durability = ""

    @staticmethod
    def unavailable() -> str | None:
        try:
            import huey  # type: ignore[import-untyped, unused-ignore]  # noqa: F401
        except ImportError:
            return "huey is not installed (pip install -r bench/peers/requirements.txt)"
        return None

    def __enter__(self) -> Huey:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def cycle(self, jobs: int, seconds: float, w: int, work: Path) -> dict[str, Any]:
        from huey import SqliteHuey  # type: ignore[import-untyped, unused-ignore]

        path = str(work / "huey.db")
        ran: Counter[int] = Counter()
        lock = threading.Lock()

        def tick(i: int) -> int:
            with lock:
                ran[i] += 1
            return i

        # Loaded without fsync (not timed), then taken and done by an instance with it.
        loader = SqliteHuey("peers", filename=path, fsync=False)
        enqueue = loader.task(name="tick")(tick)
        for i in range(jobs):
            enqueue(i)
        loader.storage.close()
        huey = SqliteHuey("peers", filename=path, fsync=True)
        huey.task(name="tick")(tick)
        conn = huey.storage.conn
        self.durability = "WAL, synchronous={} (fsync=True; default fsync=None keeps " \
            "SQLite's default, FULL in this build)".format(
                conn.execute("PRAGMA synchronous").fetchone()[0])

        def loop(i: int, deadline: float, latencies: list[float]) -> int:
            done = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                task = huey.dequeue()
                latencies.append(time.perf_counter() - t0)
                if task is None:
                    break
                huey.execute(task)
                done += 1
            return done

        found = postgres.threaded(_options(jobs, seconds), w, loop)
        results = huey.result_count()
        pending = huey.pending_count()
        huey.storage.close()
        doubled = sum(1 for n in ran.values() if n > 1)
        found.update({"double_completions": doubled, "left_live": None, "exactly_once": int(
            sum(ran.values()) == len(ran) == results == found["completed"]
            and pending == jobs - found["completed"] and doubled == 0)})
        return found


class SkipLocked:
    """The raw PostgreSQL SKIP LOCKED loop of figure 7 (bench/postgres.py `floor_cycle`) on a
    throwaway durable cluster (tests/pg.py: fsync and synchronous_commit on)."""

    name = "raw PostgreSQL SKIP LOCKED"
    durability = ""

    @staticmethod
    def unavailable() -> str | None:
        return postgres.unavailable()

    def __enter__(self) -> SkipLocked:
        from tests.pg import Cluster

        self._cluster = Cluster(durable=True)
        self._cluster.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cluster.__exit__(*exc)

    def cycle(self, jobs: int, seconds: float, w: int, work: Path) -> dict[str, Any]:
        import psycopg

        url = self._cluster.fresh_schema()
        try:
            with psycopg.connect(url) as conn:
                fsync, commit = (conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                                 for name in ("fsync", "synchronous_commit"))
            self.durability = f"fsync={fsync}, synchronous_commit={commit}"
            return postgres.floor_cycle(_options(jobs, seconds), url, w)
        finally:
            self._cluster.admin(f"DROP SCHEMA {postgres.schema_of(url)} CASCADE")

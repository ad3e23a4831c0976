"""RQ on a local redis-server, as bench.peers measures it.

The benchmark starts redis-server itself on 127.0.0.1, a free port and a temp dir, with
`appendonly yes` and `appendfsync always` (every write is fsynced to the append-only file
before redis answers: our durability; redis's default is no AOF at all, only RDB snapshots),
and stops it by its PID. Each run: W worker processes (bench/peers/rq_worker.py; RQ runs a
worker per process) wait on an empty queue; the `jobs` tiny jobs are built into one MULTI/EXEC
pipeline and the clock starts as it executes, so every job appears at once, pre-loaded; it
stops when RQ's finished registry holds every job or `seconds` are up. The workers are then
stopped (SIGTERM: RQ's warm shutdown) and RQ's own records checked: each job has exactly one
stored result (one per execution), and none failed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import process
from bench.peers import rq_worker

READY_S = 30.0


class Rq:
    """RQ's `Worker` (forks a work horse per job: its default) or `SimpleWorker` (no fork)."""

    durability = ""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = "RQ Worker (fork per job)" if kind == "fork" else "RQ SimpleWorker"

    @staticmethod
    def unavailable() -> str | None:
        try:
            import redis  # noqa: F401
            import rq  # noqa: F401
        except ImportError:
            return "rq/redis not installed (pip install -r bench/peers/requirements.txt)"
        if shutil.which("redis-server") is None:
            return "no redis-server on PATH (apt-get install -y redis-server)"
        return None

    def __enter__(self) -> Rq:
        from redis import Redis

        from tests.pg import free_port

        self._dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        port = free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        self._server = process.Proc(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self._dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--daemonize", "no"], self._dir / "redis.log")
        self.redis = Redis.from_url(self.url)
        deadline = time.monotonic() + READY_S
        while True:
            try:
                if self.redis.ping():
                    break
            except Exception as exc:  # redis.ConnectionError until it listens
                if time.monotonic() > deadline or self._server.popen.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"redis-server did not start: {exc}\n"
                                       f"{self._server.output()[-2000:]}") from exc
            time.sleep(0.05)
        config = self.redis.config_get("append*")
        self.durability = (f"appendonly={config['appendonly']}, "
                           f"appendfsync={config['appendfsync']}, save=''")
        return self

    def __exit__(self, *exc: object) -> None:
        self.redis.close()
        self._server.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def cycle(self, jobs: int, seconds: float, w: int, work: Path) -> dict[str, Any]:
        from rq import Queue, Worker
        from rq.registry import FailedJobRegistry, FinishedJobRegistry
        from rq.results import Result

        self.redis.flushdb()
        queue = Queue(rq_worker.QUEUE, connection=self.redis)
        finished = FinishedJobRegistry(queue=queue).key
        workers = [process.Proc(process.python("-m", "bench.peers.rq_worker", self.url, self.kind),
                                work / f"rq-worker-{i}.log") for i in range(w)]
        try:
            deadline = time.monotonic() + READY_S
            while Worker.count(connection=self.redis, queue=queue) < w:
                for proc in workers:
                    if proc.popen.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"an RQ worker did not start:\n{proc.output()[-2000:]}")
                time.sleep(0.05)
            pipe = self.redis.pipeline()  # MULTI/EXEC: the workers see every job at once
            queue.enqueue_many([Queue.prepare_data(rq_worker.tick, (i,)) for i in range(jobs)],
                               pipeline=pipe)
            started = time.perf_counter()
            pipe.execute()
            stop = started + seconds if seconds > 0 else float("inf")
            while (completed := self.redis.zcard(finished)) < jobs:
                if time.perf_counter() > stop:
                    break
                time.sleep(0.005)
            elapsed = time.perf_counter() - started
        finally:
            for proc in workers:
                proc.stop()
        ids = [j.decode() if isinstance(j, bytes) else str(j)
               for j in self.redis.zrange(finished, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.xlen(Result.get_key(job_id))  # type: ignore[no-untyped-call]
        executions = pipe.execute()
        failed = FailedJobRegistry(queue=queue).count
        doubled = sum(1 for n in executions if n > 1)
        return {"completed": completed, "elapsed_s": elapsed, "jobs_per_s": completed / elapsed,
                "double_completions": doubled, "left_live": None, "failed": failed,
                "exactly_once": int(len(ids) >= completed and doubled == failed == 0
                                    and all(n == 1 for n in executions))}

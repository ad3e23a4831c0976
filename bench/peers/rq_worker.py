"""One RQ worker process for bench.peers, and the job it runs.

`python -m bench.peers.rq_worker URL fork|simple` runs `rq.Worker` (a work horse forked per
job, RQ's default) or `rq.SimpleWorker` (the job in the worker process) on the queue `peers`
until SIGTERM, which RQ handles as a warm shutdown (the job in hand finishes first).
"""

from __future__ import annotations

import sys

QUEUE = "peers"


def tick(i: int) -> int:
    """The tiny job: RQ records its result, one entry per execution (rq.results.Result)."""
    return i


def main(argv: list[str]) -> int:
    from redis import Redis
    from rq import SimpleWorker, Worker

    url, kind = argv
    worker_class = SimpleWorker if kind == "simple" else Worker
    worker = worker_class([QUEUE], connection=Redis.from_url(url))
    worker.work(logging_level="WARNING")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Many processes claiming from one database at once, for every backend."""

from __future__ import annotations

import multiprocessing

import pytest

from tests.conftest import cpu, job, make_manifest
from trainfleet.queue import open_queue


def _claim_and_complete(url: str, worker: str, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    q = open_queue(url)
    done, errors = [], []
    while True:
        try:
            claim = q.claim_next(worker, cpu(worker))
            if claim is None:
                break
            q.heartbeat(claim.job.job_id, claim.lease)
            q.complete(claim.job.job_id, claim.lease, "e" * 64)
            done.append(claim.job.job_id)
        except Exception as exc:  # any error is a failure of the test, reported back
            errors.append(repr(exc))
            break
    q.close()
    results.put((done, errors))


@pytest.mark.slow
def test_eight_processes_complete_every_job_exactly_once(queue_url: str) -> None:
    q = open_queue(queue_url)
    q.sync_manifest(make_manifest([job(f"j{i}", seed=i) for i in range(2000)]))
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_claim_and_complete, args=(queue_url, f"w{i}", results))
             for i in range(8)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    completed = [job_id for done, _ in outcomes for job_id in done]
    assert [e for _, errors in outcomes for e in errors] == []
    assert len(completed) == 2000 and len(set(completed)) == 2000
    assert q.counts()["completed"] == 2000
    claims = sum(event.kind == "claimed" for j in q.list_jobs() for event in q.history(j.job_id))
    assert claims == 2000
    assert sum(1 for done, _ in outcomes if done) >= 2  # the work really was shared
    q.close()

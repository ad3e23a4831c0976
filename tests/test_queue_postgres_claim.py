"""The claim cycle as PostgresQueue sends it (one statement per call, generic plans), and the
worker registry's write throttle, which both backends keep alike."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import cpu, gpu, job, make_manifest
from tests.pg import Cluster
from trainfleet.queue.base import JobQueue, Status
from trainfleet.queue.postgres import COMPLETE_LIVE, PostgresQueue

T0 = 1_000_000.0


def _seen(queue: JobQueue, worker_id: str, now: float) -> tuple[float, float]:
    [worker] = [w for w in queue.workers(now=now) if w.worker_id == worker_id]
    return worker.last_seen, worker.capability.ram_gib


# -- the worker registry, on both backends -----------------------------------------------


def test_a_claim_rewrites_the_workers_row_when_due_or_changed_only(queue: JobQueue) -> None:
    assert queue.claim_next("w", cpu(), now=T0) is None  # registered, nothing to run
    assert queue.claim_next("w", cpu(), now=T0 + 0.5) is None
    assert _seen(queue, "w", T0 + 0.5) == (T0, 16.0)  # seen a moment ago: left as it is
    assert queue.claim_next("w", cpu(), now=T0 + 1.0) is None
    assert _seen(queue, "w", T0 + 1.0) == (T0 + 1.0, 16.0)  # due
    assert queue.claim_next("w", cpu(ram_gib=32.0), now=T0 + 1.2) is None
    assert _seen(queue, "w", T0 + 1.2) == (T0 + 1.2, 32.0)  # changed: written at once
    assert queue.claim_next("w", cpu(ram_gib=32.0), now=T0 + 0.2) is None
    assert _seen(queue, "w", T0 + 1.2) == (T0 + 0.2, 32.0)  # a clock that went back: written


def test_a_heartbeat_rewrites_last_seen_when_due_only(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    claim = queue.claim_next("w", cpu(), now=T0)
    assert claim is not None
    assert queue.heartbeat(claim.job.job_id, claim.lease, now=T0 + 0.9) == "continue"
    assert _seen(queue, "w", T0 + 0.9)[0] == T0
    assert queue.get(claim.job.job_id).heartbeat_at == T0 + 0.9  # the job's is every beat
    assert queue.heartbeat(claim.job.job_id, claim.lease, now=T0 + 1.1) == "continue"
    assert _seen(queue, "w", T0 + 1.1)[0] == T0 + 1.1


def test_a_lent_slots_claim_clears_the_loan_at_once(queue: JobQueue) -> None:
    assert queue.claim_next("duo-1", gpu("duo"), now=T0) is None
    queue.sync_manifest(make_manifest([job("a", require_cuda=True)]), now=T0)
    claim = queue.claim_next("duo-0", gpu("duo"), now=T0)
    assert claim is not None
    queue.heartbeat(claim.job.job_id, claim.lease, now=T0 + 5, lent_slots=["duo-1"])
    assert {w.worker_id: w for w in queue.workers(now=T0 + 5)}["duo-1"].lent_to == "a"
    assert queue.claim_next("duo-1", gpu("duo"), now=T0 + 5.1) is None  # within the second
    assert {w.worker_id: w for w in queue.workers(now=T0 + 5.1)}["duo-1"].lent_to is None


def test_a_claim_that_makes_jobs_pending_again_takes_the_best_of_all(queue: JobQueue) -> None:
    """The slot's unschedulable jobs are made pending before it picks, so a better one of
    them wins over a job that was pending all along."""
    assert queue.claim_next("c", cpu(), now=T0) is None  # the fleet seen: one CPU slot
    queue.sync_manifest(make_manifest([job("big", require_cuda=True, priority=5),
                                       job("small")]), now=T0)
    assert queue.get(queue.resolve("big")).status == Status.UNSCHEDULABLE
    # A claim that runs nothing (the queue reads the reloaded manifest's settings here).
    assert queue.claim_next("c", cpu(), own_deny=("gbt",), now=T0 + 0.5) is None
    claim = queue.claim_next("g", gpu(), now=T0 + 1)
    assert claim is not None and claim.job.name == "big"
    assert [e.kind for e in queue.history(claim.job.job_id)][-2:] == ["schedulable", "claimed"]
    assert queue.get(queue.resolve("small")).status == Status.PENDING


# -- the statements as PostgresQueue sends them ------------------------------------------


@pytest.fixture
def traced(pg_cluster: Cluster) -> Iterator[tuple[PostgresQueue, list[str]]]:
    """A queue of one pooled connection whose plans auto_explain hands back as notices."""
    q = PostgresQueue(pg_cluster.fresh_schema(), pool_size=1)
    plans: list[str] = []
    with q._connection() as conn:
        conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
        for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                        "SET auto_explain.log_level = notice",
                        "SET auto_explain.log_nested_statements = on"):
            conn.execute(setting)
    yield q, plans
    q.close()


def _cycle(q: PostgresQueue) -> None:
    claim = q.claim_next("w", cpu())
    assert claim is not None
    assert q.heartbeat(claim.job.job_id, claim.lease, {"step": 1}) == "continue"
    assert q.complete(claim.job.job_id, claim.lease, "a" * 64, {"loss": 0.1}).status \
        == Status.COMPLETED


def test_pooled_connections_plan_generically(traced: tuple[PostgresQueue, list[str]]) -> None:
    q, _ = traced
    with q._connection() as conn:
        row = conn.execute("SHOW plan_cache_mode").fetchone()
    assert row is not None and row["plan_cache_mode"] == "force_generic_plan"


@pytest.mark.parametrize("slot", ["cpu", "cuda"])
def test_a_claim_is_one_statement_whose_generic_plan_walks_the_index(
    traced: tuple[PostgresQueue, list[str]], slot: str,
) -> None:
    q, plans = traced
    q.sync_manifest(make_manifest([job(f"j{i}", seed=i) for i in range(50)]))
    capability = cpu() if slot == "cpu" else gpu()
    assert q.claim_next("w", capability) is not None  # the first reads the host policies too
    plans.clear()
    assert q.claim_next("w", capability) is not None
    [plan] = [p for p in plans if "picked AS (" in p]  # the whole claim: one statement
    assert len([p for p in plans if "Query Text:" in p]) == 1
    assert f"Index Scan using jobs_pending_{slot}" in plan
    assert "Sort" not in plan.split("Query Text:")[1].split("\n", 1)[1]
    assert "IS DISTINCT FROM $" in plan  # generic: the values are parameters


def test_a_completion_ends_its_attempt_by_key_however_many_attempts_there_are(
    traced: tuple[PostgresQueue, list[str]],
) -> None:
    """The completion's generic plan is made while the attempts table is tiny and then kept:
    it must still find the attempt by its key (it was a scan of every attempt)."""
    q, plans = traced
    q.sync_manifest(make_manifest([job(f"j{i}", seed=i) for i in range(60)]))
    for _ in range(60):
        _cycle(q)
    last = [p for p in plans if "WITH done AS" in p][-1]
    assert "attempts_pkey" in last and "Seq Scan on attempts" not in last
    assert "a.job_id = %(job_id)s" in COMPLETE_LIVE


def test_a_heartbeat_finds_its_job_by_key_however_many_jobs_are_live(
    traced: tuple[PostgresQueue, list[str]],
) -> None:
    """Not by a walk of every live job (jobs_live), which the plan did while few were live."""
    q, plans = traced
    q.sync_manifest(make_manifest([job(f"j{i}", seed=i) for i in range(60)]))
    claims = [q.claim_next(f"w{i}", cpu()) for i in range(50)]
    for claim in claims:
        assert claim is not None
        assert q.heartbeat(claim.job.job_id, claim.lease, {"step": 1}) == "continue"
    last = [p for p in plans if "WITH old AS" in p][-1]
    scans = [line for line in last.split("\n") if "Scan" in line and " on jobs" in line]
    assert len(scans) == 2 and all("Index Scan using jobs_pkey" in line for line in scans), last

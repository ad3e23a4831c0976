"""The queue contract: every backend must pass these unchanged (real database files)."""

from __future__ import annotations

import pytest

from tests.conftest import cpu, gpu, job, make_manifest
from trainfleet.errors import (
    AmbiguousJobId,
    EnrollmentRefused,
    IllegalTransition,
    JobNotFound,
    LeaseLost,
    NotFound,
)
from trainfleet.manifest import job_id_of
from trainfleet.queue.base import FailureKind, JobQueue, Status
from trainfleet.tokens import TokenKind, hash_token

T0 = 1_000_000.0


def test_lifecycle_claim_heartbeat_complete(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    claim = queue.claim_next("w1", cpu(), now=T0 + 1)
    assert claim is not None and claim.attempt == 1
    assert claim.job.status == Status.CLAIMED and claim.job.worker_id == "w1"
    assert queue.heartbeat(claim.job.job_id, claim.lease, {"fraction": 0.5}, "log", now=T0 + 2) \
        == "continue"
    assert queue.get(claim.job.job_id).status == Status.RUNNING
    assert queue.get(claim.job.job_id).progress == {"fraction": 0.5}
    done = queue.complete(claim.job.job_id, claim.lease, "f" * 64, {"accuracy": 0.9}, now=T0 + 3)
    assert done.status == Status.COMPLETED and done.artifact_id == "f" * 64
    assert done.metrics == {"accuracy": 0.9}
    kinds = [e.kind for e in queue.history(claim.job.job_id)]
    assert kinds == ["added", "claimed", "started", "completed"]
    [attempt] = queue.attempts(claim.job.job_id)
    assert attempt.outcome == "completed" and attempt.worker_id == "w1"
    assert queue.claim_next("w1", cpu(), now=T0 + 4) is None


@pytest.mark.parametrize("swept_first", [False, True])
def test_a_completed_jobs_progress_is_whole_and_keeps_no_stale_message(
    queue: JobQueue, swept_first: bool,
) -> None:
    """The last heartbeat said "epoch 26/30"; done, the job is at 100 % with its step and no
    message (the usual completion, and one delivered straight after a sweep)."""
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    claim = queue.claim_next("w1", cpu(), now=T0)
    assert claim is not None
    progress = {"fraction": 0.86, "step": 26, "message": "epoch 26/30"}
    queue.heartbeat(claim.job.job_id, claim.lease, progress, now=T0 + 1)
    if swept_first:
        queue.sweep_stale(now=T0 + 700)
    done = queue.complete(claim.job.job_id, claim.lease, "a" * 64, now=T0 + 701)
    assert done.status == Status.COMPLETED
    assert done.progress == {"fraction": 1.0, "step": 26}
    assert queue.get(claim.job.job_id).progress == {"fraction": 1.0, "step": 26}


def test_complete_is_idempotent_for_same_lease_and_artifact(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    claim = queue.claim_next("w1", cpu(), now=T0)
    assert claim is not None
    queue.complete(claim.job.job_id, claim.lease, "a" * 64, now=T0 + 1)
    again = queue.complete(claim.job.job_id, claim.lease, "a" * 64, now=T0 + 2)
    assert again.status == Status.COMPLETED
    with pytest.raises(LeaseLost):
        queue.complete(claim.job.job_id, claim.lease, "b" * 64, now=T0 + 3)
    assert [e.kind for e in queue.history(claim.job.job_id)].count("completed") == 1


def test_a_non_ascii_lease_is_a_lost_lease_not_a_crash(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    claim = queue.claim_next("w1", cpu(), now=T0)
    assert claim is not None
    for call in (lambda: queue.heartbeat(claim.job.job_id, "\u00e9t\u00e9", now=T0 + 1),
                 lambda: queue.complete(claim.job.job_id, "\u00e9t\u00e9", "a" * 64,
                                        now=T0 + 1),
                 lambda: queue.check_lease(claim.job.job_id, "\u00e9t\u00e9", now=T0 + 1)):
        with pytest.raises(LeaseLost):
            call()
    assert not queue.attempt_lease_matches(claim.job.job_id, 1, "\u00e9t\u00e9")
    assert queue.get(claim.job.job_id).status == Status.CLAIMED


def test_claim_skips_cuda_jobs_on_cpu_host(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("t", "transformer", require_cuda=True),
                                       job("g")]), now=T0)
    claim = queue.claim_next("w1", cpu(), now=T0)
    assert claim is not None and claim.job.name == "g"
    assert queue.claim_next("w1", cpu(), now=T0) is None
    claim = queue.claim_next("w2", gpu(), now=T0)
    assert claim is not None and claim.job.name == "t"


@pytest.mark.parametrize(
    ("fields", "fits", "misfit"),
    [
        ({"min_vram_gib": 16.0}, gpu(vram_gib=24), gpu(vram_gib=8)),
        ({"min_ram_gib": 32.0}, cpu(ram_gib=64), cpu(ram_gib=16)),
        ({"allowed_hosts": ["cpu-b"]}, cpu("cpu-b"), cpu("cpu-a")),
    ],
)
def test_claim_honours_resource_constraints(queue: JobQueue, fields, fits, misfit) -> None:
    queue.sync_manifest(make_manifest([job("x", **fields)]), now=T0)
    assert queue.claim_next("misfit", misfit, now=T0) is None
    claim = queue.claim_next("fits", fits, now=T0)
    assert claim is not None and claim.job.name == "x"


def test_claim_uses_the_slot_vram_not_the_largest_gpu(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("x", min_vram_gib=16.0)]), now=T0)
    assert queue.claim_next("w", gpu(vram_gib=24), slot_vram_gib=8.0, now=T0) is None
    assert queue.claim_next("w", gpu(vram_gib=24), slot_vram_gib=24.0, now=T0) is not None


def test_claim_honours_host_policy_from_manifest(queue: JobQueue) -> None:
    hosts = '[hosts.pi]\ndeny_jobs = ["gbt"]\n[hosts.tiny]\nallow_jobs = ["mlp"]\n'
    queue.sync_manifest(make_manifest([job("g"), job("m", "mlp")], hosts), now=T0)
    claim = queue.claim_next("pi", cpu("pi"), now=T0)
    assert claim is not None and claim.job.name == "m"
    assert queue.claim_next("tiny", cpu("tiny"), now=T0) is None
    claim = queue.claim_next("other", cpu("other"), now=T0)
    assert claim is not None and claim.job.name == "g"


def test_claim_honours_worker_own_allow_and_deny(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("g"), job("m", "mlp")]), now=T0)
    assert queue.claim_next("w", cpu(), own_allow=("transformer",), now=T0) is None
    claim = queue.claim_next("w", cpu(), own_deny=("gbt",), now=T0)
    assert claim is not None and claim.job.name == "m"
    claim = queue.claim_next("w", cpu(), own_allow=("gbt", "mlp"), now=T0)
    assert claim is not None and claim.job.name == "g"


def test_claim_order_is_priority_then_manifest_order(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("low"), job("high", priority=5), job("low2")]), now=T0)
    names = [queue.claim_next("w", cpu(), now=T0).job.name for _ in range(3)]  # type: ignore[union-attr]
    assert names == ["high", "low", "low2"]


def test_cuda_slot_takes_prefer_cuda_jobs_first(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("plain"), job("pref", prefer_cuda=True)]), now=T0)
    claim = queue.claim_next("g", gpu(), now=T0)
    assert claim is not None and claim.job.name == "pref"


def test_prefer_cuda_goes_to_cpu_when_no_cuda_worker_is_live(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("pref", prefer_cuda=True, prefer_wait_s=100.0)]),
                        now=T0)
    claim = queue.claim_next("c", cpu(), now=T0)
    assert claim is not None and claim.job.name == "pref"


def test_prefer_cuda_job_is_held_for_live_cuda_worker(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("busy", require_cuda=True, priority=9),
                                       job("pref", prefer_cuda=True, prefer_wait_s=100.0)]),
                        now=T0)
    first = queue.claim_next("g", gpu(), now=T0)  # the CUDA worker is now live, busy
    assert first is not None and first.job.name == "busy"
    assert queue.claim_next("c", cpu(), now=T0 + 50) is None
    late = queue.claim_next("c", cpu(), now=T0 + 101)  # grace over
    assert late is not None and late.job.name == "pref"


def test_prefer_cuda_goes_to_cpu_once_cuda_worker_is_stale(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("busy", require_cuda=True, priority=9),
                                       job("pref", prefer_cuda=True, prefer_wait_s=10**6)]),
                        now=T0)
    assert queue.claim_next("g", gpu(), now=T0) is not None
    assert queue.claim_next("c", cpu(), now=T0 + 10) is None
    claim = queue.claim_next("c", cpu(), now=T0 + 601)  # g not seen for stale_after_s
    assert claim is not None and claim.job.name == "pref"


def test_heartbeat_with_wrong_lease_is_fenced(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    claim = queue.claim_next("w", cpu(), now=T0)
    assert claim is not None
    with pytest.raises(LeaseLost):
        queue.heartbeat(claim.job.job_id, "0" * 32, now=T0 + 1)
    assert queue.get(claim.job.job_id).status == Status.CLAIMED


def test_stale_sweep_requeues_then_fails_at_max_lost(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a", max_lost=2)]), now=T0)
    first = queue.claim_next("w1", cpu(), now=T0)
    assert first is not None
    assert queue.sweep_stale(now=T0 + 599) == []
    assert queue.sweep_stale(now=T0 + 601) == [first.job.job_id]
    assert queue.get(first.job.job_id).status == Status.PENDING
    second = queue.claim_next("w2", cpu(), now=T0 + 602)
    assert second is not None and second.attempt == 2
    assert queue.sweep_stale(now=T0 + 1300) == [first.job.job_id]
    failed = queue.get(first.job.job_id)
    assert failed.status == Status.FAILED and failed.error == "lost worker w2"


def test_sweep_never_counts_time_before_the_receiver_started(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    claim = queue.claim_next("w1", cpu(), now=T0)
    assert claim is not None
    started = T0 + 5000  # receiver was down, then restarted
    assert queue.sweep_stale(now=started + 10, since=started) == []
    assert queue.sweep_stale(now=started + 601, since=started) == [claim.job.job_id]


def test_old_lease_is_fenced_after_sweep_and_reclaim(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    old = queue.claim_next("w1", cpu(), now=T0)
    assert old is not None
    queue.sweep_stale(now=T0 + 700)
    new = queue.claim_next("w2", cpu(), now=T0 + 701)
    assert new is not None and new.lease != old.lease
    for call in (
        lambda: queue.heartbeat(old.job.job_id, old.lease, now=T0 + 702),
        lambda: queue.complete(old.job.job_id, old.lease, "a" * 64, now=T0 + 702),
        lambda: queue.fail(old.job.job_id, old.lease, "boom", now=T0 + 702),
    ):
        with pytest.raises(LeaseLost):
            call()
    assert queue.get(old.job.job_id).worker_id == "w2"
    queue.complete(new.job.job_id, new.lease, "b" * 64, now=T0 + 703)
    assert queue.get(new.job.job_id).artifact_id == "b" * 64


def test_fail_retries_until_max_attempts(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    c1 = queue.claim_next("w", cpu(), now=T0)
    assert c1 is not None
    assert queue.fail(c1.job.job_id, c1.lease, "boom 1", now=T0 + 1).status == Status.PENDING
    c2 = queue.claim_next("w", cpu(), now=T0 + 2)
    assert c2 is not None
    final = queue.fail(c2.job.job_id, c2.lease, "boom 2", now=T0 + 3)
    assert final.status == Status.FAILED and final.error == "boom 2" and final.attempts == 2


def test_non_retryable_failure_is_final(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    c = queue.claim_next("w", cpu(), now=T0)
    assert c is not None
    assert queue.fail(c.job.job_id, c.lease, "bad", retryable=False).status == Status.FAILED


def test_worker_shutdown_does_not_use_up_an_attempt(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)  # max_attempts = 2
    for i in range(3):
        c = queue.claim_next("w", cpu(), now=T0 + i)
        assert c is not None
        job_after = queue.fail(c.job.job_id, c.lease, "stop", kind=FailureKind.WORKER_SHUTDOWN)
        assert job_after.status == Status.PENDING
    assert queue.get(c.job.job_id).attempts == 3


def test_cancel_reaches_the_worker_through_heartbeat(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    c = queue.claim_next("w", cpu(), now=T0)
    assert c is not None
    assert queue.cancel(c.job.job_id, now=T0 + 1).status == Status.CANCELLED
    assert queue.heartbeat(c.job.job_id, c.lease, now=T0 + 2) == "cancel"
    with pytest.raises(LeaseLost):
        queue.complete(c.job.job_id, c.lease, "a" * 64, now=T0 + 3)


def test_requeue_gives_fresh_attempts_and_illegal_transitions_are_refused(
    queue: JobQueue,
) -> None:
    queue.sync_manifest(make_manifest([job("a"), job("b")]), now=T0)
    a, b = (queue.claim_next("w", cpu(), now=T0) for _ in range(2))
    assert a is not None and b is not None
    with pytest.raises(IllegalTransition):
        queue.requeue(a.job.job_id)  # live
    queue.fail(a.job.job_id, a.lease, "x", retryable=False)
    requeued = queue.requeue(a.job.job_id, now=T0 + 5)
    assert requeued.status == Status.PENDING and requeued.attempts_charged == 0
    queue.complete(b.job.job_id, b.lease, "c" * 64)
    with pytest.raises(IllegalTransition):
        queue.cancel(b.job.job_id)
    with pytest.raises(IllegalTransition):
        queue.requeue(b.job.job_id)
    again = queue.claim_next("w", cpu(), now=T0 + 6)
    assert again is not None and again.attempt == 2 and again.job.job_id == a.job.job_id


def test_reload_keeps_status_adds_new_and_orphans_removed(queue: JobQueue) -> None:
    first = make_manifest([job("a"), job("b"), job("c")])
    assert queue.sync_manifest(first, now=T0).added == 3
    c = queue.claim_next("w", cpu(), now=T0)
    assert c is not None and c.job.name == "a"
    queue.complete(c.job.job_id, c.lease, "d" * 64)
    second = make_manifest([job("a"), job("b", priority=3), job("d")])
    result = queue.sync_manifest(second, now=T0 + 1)
    assert (result.added, result.updated, result.unchanged, result.orphaned) == (1, 1, 1, 1)
    assert queue.get(c.job.job_id).status == Status.COMPLETED
    by_name = {j.name: j for j in queue.list_jobs()}
    assert by_name["b"].priority == 3
    assert by_name["c"].orphaned and by_name["c"].status == Status.PENDING
    names = {queue.claim_next("w", cpu(), now=T0 + 2).job.name for _ in range(2)}  # type: ignore[union-attr]
    assert names == {"b", "d"}
    assert queue.claim_next("w", cpu(), now=T0 + 3) is None  # orphan "c" is not claimable
    repeat = queue.sync_manifest(second, now=T0 + 4)
    assert (repeat.added, repeat.updated, repeat.unchanged) == (0, 0, 3)


def test_reload_does_not_change_constraints_of_a_running_job(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    c = queue.claim_next("w", cpu(), now=T0)
    assert c is not None
    result = queue.sync_manifest(make_manifest([job("a", min_ram_gib=999.0)]), now=T0 + 1)
    assert result.unchanged == 1
    assert queue.get(c.job.job_id).min_ram_gib == 0.0


def test_resolve_accepts_name_full_id_and_unique_prefix(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a"), job("b")]), now=T0)
    job_id = queue.resolve("a")
    assert queue.resolve(job_id) == job_id
    assert queue.resolve(job_id[:8]) == job_id
    with pytest.raises(JobNotFound):
        queue.resolve("abc")  # too short to be a prefix, and no such name
    with pytest.raises(JobNotFound):
        queue.resolve("nope")


def test_resolve_reports_ambiguous_prefix(queue: JobQueue) -> None:
    seen: dict[str, int] = {}
    for seed in range(2_000_000):  # birthday search for two ids sharing 8 hex digits
        prefix = job_id_of("gbt", "realistic", {}, None, (), seed)[:8]
        if prefix in seen:
            break
        seen[prefix] = seed
    pair = [job("x", seed=seen[prefix]), job("y", seed=seed)]
    queue.sync_manifest(make_manifest(pair), now=T0)
    with pytest.raises(AmbiguousJobId) as info:
        queue.resolve(prefix)
    assert len(info.value.detail["candidates"]) == 2


def test_workers_registry_reports_alive_and_held_jobs(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    c = queue.claim_next("w1", cpu("h1"), now=T0)
    queue.claim_next("w2", cpu("h2"), now=T0)
    assert c is not None
    workers = {w.worker_id: w for w in queue.workers(now=T0 + 10)}
    assert workers["w1"].alive and workers["w1"].jobs == (c.job.job_id,)
    assert workers["w2"].jobs == ()
    assert not any(w.alive for w in queue.workers(now=T0 + 601))


def test_list_filters_and_counts(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a"), job("m", "mlp")]), now=T0)
    c = queue.claim_next("w", cpu("h1"), now=T0)
    assert c is not None
    assert [j.name for j in queue.list_jobs(model="mlp")] == ["m"]
    assert [j.name for j in queue.list_jobs(host="h1")] == [c.job.name]
    assert [j.name for j in queue.list_jobs(status="pending")] == ["m"]
    assert queue.counts()["claimed"] == 1 and queue.counts()["pending"] == 1


def test_worker_returning_after_sweep_gets_its_unclaimed_job_back(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    c = queue.claim_next("w1", cpu(), now=T0)
    assert c is not None
    queue.sweep_stale(now=T0 + 700)
    assert queue.get(c.job.job_id).lost_count == 1
    assert queue.heartbeat(c.job.job_id, c.lease, now=T0 + 701) == "continue"
    back = queue.get(c.job.job_id)
    assert back.status == Status.RUNNING and back.attempts == 2 and back.worker_id == "w1"
    assert back.lost_count == 0
    assert [e.kind for e in queue.history(c.job.job_id)][-2:] == ["failed", "reclaimed"]
    done = queue.complete(c.job.job_id, c.lease, "a" * 64, now=T0 + 702)
    assert done.status == Status.COMPLETED
    outcomes = [a.outcome for a in queue.attempts(c.job.job_id)]
    assert outcomes == ["lost_worker", "completed"]


def test_returning_worker_can_deliver_straight_after_a_sweep(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a")]), now=T0)
    c = queue.claim_next("w1", cpu(), now=T0)
    assert c is not None
    queue.sweep_stale(now=T0 + 700)
    assert queue.check_lease(c.job.job_id, c.lease, now=T0 + 800).status == Status.RUNNING
    assert queue.complete(c.job.job_id, c.lease, "b" * 64, now=T0 + 801).artifact_id == "b" * 64


def test_lost_workers_and_trainer_errors_have_separate_budgets(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a", max_attempts=2, max_lost=3)]), now=T0)
    t = T0
    for _ in range(2):  # two lost workers use none of max_attempts
        c = queue.claim_next("w", cpu(), now=t)
        assert c is not None
        t += 700
        queue.sweep_stale(now=t)
    c = queue.claim_next("w", cpu(), now=t)
    assert c is not None
    after = queue.fail(c.job.job_id, c.lease, "boom", now=t + 1)
    assert after.status == Status.PENDING
    assert (after.attempts_charged, after.lost_count) == (1, 2)
    c = queue.claim_next("w", cpu(), now=t + 2)
    assert c is not None
    final = queue.sweep_stale(now=t + 800)
    assert final == [c.job.job_id]
    job_after = queue.get(c.job.job_id)
    assert job_after.status == Status.FAILED and job_after.lost_count == 3
    outcomes = [a.outcome for a in queue.attempts(c.job.job_id)]
    assert outcomes == ["lost_worker", "lost_worker", "trainer_error", "lost_worker"]


# -- per-host tokens and enrollment codes (only hashes are stored) -----------

WORKER, ENROLL = TokenKind.WORKER, TokenKind.ENROLL
CODE, TOKEN, OTHER = hash_token("tfe_code"), hash_token("tfw_token"), hash_token("tfw_other")


def test_lookup_token_answers_active_tokens_only(queue: JobQueue) -> None:
    made = queue.create_token("gpu-a", WORKER, TOKEN, now=T0)
    assert (made.hostname, made.kind, made.created_at, made.expires_at) == ("gpu-a", WORKER, T0,
                                                                             None)
    assert queue.lookup_token(TOKEN, now=T0 + 1) == made
    assert queue.lookup_token(OTHER, now=T0 + 1) is None
    queue.create_token("gpu-a", WORKER, OTHER, expires_at=T0 + 10, now=T0)
    assert queue.lookup_token(OTHER, now=T0 + 9) is not None
    assert queue.lookup_token(OTHER, now=T0 + 10) is None


def test_touch_token_records_the_last_use(queue: JobQueue) -> None:
    queue.create_token("gpu-a", WORKER, TOKEN, now=T0)
    queue.touch_token(TOKEN, now=T0 + 42)
    info = queue.lookup_token(TOKEN, now=T0 + 43)
    assert info is not None and info.last_used_at == T0 + 42


def test_has_worker_tokens_counts_every_worker_token_ever_issued(queue: JobQueue) -> None:
    assert not queue.has_worker_tokens()
    queue.create_token("h", ENROLL, CODE, expires_at=T0 + 100, now=T0)
    assert not queue.has_worker_tokens()  # a code alone does not close the receiver
    queue.create_token("h", WORKER, TOKEN, now=T0)
    assert queue.has_worker_tokens()
    queue.revoke_host("h", now=T0 + 1)
    assert queue.has_worker_tokens()  # revoking every host must not reopen it


def test_enroll_code_is_exchanged_once_for_a_worker_token(queue: JobQueue) -> None:
    queue.create_token("gpu-a", ENROLL, CODE, expires_at=T0 + 3600, now=T0)
    token = queue.redeem_enroll_code(CODE, "gpu-a", TOKEN, now=T0 + 5)
    assert (token.kind, token.hostname, token.created_at, token.expires_at) == (
        WORKER, "gpu-a", T0 + 5, None)
    assert queue.lookup_token(TOKEN, now=T0 + 6) == token
    assert queue.lookup_token(CODE, now=T0 + 6) is None
    with pytest.raises(EnrollmentRefused, match="already used") as refused:
        queue.redeem_enroll_code(CODE, "gpu-a", OTHER, now=T0 + 7)
    assert refused.value.reason == "used" and refused.value.status == 403
    assert queue.lookup_token(OTHER, now=T0 + 8) is None


@pytest.mark.parametrize(("code_hash", "hostname", "at", "reason", "needle"), [
    (OTHER, "gpu-a", T0 + 1, "unknown", "not known"),
    (TOKEN, "gpu-a", T0 + 1, "unknown", "not known"),  # a worker token is not a code
    (CODE, "gpu-a", T0 + 600, "expired", "expired at"),
    (CODE, "gpu-b", T0 + 1, "hostname", "for host 'gpu-a', not 'gpu-b'"),
], ids=["unknown-code", "worker-token-as-code", "expired", "other-hostname"])
def test_refused_enrollment_names_the_rule_and_changes_nothing(
    queue: JobQueue, code_hash: str, hostname: str, at: float, reason: str, needle: str
) -> None:
    queue.create_token("gpu-a", ENROLL, CODE, expires_at=T0 + 600, now=T0)
    queue.create_token("gpu-a", WORKER, TOKEN, now=T0)
    before = queue.list_tokens()
    with pytest.raises(EnrollmentRefused, match=needle) as refused:
        queue.redeem_enroll_code(code_hash, hostname, hash_token("tfw_new"), now=at)
    assert refused.value.reason == reason
    assert queue.list_tokens() == before


def test_a_revoked_code_cannot_be_redeemed(queue: JobQueue) -> None:
    queue.create_token("gpu-a", ENROLL, CODE, expires_at=T0 + 600, now=T0)
    queue.revoke_host("gpu-a", now=T0 + 1)
    with pytest.raises(EnrollmentRefused, match="revoked") as refused:
        queue.redeem_enroll_code(CODE, "gpu-a", TOKEN, now=T0 + 2)
    assert refused.value.reason == "revoked"


def test_list_tokens_shows_every_token_and_code_with_its_state(queue: JobQueue) -> None:
    queue.create_token("b-host", WORKER, TOKEN, now=T0)
    queue.create_token("a-host", ENROLL, CODE, expires_at=T0 + 60, now=T0 + 1)
    listed = queue.list_tokens()
    assert [(t.hostname, t.kind) for t in listed] == [("a-host", ENROLL), ("b-host", WORKER)]
    assert listed[0].expires_at == T0 + 60 and listed[0].active(T0 + 59)
    assert not listed[0].active(T0 + 60)
    view = listed[1].to_dict(T0)
    assert view["token_id"] == TOKEN[:12] and "token_hash" not in view
    assert view["kind"] == "worker" and view["active"] is True


def test_revoke_host_revokes_its_tokens_and_requeues_its_live_jobs(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("a"), job("b")]), now=T0)
    queue.create_token("gpu-a", WORKER, TOKEN, now=T0)
    queue.create_token("gpu-a", ENROLL, CODE, expires_at=T0 + 600, now=T0)
    queue.create_token("cpu-b", WORKER, OTHER, now=T0)
    mine = queue.claim_next("w-a", gpu("gpu-a"), now=T0 + 1)
    theirs = queue.claim_next("w-b", cpu("cpu-b"), now=T0 + 1)
    assert mine is not None and theirs is not None
    result = queue.revoke_host("gpu-a", now=T0 + 5)
    assert (result.hostname, result.revoked, result.requeued) == ("gpu-a", 2, (mine.job.job_id,))
    swept = queue.get(mine.job.job_id)
    assert swept.status == Status.PENDING and swept.lost_count == 1
    assert swept.error is not None and "revoked" in swept.error and "w-a" in swept.error
    assert queue.attempts(mine.job.job_id)[-1].outcome == FailureKind.LOST_WORKER
    assert queue.get(theirs.job.job_id).status == Status.CLAIMED
    assert queue.lookup_token(TOKEN, now=T0 + 6) is None
    assert queue.lookup_token(OTHER, now=T0 + 6) is not None
    assert all(t.revoked_at == T0 + 5 for t in queue.list_tokens() if t.hostname == "gpu-a")
    with pytest.raises(NotFound, match="no active token"):
        queue.revoke_host("gpu-a", now=T0 + 6)


@pytest.mark.parametrize(("lowered", "spend"), [({"max_attempts": 1}, "fail"),
                                                ({"max_lost": 1}, "sweep")])
def test_reload_lowering_a_budget_below_what_a_waiting_job_used_fails_it(
    queue: JobQueue, lowered: dict[str, int], spend: str
) -> None:
    budget = {"max_attempts": 3, "max_lost": 3}
    queue.sync_manifest(make_manifest([job("a", **budget)]), now=T0)
    claim = queue.claim_next("w1", cpu(), now=T0)
    assert claim is not None
    if spend == "fail":
        queue.fail(claim.job.job_id, claim.lease, "boom", now=T0 + 1)
    else:
        assert queue.sweep_stale(now=T0 + 601, since=T0) == [claim.job.job_id]
    assert queue.get(claim.job.job_id).status == Status.PENDING
    queue.sync_manifest(make_manifest([job("a", **(budget | lowered))]), now=T0 + 700)
    spent = queue.get(claim.job.job_id)
    assert spent.status == Status.FAILED and "lowered the budget" in (spent.error or "")
    assert queue.claim_next("w1", cpu(), now=T0 + 701) is None
    assert queue.history(claim.job.job_id)[-1].detail["outcome"] == "budget"

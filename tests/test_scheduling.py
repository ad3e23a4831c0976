"""Failure-aware scheduling, part of the queue contract: every backend passes these unchanged."""

from __future__ import annotations

import pytest

from tests.conftest import cpu, execute_on, gpu, job, make_manifest
from trainfleet.errors import LeaseLost, NotFound
from trainfleet.failures import Cause
from trainfleet.queue import open_queue
from trainfleet.queue.base import FailureKind, JobQueue, Status

T0 = 1_000_000.0
BUG = "ValueError: bad shape <n>"


def _claim(queue: JobQueue, worker_id: str, cap: object, at: float) -> tuple[str, str]:
    claim = queue.claim_next(worker_id, cap, now=at)  # type: ignore[arg-type]
    assert claim is not None, f"{worker_id} got nothing"
    return claim.job.job_id, claim.lease


def test_cuda_oom_raises_the_vram_need_above_the_slot_it_failed_on(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("t", "transformer", min_vram_gib=8.0)]), now=T0)
    job_id, lease = _claim(queue, "w-small", gpu("gpu-small", vram_gib=24.0), T0)
    failed = queue.fail(job_id, lease, "CUDA out of memory", now=T0 + 1, cause=Cause.CUDA_OOM,
                        signature="torch.OutOfMemoryError: CUDA out of memory.")
    assert failed.status == Status.PENDING
    assert failed.min_vram_gib == 8.0 and failed.effective_vram_gib == 30.0
    assert queue.claim_next("w-small", gpu("gpu-small", vram_gib=24.0), now=T0 + 2) is None
    claim = queue.claim_next("w-big", gpu("gpu-big", vram_gib=40.0), now=T0 + 3)
    assert claim is not None and claim.job.job_id == job_id


def test_cuda_oom_with_a_sampled_peak_raises_the_need_above_the_peak(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("t", "transformer")]), now=T0)
    job_id, lease = _claim(queue, "w", gpu(vram_gib=80.0), T0)
    failed = queue.fail(job_id, lease, "oom", now=T0 + 1, cause=Cause.CUDA_OOM, peak_vram_gib=20.0)
    assert failed.effective_vram_gib == 25.0 and failed.raised_vram_gib == 25.0


def test_ram_oom_raises_the_ram_need_above_the_host(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("g", max_attempts=3)]), now=T0)
    job_id, lease = _claim(queue, "w16", cpu("cpu-16", ram_gib=16.0), T0)
    failed = queue.fail(job_id, lease, "MemoryError", now=T0 + 1, cause=Cause.RAM_OOM,
                        signature="MemoryError")
    assert failed.min_ram_gib == 0.0 and failed.effective_ram_gib == 20.0
    assert queue.claim_next("w16", cpu("cpu-16", ram_gib=16.0), now=T0 + 2) is None
    assert queue.claim_next("w32", cpu("cpu-32", ram_gib=32.0), now=T0 + 3) is not None


def test_killed_trainer_counts_as_out_of_ram(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("g", max_attempts=3)]), now=T0)
    job_id, lease = _claim(queue, "w", cpu(ram_gib=8.0), T0)
    failed = queue.fail(job_id, lease, "killed", now=T0 + 1, cause=Cause.KILLED)
    assert failed.effective_ram_gib == 10.0


def test_retry_avoids_the_failed_host_while_another_live_host_can_run_it(
    queue: JobQueue,
) -> None:
    queue.sync_manifest(make_manifest([job("g", max_attempts=3)]), now=T0)
    job_id, lease = _claim(queue, "wa", cpu("cpu-a"), T0)
    assert queue.claim_next("wb", cpu("cpu-b"), now=T0 + 1) is None  # b is seen, and idle
    failed = queue.fail(job_id, lease, "boom", now=T0 + 2, cause=Cause.TRAINER_ERROR,
                        signature="RuntimeError: boom")
    assert failed.avoid_hosts == ("cpu-a",)
    assert queue.claim_next("wa", cpu("cpu-a"), now=T0 + 3) is None
    claim = queue.claim_next("wb", cpu("cpu-b"), now=T0 + 4)
    assert claim is not None and claim.job.job_id == job_id


def test_failed_host_takes_the_job_again_when_no_other_live_host_can(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("g", max_attempts=5, min_ram_gib=4.0)]), now=T0)
    job_id, lease = _claim(queue, "wa", cpu("cpu-a"), T0)
    assert queue.claim_next("wb", cpu("cpu-b"), now=T0) is None  # seen, idle, able
    assert queue.claim_next("wtiny", cpu("tiny", ram_gib=2.0), now=T0 + 650) is None  # unable
    queue.fail(job_id, lease, "boom", now=T0 + 1, cause=Cause.TRAINER_ERROR)
    assert queue.claim_next("wa", cpu("cpu-a"), now=T0 + 2) is None  # cpu-b is alive
    # cpu-b went silent; the only live host besides cpu-a cannot run it
    claim = queue.claim_next("wa", cpu("cpu-a"), now=T0 + 700)
    assert claim is not None and claim.job.job_id == job_id


def test_same_error_on_two_hosts_fails_the_job_at_once(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("g", max_attempts=5)]), now=T0)
    job_id, lease = _claim(queue, "wa", cpu("cpu-a"), T0)
    queue.fail(job_id, lease, "Traceback...\nValueError: bad shape 3", now=T0 + 1,
               cause=Cause.TRAINER_ERROR, signature=BUG)
    job_id, lease = _claim(queue, "wb", cpu("cpu-b"), T0 + 2)
    failed = queue.fail(job_id, lease, "Traceback...\nValueError: bad shape 4", now=T0 + 3,
                        cause=Cause.TRAINER_ERROR, signature=BUG)
    assert failed.status == Status.FAILED
    assert failed.error is not None
    assert failed.error.splitlines()[-1] == f"same error on hosts cpu-a and cpu-b: {BUG}"
    assert failed.attempts_charged == 2 < failed.max_attempts
    assert [(a.hostname, a.cause, a.signature) for a in queue.attempts(job_id)] == [
        ("cpu-a", "trainer_error", BUG), ("cpu-b", "trainer_error", BUG)]


def test_same_error_twice_on_one_host_is_retried(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("g", max_attempts=5)]), now=T0)
    for at in (T0, T0 + 10):
        job_id, lease = _claim(queue, "wa", cpu("cpu-a"), at)
        failed = queue.fail(job_id, lease, BUG, now=at + 1, cause=Cause.TRAINER_ERROR,
                            signature=BUG)
    assert failed.status == Status.PENDING


def test_same_out_of_memory_on_two_hosts_is_not_a_code_bug(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("t", "transformer", max_attempts=5)]), now=T0)
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate <n> GiB"
    job_id, lease = _claim(queue, "wa", gpu("gpu-a", vram_gib=8.0), T0)
    queue.fail(job_id, lease, oom, now=T0 + 1, cause=Cause.CUDA_OOM, signature=oom)
    job_id, lease = _claim(queue, "wb", gpu("gpu-b", vram_gib=16.0), T0 + 2)
    failed = queue.fail(job_id, lease, oom, now=T0 + 3, cause=Cause.CUDA_OOM, signature=oom)
    assert failed.status == Status.PENDING and failed.effective_vram_gib == 20.0


def test_requeue_forgets_avoided_hosts_and_earlier_errors(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("g", max_attempts=5)]), now=T0)
    for worker_id, host, at in (("wa", "cpu-a", T0), ("wb", "cpu-b", T0 + 2)):
        job_id, lease = _claim(queue, worker_id, cpu(host), at)
        queue.fail(job_id, lease, BUG, now=at + 1, cause=Cause.TRAINER_ERROR, signature=BUG)
    again = queue.requeue(job_id, now=T0 + 10)
    assert again.status == Status.PENDING and again.avoid_hosts == ()
    job_id, lease = _claim(queue, "wa", cpu("cpu-a"), T0 + 11)
    failed = queue.fail(job_id, lease, BUG, now=T0 + 12, cause=Cause.TRAINER_ERROR,
                        signature=BUG)
    assert failed.status == Status.PENDING  # cpu-b's error was before the requeue


def test_worker_shutdown_neither_avoids_the_host_nor_raises_needs(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("g")]), now=T0)
    job_id, lease = _claim(queue, "wa", cpu("cpu-a"), T0)
    stopped = queue.fail(job_id, lease, "worker shutting down", now=T0 + 1,
                         kind=FailureKind.WORKER_SHUTDOWN)
    assert stopped.avoid_hosts == () and stopped.effective_ram_gib == 0.0


def test_older_schema_is_upgraded_in_place(queue_url: str) -> None:
    """A version 1 database (no scheduling columns) gains them when opened."""
    open_queue(queue_url).close()
    drops = ["ALTER TABLE jobs DROP COLUMN raised_vram_gib",
             "ALTER TABLE jobs DROP COLUMN raised_ram_gib",
             "ALTER TABLE jobs DROP COLUMN avoid_hosts",
             "ALTER TABLE attempts DROP COLUMN cause",
             "ALTER TABLE attempts DROP COLUMN signature",
             "ALTER TABLE attempts DROP COLUMN peak_vram_gib",
             "ALTER TABLE jobs DROP COLUMN stall_after_s",
             "ALTER TABLE jobs DROP COLUMN progress_at",
             "ALTER TABLE jobs DROP COLUMN checkpoint_interval_s",
             "ALTER TABLE jobs DROP COLUMN checkpoint_id",
             "ALTER TABLE jobs DROP COLUMN checkpoint_at",
             "ALTER TABLE jobs DROP COLUMN gpus",
             "ALTER TABLE workers DROP COLUMN lent_to_job",
             "DROP TABLE hosts",
             "UPDATE meta SET value = '1' WHERE key = 'schema_version'"]
    execute_on(queue_url, drops)
    q = open_queue(queue_url)
    try:
        q.sync_manifest(make_manifest([job("g")]), now=T0)
        claim = q.claim_next("w", cpu(), now=T0)
        assert claim is not None
        failed = q.fail(claim.job.job_id, claim.lease, "x", now=T0 + 1, cause=Cause.RAM_OOM)
        assert failed.effective_ram_gib == 20.0
    finally:
        q.close()


# -- unschedulable -----------------------------------------------------------

HUGE = {"require_cuda": True, "min_vram_gib": 48.0}


def test_job_no_worker_ever_seen_can_run_is_marked_unschedulable_with_why(
    queue: JobQueue,
) -> None:
    queue.sync_manifest(make_manifest([job("g"), job("huge", "transformer", **HUGE)]), now=T0)
    assert queue.claim_next("wa", cpu("cpu-a"), now=T0 + 1) is not None
    assert queue.claim_next("wg", gpu("gpu-a", vram_gib=24.0), now=T0 + 1) is None
    result = queue.reschedule(now=T0 + 2)
    [huge] = queue.list_jobs(status="unschedulable")
    assert result.unschedulable == (huge.job_id,) and huge.name == "huge"
    assert huge.error == (
        "no worker seen in the fleet can run it (cpu-a: requires CUDA; cpu-a has no CUDA GPU, "
        "needs 48 GiB VRAM; the slot has 0 GiB; gpu-a: needs 48 GiB VRAM; the slot has 24 GiB)")
    assert [e.kind for e in queue.history(huge.job_id)][-1] == "unschedulable"
    assert queue.reschedule(now=T0 + 3).unschedulable == ()  # once


def test_nothing_is_unschedulable_before_any_worker_was_seen(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("huge", "transformer", **HUGE)]), now=T0)
    assert queue.reschedule(now=T0 + 1).unschedulable == ()
    assert queue.counts()["pending"] == 1


def test_a_worker_seen_long_ago_still_counts_as_able(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("g", min_ram_gib=4.0)]), now=T0)
    queue.claim_next("w-other", cpu("tiny", ram_gib=1.0), now=T0)
    queue.claim_next("w-able", cpu("cpu-a"), now=T0)  # takes g...
    [g] = queue.list_jobs()
    queue.cancel(g.job_id, now=T0 + 1)
    queue.requeue(g.job_id, now=T0 + 2)  # ...which waits again, long after cpu-a went silent
    assert queue.reschedule(now=T0 + 100_000).unschedulable == ()


def test_unschedulable_job_is_claimed_by_the_first_worker_that_fits(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("huge", "transformer", **HUGE)]), now=T0)
    assert queue.claim_next("wg", gpu("gpu-a", vram_gib=24.0), now=T0) is None
    [huge] = queue.reschedule(now=T0 + 1).unschedulable
    claim = queue.claim_next("wbig", gpu("gpu-big", vram_gib=80.0), now=T0 + 2)
    assert claim is not None and claim.job.job_id == huge
    assert claim.job.error is None
    assert [e.kind for e in queue.history(huge)][-2:] == ["schedulable", "claimed"]


def test_reload_marks_unschedulable_and_a_manifest_fix_makes_it_pending(
    queue: JobQueue,
) -> None:
    queue.claim_next("wa", cpu("cpu-a", ram_gib=16.0), now=T0)
    queue.sync_manifest(make_manifest([job("big", min_ram_gib=32.0)]), now=T0 + 1)
    [big] = queue.list_jobs()
    assert big.status == Status.UNSCHEDULABLE and "needs 32 GiB RAM" in (big.error or "")
    queue.sync_manifest(make_manifest([job("big", min_ram_gib=8.0)]), now=T0 + 2)
    fixed = queue.get(big.job_id)
    assert fixed.status == Status.PENDING and fixed.min_ram_gib == 8.0 and fixed.error is None


def test_out_of_memory_beyond_every_host_makes_the_job_unschedulable(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([job("t", "transformer", max_attempts=3)]), now=T0)
    job_id, lease = _claim(queue, "wg", gpu("gpu-a", vram_gib=24.0), T0)
    queue.fail(job_id, lease, "oom", now=T0 + 1, cause=Cause.CUDA_OOM)
    assert queue.reschedule(now=T0 + 2).unschedulable == (job_id,)
    assert "needs 30 GiB VRAM (raised from 0 after running out of memory)" in (
        queue.get(job_id).error or "")
    assert queue.cancel(job_id, now=T0 + 3).status == Status.CANCELLED


# -- host quarantine ---------------------------------------------------------


class _Fleet:
    """A good host holding one job (and heartbeating it) beside a host whose attempts fail."""

    def __init__(self, queue: JobQueue, jobs: int = 4) -> None:
        self.queue = queue
        queue.sync_manifest(make_manifest([job(f"j{i}", max_attempts=3) for i in range(jobs)]),
                            now=T0)
        self.held = queue.claim_next("good", cpu("good"), now=T0)
        assert self.held is not None

    def fail_next(self, at: float, cause: Cause = Cause.TIMEOUT,
                  signature: str | None = None) -> str:
        """The bad host claims a job and fails it; the job's id."""
        assert self.held is not None
        self.queue.heartbeat(self.held.job.job_id, self.held.lease, now=at)  # good stays alive
        job_id, lease = _claim(self.queue, "bad", cpu("bad"), at)
        self.queue.fail(job_id, lease, "it failed", now=at, cause=cause, signature=signature)
        return job_id

    def quarantine(self) -> tuple[float | None, str | None]:
        [bad] = [w for w in self.queue.workers(now=T0) if w.hostname == "bad"]
        return bad.quarantined_until, bad.quarantine_reason


def test_host_whose_last_three_attempts_failed_alike_on_different_jobs_is_quarantined(
    queue: JobQueue,
) -> None:
    fleet = _Fleet(queue)
    failed = {fleet.fail_next(T0 + i) for i in (1, 2, 3)}
    assert len(failed) == 3
    until, reason = fleet.quarantine()
    assert until == T0 + 3 + 600
    assert reason == "its last 3 attempts failed on 3 different jobs with timeout"
    assert queue.claim_next("bad", cpu("bad"), now=T0 + 4) is None  # the 204 of a claim
    [bad] = [w for w in queue.workers(now=T0 + 4) if w.hostname == "bad"]
    assert bad.quarantine is not None
    assert bad.quarantine.startswith("host quarantined until ")
    assert bad.quarantine.endswith(": its last 3 attempts failed on 3 different jobs with timeout")


def test_a_quarantined_hosts_claim_makes_no_unschedulable_job_pending(queue: JobQueue) -> None:
    fleet = _Fleet(queue)
    for i in (1, 2, 3):
        fleet.fail_next(T0 + i)
    assert fleet.quarantine()[0] is not None
    jobs = [job(f"j{i}", max_attempts=3) for i in range(4)] + [job("roomy", min_ram_gib=32.0)]
    queue.sync_manifest(make_manifest(jobs), now=T0 + 4)  # no host seen has 32 GiB
    [roomy] = queue.list_jobs(status="unschedulable")
    # The bad host now offers 64 GiB: it could run roomy, but it claims nothing while
    # quarantined, and leaves roomy as it was for a host that may.
    assert queue.claim_next("bad", cpu("bad", ram_gib=64.0), now=T0 + 5) is None
    assert queue.get(roomy.job_id).status == Status.UNSCHEDULABLE
    assert [e.kind for e in queue.history(roomy.job_id)][-1] == "unschedulable"


def test_out_of_memory_streaks_do_not_quarantine_a_host(queue: JobQueue) -> None:
    """Jobs too big for a slot are the jobs' problem: their need is raised instead."""
    fleet = _Fleet(queue, jobs=5)
    for i in (1, 2, 3):
        fleet.fail_next(T0 + i, cause=Cause.CUDA_OOM)
    assert fleet.quarantine() == (None, None)
    assert queue.claim_next("bad", cpu("bad"), now=T0 + 4) is not None  # the fifth job


def test_quarantine_ends_after_its_cool_off_which_doubles_each_time(queue: JobQueue) -> None:
    fleet = _Fleet(queue)
    for i in (1, 2, 3):
        fleet.fail_next(T0 + i)
    first_until, _ = fleet.quarantine()
    assert first_until == T0 + 603
    later = T0 + 4000  # the cool-off is over, and the jobs no longer avoid the host
    for i in (0, 1, 2):
        fleet.fail_next(later + i)
    second_until, _ = fleet.quarantine()
    assert second_until == later + 2 + 1200


def test_release_lifts_the_quarantine_and_earlier_failures_stop_counting(
    queue: JobQueue,
) -> None:
    fleet = _Fleet(queue, jobs=5)
    for i in (1, 2, 3):
        fleet.fail_next(T0 + i)
    released = queue.release_host("bad", now=T0 + 10)
    assert released.hostname == "bad" and released.was_until == T0 + 603
    assert fleet.quarantine() == (None, None)
    fleet.fail_next(T0 + 11)  # one more failure alone does not quarantine it again
    assert fleet.quarantine() == (None, None)
    with pytest.raises(NotFound, match="not quarantined"):
        queue.release_host("bad", now=T0 + 12)


def test_mixed_causes_do_not_quarantine_a_host(queue: JobQueue) -> None:
    fleet = _Fleet(queue)
    fleet.fail_next(T0 + 1, Cause.TIMEOUT)
    fleet.fail_next(T0 + 2, Cause.SIGNAL)
    fleet.fail_next(T0 + 3, Cause.TIMEOUT)
    assert fleet.quarantine() == (None, None)


def test_an_error_other_hosts_have_too_is_the_code_not_the_host(queue: JobQueue) -> None:
    fleet = _Fleet(queue, jobs=5)
    assert fleet.held is not None
    queue.fail(fleet.held.job.job_id, fleet.held.lease, BUG, now=T0, cause=Cause.TRAINER_ERROR,
               signature=BUG)  # the good host failed with it too
    fleet.held = queue.claim_next("good", cpu("good"), now=T0)
    for i in (1, 2, 3):
        fleet.fail_next(T0 + i, Cause.TRAINER_ERROR, BUG)
    assert fleet.quarantine() == (None, None)


# -- stall detection ---------------------------------------------------------


def _running(queue: JobQueue, **fields: object) -> tuple[str, str]:
    queue.sync_manifest(make_manifest([job("s", max_attempts=2, **fields)]), now=T0)
    return _claim(queue, "w", cpu(), T0)


def test_job_whose_progress_stops_while_heartbeats_come_is_failed_as_stalled(
    queue: JobQueue,
) -> None:
    job_id, lease = _running(queue, stall_after_s=60.0)
    for at in (10, 30, 50, 70):  # heartbeats keep coming; the step stays at 1
        queue.heartbeat(job_id, lease, {"step": 1, "message": "epoch 1"}, now=T0 + at)
    assert queue.fail_stalled(now=T0 + 69) == []
    assert queue.fail_stalled(now=T0 + 75) == [job_id]
    stalled = queue.get(job_id)
    assert stalled.status == Status.PENDING and stalled.attempts_charged == 1
    assert stalled.error == (
        "stalled: progress has not moved for 65 s (stall_after_s 60) while worker w kept "
        "heartbeating; last progress: step 1, message epoch 1")
    assert queue.attempts(job_id)[-1].outcome == "stalled"
    with pytest.raises(LeaseLost):  # the worker's next heartbeat is told to stop
        queue.heartbeat(job_id, lease, {"step": 1}, now=T0 + 80)


def test_moving_progress_is_never_stalled(queue: JobQueue) -> None:
    job_id, lease = _running(queue, stall_after_s=60.0)
    for step, at in enumerate((40, 80, 120, 160)):
        queue.heartbeat(job_id, lease, {"step": step}, now=T0 + at)
        assert queue.fail_stalled(now=T0 + at + 30) == []
    queue.heartbeat(job_id, lease, {"fraction": 0.5, "step": 3}, now=T0 + 200)  # fraction
    assert queue.fail_stalled(now=T0 + 230) == []


def test_a_trainer_that_never_reports_progress_stalls_from_its_claim(queue: JobQueue) -> None:
    job_id, lease = _running(queue, stall_after_s=60.0)
    queue.heartbeat(job_id, lease, now=T0 + 50)
    assert queue.fail_stalled(now=T0 + 61) == [job_id]
    assert "no progress reported" in (queue.get(job_id).error or "")


def test_stall_detection_is_off_unless_asked_for(queue: JobQueue) -> None:
    job_id, lease = _running(queue)
    queue.heartbeat(job_id, lease, {"step": 1}, now=T0 + 500)
    assert queue.fail_stalled(now=T0 + 100_000) == []


def test_a_silent_worker_is_left_to_the_stale_sweep(queue: JobQueue) -> None:
    job_id, _ = _running(queue, stall_after_s=60.0)
    assert queue.fail_stalled(now=T0 + 601) == []  # no heartbeat within stale_after_s
    assert queue.sweep_stale(now=T0 + 601) == [job_id]


def test_stall_clock_never_counts_time_before_the_receiver_started(queue: JobQueue) -> None:
    job_id, lease = _running(queue, stall_after_s=60.0)
    queue.heartbeat(job_id, lease, {"step": 1}, now=T0 + 10)
    # the receiver was down from then on, and started again at T0 + 190
    queue.heartbeat(job_id, lease, {"step": 1}, now=T0 + 200)
    assert queue.fail_stalled(now=T0 + 240, since=T0 + 190) == []
    assert queue.fail_stalled(now=T0 + 251, since=T0 + 190) == [job_id]


def test_stalled_on_its_last_attempt_the_job_fails(queue: JobQueue) -> None:
    job_id, lease = _running(queue, stall_after_s=60.0)
    queue.heartbeat(job_id, lease, now=T0 + 1)
    queue.fail_stalled(now=T0 + 61)
    job_id, lease = _claim(queue, "w", cpu(), T0 + 62)
    queue.heartbeat(job_id, lease, now=T0 + 63)
    queue.fail_stalled(now=T0 + 123)
    assert queue.get(job_id).status == Status.FAILED


# -- free VRAM ---------------------------------------------------------------


def test_claim_matches_the_free_vram_and_the_registry_keeps_the_total(queue: JobQueue) -> None:
    queue.sync_manifest(make_manifest([
        job("needs-16", "transformer", require_cuda=True, min_vram_gib=16.0),
        job("needs-8", "transformer", require_cuda=True, min_vram_gib=8.0)]), now=T0)
    busy = gpu("gpu-a", vram_gib=24.0)  # someone's notebook holds 14 GiB of it
    claim = queue.claim_next("w", busy, 24.0, now=T0, free_vram_gib=10.0)
    assert claim is not None and claim.job.name == "needs-8"
    [seen] = queue.workers(now=T0)
    assert seen.slot_vram_gib == 24.0
    assert queue.claim_next("w", busy, 24.0, now=T0 + 1, free_vram_gib=10.0) is None
    claim = queue.claim_next("w", busy, 24.0, now=T0 + 2, free_vram_gib=20.0)
    assert claim is not None and claim.job.name == "needs-16"


def test_heartbeats_keep_the_attempts_peak_vram_and_a_failure_keeps_it_too(
    queue: JobQueue,
) -> None:
    queue.sync_manifest(make_manifest([job("t", "transformer", max_attempts=3)]), now=T0)
    job_id, lease = _claim(queue, "w", gpu(vram_gib=24.0), T0)
    for at, held in ((1, 3.0), (2, 7.5), (3, 5.0)):
        queue.heartbeat(job_id, lease, {"step": at}, now=T0 + at, peak_vram_gib=held)
    queue.fail(job_id, lease, "x", now=T0 + 4, cause=Cause.TRAINER_ERROR)
    [attempt] = queue.attempts(job_id)
    assert attempt.peak_vram_gib == 7.5

"""The chaos checker on hand-made histories, databases and stores: it must see each violation.

A checker that passes everything proves nothing, so every kind of violation is planted here
once and the report must name it, and a clean run must come out clean.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from tests.chaos import checker
from tests.chaos.history import FAIL, OK, UNKNOWN, History, Op, load, pair
from tests.conftest import cpu, job, make_manifest
from trainfleet.queue.sqlite import SqliteQueue

J = "a" * 64
LA, LB = "lease-a" + "0" * 25, "lease-b" + "0" * 25
T0 = 1_000_000.0


def op(f: str, start: int, end: int | None, lease: str | None = LA, attempt: int | None = 1,
       outcome: str = OK, job_id: str = J, artifact_id: str | None = None,
       process: str = "") -> Op:
    """An op invoked at `start` and answered at `end` (times in arbitrary ticks)."""
    return Op(process=process or f"p-{lease}", f=f, outcome=outcome, invoked_ns=start,
              done_ns=end, job_id=job_id, lease=lease, attempt=attempt,
              artifact_id=artifact_id)


def history_report(ops: list[Op], lease_attempts: dict[tuple[str, str], int] | None = None
                   ) -> checker.Report:
    report = checker.Report()
    checker.check_history(ops, report, lease_attempts)
    return report


# -- history -----------------------------------------------------------------


def test_a_clean_hand_over_after_a_sweep_has_no_violation() -> None:
    ops = [op("claim", 0, 1), op("heartbeat", 2, 3),
           op("claim", 10, 11, LB, 2), op("heartbeat", 12, 13, LB, 2),
           op("complete", 14, 15, LB, 2, artifact_id="f" * 64)]
    assert history_report(ops).ok


def test_a_stale_heartbeat_accepted_after_a_newer_claim_is_an_overlap_and_a_stale_accept(
) -> None:
    ops = [op("claim", 0, 1), op("claim", 2, 3, LB, 2), op("heartbeat", 4, 5)]
    report = history_report(ops)
    assert len(report.lease_overlaps) == 1 and LB[:8] in report.lease_overlaps[0]
    assert len(report.stale_accepts) == 1 and "attempt 2" in report.stale_accepts[0]


def test_calls_that_overlap_in_time_may_be_ordered_either_way_and_are_not_flagged() -> None:
    # A's heartbeat was sent before B's claim was answered: it may have landed first.
    ops = [op("claim", 0, 1), op("heartbeat", 2, 6), op("claim", 3, 4, LB, 2)]
    assert history_report(ops).ok


def test_two_accepted_completes_with_different_leases_are_a_double_completion() -> None:
    ops = [op("claim", 0, 1), op("complete", 2, 3, artifact_id="1" * 64),
           op("claim", 4, 5, LB, 2), op("complete", 6, 7, LB, 2, artifact_id="2" * 64)]
    report = history_report(ops)
    assert report.double_completions == [f"job {J[:12]}: completes accepted for 2 leases"]


def test_refused_and_unknown_calls_never_count_as_accepted() -> None:
    ops = [op("claim", 0, 1), op("claim", 2, 3, LB, 2),
           op("heartbeat", 4, 5, outcome=FAIL), op("complete", 6, None, outcome=UNKNOWN)]
    assert history_report(ops).ok


def test_a_stale_call_is_found_through_the_database_when_its_claim_was_never_answered() -> None:
    # A's claim answer was lost (so the history has no claim of A), yet A calls later.
    ops = [op("claim", 2, 3, LB, 2), op("heartbeat", 4, 5, LA, None)]
    assert history_report(ops).stale_accepts == []  # without the database: unknown order
    report = history_report(ops, {(J, LA): 1, (J, LB): 2})
    assert len(report.stale_accepts) == 1


def test_a_revived_lease_is_the_same_holder_and_not_an_overlap() -> None:
    ops = [op("claim", 0, 1), op("heartbeat", 50, 51), op("complete", 52, 53,
                                                          artifact_id="f" * 64)]
    assert history_report(ops).ok


# -- history files -----------------------------------------------------------


def test_history_files_round_trip_and_an_unanswered_call_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    history = History(path)
    call = history.invoke("w", "claim")
    call.ok(job_id=J, lease=LA, attempt=1)
    history.invoke("w", "heartbeat", job_id=J, lease=LA, attempt=1)  # then the process died
    history.close()
    with open(path, "a") as fh:
        fh.write('{"type": "ok", "proc')  # a line torn by a kill
    ops = pair(load([path]))
    assert [(o.f, o.outcome, o.job_id, o.lease) for o in ops] == [
        ("claim", OK, J, LA), ("heartbeat", UNKNOWN, J, LA)]
    assert ops[0].done_ns is not None and ops[1].done_ns is None


# -- database and store ------------------------------------------------------


class Run:
    """A real queue database and store with one completed job, made through the queue."""

    def __init__(self, root: Path) -> None:
        self.db_path = root / "queue.db"
        self.store = root / "models"
        (self.store / ".tmp").mkdir(parents=True)
        manifest = make_manifest([job("done"), job("waiting")])
        self.job_ids = [spec.job_id for spec in manifest.jobs]
        queue = SqliteQueue(self.db_path)
        queue.sync_manifest(manifest, now=T0)
        claim = queue.claim_next("w1", cpu(), now=T0 + 1)
        assert claim is not None
        self.done = claim.job.job_id
        self.lease = claim.lease
        self.bundle = b"\x1f\x8b bundle bytes"
        self.artifact_id = hashlib.sha256(self.bundle).hexdigest()
        queue.complete(self.done, claim.lease, self.artifact_id, now=T0 + 2)
        queue.close()
        self.put_bundle(self.artifact_id, self.bundle)
        self.ops = [op("claim", 0, 1, claim.lease, 1, job_id=self.done),
                    op("complete", 2, 3, claim.lease, 1, job_id=self.done,
                       artifact_id=self.artifact_id)]

    def put_bundle(self, artifact_id: str, data: bytes, index: bool = True) -> Path:
        path = self.store / "gbt_realistic" / artifact_id / "bundle.tar.gz"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        if index:
            with open(self.store / "index.jsonl", "a") as fh:
                fh.write(json.dumps({"artifact_id": artifact_id, "model": "gbt"}) + "\n")
        return path

    def check(self, **kwargs: bool) -> checker.Report:
        return checker.check(self.ops, self.db_path, self.store, self.job_ids, **kwargs)

    def sql(self, statement: str, *params: object) -> None:
        with sqlite3.connect(self.db_path) as db:
            db.execute(statement, params)


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path)


def test_a_clean_run_has_no_violation_and_its_figures(run: Run) -> None:
    report = run.check()
    report.assert_ok()
    assert report.figures["jobs"] == 2 and report.figures["artifacts"] == 1
    assert report.figures["status"] == {"completed": 1, "pending": 1}


def test_a_job_missing_or_left_live_is_lost(run: Run) -> None:
    run.job_ids.append("b" * 64)
    run.sql("UPDATE jobs SET status = 'claimed', worker_id = 'w9' WHERE job_id != ?", run.done)
    report = run.check()
    assert len(report.lost_jobs) == 2
    assert any("not in the database" in line for line in report.lost_jobs)
    assert any("still claimed by w9" in line for line in report.lost_jobs)
    assert len(run.check(allow_live=True).lost_jobs) == 1


def test_an_acknowledged_complete_the_database_lost_is_reported(run: Run) -> None:
    run.sql("UPDATE jobs SET status = 'pending', artifact_id = NULL WHERE job_id = ?", run.done)
    report = run.check()
    assert len(report.lost_acks) == 1 and "acknowledged complete" in report.lost_acks[0]


def test_an_acknowledged_claim_whose_lease_no_attempt_has_is_reported(run: Run) -> None:
    run.ops.append(op("claim", 5, 6, LB, 2, job_id=run.job_ids[1]))
    report = run.check()
    assert any("no attempt has" in line for line in report.lost_acks)


def test_a_second_completed_event_is_a_double_completion(run: Run) -> None:
    run.sql("INSERT INTO events (job_id, at, kind) VALUES (?, ?, 'completed')", run.done, T0)
    report = run.check()
    assert report.double_completions == [
        f"job {run.done[:12]}: 2 'completed' events, 1 completed attempts"]


@pytest.mark.parametrize(("column", "limit"), [("attempts_charged", "max_attempts"),
                                               ("lost_count", "max_lost")])
def test_budgets_over_their_limit_are_reported(run: Run, column: str, limit: str) -> None:
    run.sql(f"UPDATE jobs SET {column} = {limit} + 1 WHERE job_id = ?", run.job_ids[1])
    report = run.check()
    assert len(report.over_limit) == 1 and limit in report.over_limit[0]


def test_a_bundle_whose_bytes_do_not_hash_to_its_id_is_reported(run: Run) -> None:
    path = run.store / "gbt_realistic" / run.artifact_id / "bundle.tar.gz"
    path.write_bytes(b"\x1f\x8b other bytes")
    report = run.check()
    assert report.bad_artifacts == [f"{path}: bytes do not hash to {run.artifact_id[:12]}"]


def test_temp_files_and_index_mismatches_are_reported(run: Run) -> None:
    (run.store / ".tmp" / "x.part").write_bytes(b"partial")
    unindexed = run.put_bundle(hashlib.sha256(b"u").hexdigest(), b"u", index=False)
    with open(run.store / "index.jsonl", "a") as fh:
        fh.write(json.dumps({"artifact_id": "c" * 64}) + "\n")
    report = run.check()
    assert report.temp_files == [str(run.store / ".tmp" / "x.part")]
    assert report.file_without_index == [f"{unindexed}: no index row"]
    assert report.index_without_file == [f"index row {'c' * 12}: no bundle file"]


def test_a_completed_jobs_artifact_missing_from_the_store_is_reported(run: Run) -> None:
    bundle_dir = run.store / "gbt_realistic" / run.artifact_id
    (bundle_dir / "bundle.tar.gz").unlink()
    bundle_dir.rmdir()
    report = run.check()
    assert report.missing_artifacts == [
        f"artifact {run.artifact_id[:12]}: acknowledged or completed, not stored"]


def test_a_damaged_database_fails_the_integrity_check(run: Run) -> None:
    data = bytearray(run.db_path.read_bytes())
    page = 4096
    assert len(data) >= 3 * page
    data[2 * page: 3 * page] = b"\xa5" * page  # a b-tree page overwritten
    run.db_path.write_bytes(bytes(data))
    report = run.check()
    assert report.integrity and not report.ok
    with pytest.raises(AssertionError, match="integrity"):
        report.assert_ok()

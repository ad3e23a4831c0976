"""SQLite specifics: WAL, the claim's index, the schema version.

Many processes claiming at once: test_queue_concurrency.py, for every backend.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import cpu, gpu, job, make_manifest
from trainfleet.queue.sqlite import (
    CLASS_CANDIDATES,
    CLASSES,
    HOST_RECENT_ATTEMPTS,
    MAX_CLASSES,
    MIGRATIONS,
    RANK_CANDIDATES,
    SqliteQueue,
)


def test_database_runs_in_wal_mode(tmp_path: Path) -> None:
    SqliteQueue(tmp_path / "q.db").close()
    mode = sqlite3.connect(tmp_path / "q.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


@pytest.mark.parametrize("cuda", [0, 1])
def test_claim_query_walks_the_partial_index_without_sorting(tmp_path: Path, cuda: int) -> None:
    SqliteQueue(tmp_path / "q.db").close()
    db = sqlite3.connect(tmp_path / "q.db")
    params = {"cuda": cuda, "vram": 0.0, "ram": 8.0, "hostname": "h", "allow": None, "deny": "[]",
              "gpus": 0, "free": "[24.0,16.0]",  # a per-GPU offer does not change the plan
              "prefer_cuda": 0}
    plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + RANK_CANDIDATES,
                                                   params))
    assert "USING INDEX jobs_pending_rank (prefer_cuda=?)" in plan
    assert "TEMP B-TREE" not in plan


def test_one_rank_index_for_the_pending_jobs(tmp_path: Path) -> None:
    """One rank index serves CPU and CUDA slots: a claim updates one index fewer."""
    SqliteQueue(tmp_path / "q.db").close()
    db = sqlite3.connect(tmp_path / "q.db")
    names = {name for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'jobs_pending%'")}
    assert names == {"jobs_pending_rank", "jobs_pending_class"}


def test_claim_class_queries_seek_the_class_index_without_sorting(tmp_path: Path) -> None:
    SqliteQueue(tmp_path / "q.db").close()
    db = sqlite3.connect(tmp_path / "q.db")
    params = {"cuda": 0, "vram": 0.0, "ram": 8.0, "hostname": "h", "allow": None, "deny": "[]",
              "gpus": 0, "free": "[24.0,16.0]", "job_class": '["gbt",0,0,"[]"]'}
    plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + CLASSES))
    assert plan.count("SEARCH jobs USING INDEX jobs_pending_class (<expr>>?)") == 2  # seeks
    assert "TEMP B-TREE" not in plan and "SCAN jobs" not in plan
    plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + CLASS_CANDIDATES,
                                                   params))
    assert plan.startswith("SEARCH jobs USING INDEX jobs_pending_class (<expr>=?)")
    assert "TEMP B-TREE" not in plan


DENY_TRANSFORMER = '[hosts.cpu-a]\ndeny_jobs = ["transformer"]\n'


def _ineligible_ahead(n: int) -> list[dict[str, object]]:
    """n jobs cpu-a may not run (CUDA only, other hosts, a model its host denies), ranked
    ahead of one it may."""
    kinds = [{"require_cuda": True}, {"allowed_hosts": ["elsewhere"]}, {"model": "transformer"}]
    return [job(f"no{i}", priority=1, seed=i, **kinds[i % 3]) for i in range(n)] + [job("yes")]


def _claim_steps(path: Path, n: int) -> int:
    """SQLite VM steps (in hundreds) of one claim with n ineligible jobs ranked ahead."""
    q = SqliteQueue(path)
    q.sync_manifest(make_manifest(_ineligible_ahead(n), DENY_TRANSFORMER))
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    q._db.set_progress_handler(count, 100)
    claim = q.claim_next("c", cpu())
    q._db.set_progress_handler(None, 0)
    q.close()
    assert claim is not None and claim.job.name == "yes"
    return steps[0]


def test_claim_work_does_not_grow_with_ineligible_jobs_ranked_ahead(tmp_path: Path) -> None:
    few, many = _claim_steps(tmp_path / "few.db", 30), _claim_steps(tmp_path / "many.db", 3000)
    assert many <= 2 * few + 20, (few, many)  # a walk past them all took ~85 x as many


@pytest.mark.parametrize("cuda", [False, True])
def test_many_job_classes_fall_back_to_one_walk_in_rank_order(
        tmp_path: Path, cuda: bool) -> None:
    """Past MAX_CLASSES a claim walks the rank index; a CPU slot merges its two prefer_cuda
    runs, so prefer_cuda plays no part in its order, and a CUDA slot ranks by it."""
    host = "gpu-a" if cuda else "cpu-a"
    jobs = [job(f"c{i}", allowed_hosts=[f"h{i}", host], priority=i % 5, seed=i,
                prefer_cuda=i % 3 == 0, prefer_wait_s=0.0)
            for i in range(MAX_CLASSES + 6)]
    q = SqliteQueue(tmp_path / "q.db")
    q.sync_manifest(make_manifest(jobs))
    order = []
    while (claim := q.claim_next("c", gpu() if cuda else cpu())) is not None:
        order.append(claim.job.name)
    q.close()
    ranked = sorted(range(len(jobs)),
                    key=lambda i: (-(i % 5), -(cuda and i % 3 == 0), i))
    assert order == [f"c{i}" for i in ranked]


def test_the_claimed_job_is_its_row_as_stored(tmp_path: Path) -> None:
    """claim_next builds the claimed job from the picked one, without reading the row back:
    it must be what a read of the row gives."""
    q = SqliteQueue(tmp_path / "q.db")
    q.sync_manifest(make_manifest([job("a", allowed_hosts=["cpu-a"], hyper={"lr": 0.1})]),
                    now=1000.0)
    first = q.claim_next("w", cpu(), now=1001.0)
    assert first is not None
    q.heartbeat(first.job.job_id, first.lease, progress={"fraction": 0.5}, log_tail="x",
                now=1002.0)
    assert q.sweep_stale(now=2000.0) == [first.job.job_id]  # lost: pending again
    claim = q.claim_next("w2", cpu(), now=2001.0)  # its progress, log and attempt change
    assert claim is not None and claim.attempt == 2
    assert claim.job == q.get(claim.job.job_id)
    q.close()


def test_schema_newer_than_code_is_refused(tmp_path: Path) -> None:
    SqliteQueue(tmp_path / "q.db").close()
    db = sqlite3.connect(tmp_path / "q.db")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    with pytest.raises(Exception, match="newer than this release"):
        SqliteQueue(tmp_path / "q.db")


def test_prefer_cuda_rank_on_gpu_only(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q.db")
    q.sync_manifest(make_manifest([job("plain"), job("pref", prefer_cuda=True)]))
    claim = q.claim_next("c", cpu())
    assert claim is not None and claim.job.name == "plain"
    claim = q.claim_next("g", gpu())
    assert claim is not None and claim.job.name == "pref"
    q.close()


def test_a_claim_writes_no_attempts_host_entry_and_an_upgrade_makes_it_so(
        tmp_path: Path) -> None:
    """attempts_host holds ended attempts only (one page fewer to fsync per claim); a
    version 2 database gets the partial index on upgrade; the quarantine still seeks it."""
    path = tmp_path / "q.db"
    SqliteQueue(path).close()
    with sqlite3.connect(path) as db:  # back to version 2: its columns and its index
        for table, column in re.findall(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", MIGRATIONS[3]):
            db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute("DROP INDEX attempts_host")
        db.execute("CREATE INDEX attempts_host ON attempts (hostname, ended_at)")
        db.execute("CREATE INDEX jobs_pending_cpu ON jobs (priority DESC, manifest_index) "
                   "WHERE status = 'pending' AND orphaned = 0")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    q = SqliteQueue(path)
    q.sync_manifest(make_manifest([job("a")]), now=1000.0)
    claim = q.claim_next("w", cpu(), now=1001.0)
    assert claim is not None
    (entries,) = q._db.execute("SELECT count(*) FROM attempts INDEXED BY attempts_host "
                               "WHERE ended_at IS NOT NULL").fetchone()
    assert entries == 0
    q.complete(claim.job.job_id, claim.lease, "a" * 64, now=1002.0)
    (entries,) = q._db.execute("SELECT count(*) FROM attempts INDEXED BY attempts_host "
                               "WHERE ended_at IS NOT NULL").fetchone()
    assert entries == 1
    (sql,) = q._db.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'attempts_host'").fetchone()
    assert sql.endswith("WHERE ended_at IS NOT NULL")
    assert q._db.execute(  # version 2's rank indexes are one now
        "SELECT name FROM sqlite_master WHERE name = 'jobs_pending_cpu'").fetchone() is None
    plan = q._db.execute("EXPLAIN QUERY PLAN " + HOST_RECENT_ATTEMPTS,
                         {"hostname": "cpu-a", "since": 0.0, "k": 3}).fetchall()
    assert "USING INDEX attempts_host" in plan[0][3]
    q.close()

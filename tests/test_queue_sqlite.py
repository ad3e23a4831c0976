"""SQLite specifics: WAL, the claim's index, and many processes claiming at once."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import cpu, gpu, job, make_manifest
from trainfleet.queue.sqlite import CLAIM_CANDIDATES, ORDER_CPU, ORDER_CUDA, SqliteQueue


def test_database_runs_in_wal_mode(tmp_path: Path) -> None:
    SqliteQueue(tmp_path / "q.db").close()
    mode = sqlite3.connect(tmp_path / "q.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


@pytest.mark.parametrize(("index", "order"), [("jobs_pending_cpu", ORDER_CPU),
                                             ("jobs_pending_cuda", ORDER_CUDA)])
def test_claim_query_walks_the_partial_index_without_sorting(
    tmp_path: Path, index: str, order: str
) -> None:
    SqliteQueue(tmp_path / "q.db").close()
    db = sqlite3.connect(tmp_path / "q.db")
    params = {"cuda": 0, "vram": 0.0, "ram": 8.0, "hostname": "h", "allow": None, "deny": "[]"}
    plan = " | ".join(
        row[3] for row in db.execute(
            "EXPLAIN QUERY PLAN " + CLAIM_CANDIDATES.format(index=index, order=order), params
        )
    )
    assert f"USING INDEX {index}" in plan
    assert "TEMP B-TREE" not in plan


def test_schema_newer_than_code_is_refused(tmp_path: Path) -> None:
    SqliteQueue(tmp_path / "q.db").close()
    db = sqlite3.connect(tmp_path / "q.db")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    with pytest.raises(Exception, match="newer than this release"):
        SqliteQueue(tmp_path / "q.db")


def _claim_and_complete(path: str, worker: str, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    q = SqliteQueue(path)
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
def test_eight_processes_complete_every_job_exactly_once(tmp_path: Path) -> None:
    path = str(tmp_path / "q.db")
    q = SqliteQueue(path)
    q.sync_manifest(make_manifest([job(f"j{i}", seed=i) for i in range(2000)]))
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_claim_and_complete, args=(path, f"w{i}", results))
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
    claims = sqlite3.connect(path).execute(
        "SELECT count(*) FROM events WHERE kind = 'claimed'").fetchone()[0]
    assert claims == 2000
    assert sum(1 for done, _ in outcomes if done) >= 2  # the work really was shared
    q.close()


def test_prefer_cuda_rank_on_gpu_only(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q.db")
    q.sync_manifest(make_manifest([job("plain"), job("pref", prefer_cuda=True)]))
    claim = q.claim_next("c", cpu())
    assert claim is not None and claim.job.name == "plain"
    claim = q.claim_next("g", gpu())
    assert claim is not None and claim.job.name == "pref"
    q.close()

"""SQLite specifics: WAL, the claim's index, the schema version.

Many processes claiming at once: test_queue_concurrency.py, for every backend.
"""

from __future__ import annotations

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


def test_prefer_cuda_rank_on_gpu_only(tmp_path: Path) -> None:
    q = SqliteQueue(tmp_path / "q.db")
    q.sync_manifest(make_manifest([job("plain"), job("pref", prefer_cuda=True)]))
    claim = q.claim_next("c", cpu())
    assert claim is not None and claim.job.name == "plain"
    claim = q.claim_next("g", gpu())
    assert claim is not None and claim.job.name == "pref"
    q.close()

"""Job queue backends behind one protocol: SQLite (default) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from trainfleet.errors import BadRequest, TrainfleetError
from trainfleet.queue.base import JobQueue

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_queue(db: str | Path, *, stale_after_s: float = 600.0) -> JobQueue:
    """The queue named by `db`: a path, a sqlite:///path URL or a postgresql:// URL."""
    text = str(db)
    if text.startswith(POSTGRES_SCHEMES):
        return _open_postgres(text, stale_after_s)
    if text.startswith("sqlite:///"):
        text = text.removeprefix("sqlite:///")
    elif "://" in text:
        raise BadRequest(f"db: unsupported database URL {text.split('://')[0]}:// "
                         "(expected sqlite:///PATH or postgresql://...)")
    from trainfleet.queue.sqlite import SqliteQueue

    return SqliteQueue(text, stale_after_s=stale_after_s)


def _open_postgres(url: str, stale_after_s: float) -> JobQueue:
    try:
        from trainfleet.queue.postgres import PostgresQueue
    except ImportError as exc:
        raise TrainfleetError(
            "db: a postgresql:// database needs the postgres extra: "
            "pip install 'trainfleet[postgres]'"
        ) from exc
    return PostgresQueue(url, stale_after_s=stale_after_s)

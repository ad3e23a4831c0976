"""Job queue backends behind one protocol: SQLite (default) and, later, PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from trainfleet.errors import BadRequest
from trainfleet.queue.base import JobQueue


def open_queue(db: str | Path, *, stale_after_s: float = 600.0) -> JobQueue:
    """The queue named by `db`: a path or sqlite:///path URL."""
    text = str(db)
    if text.startswith("sqlite:///"):
        text = text.removeprefix("sqlite:///")
    elif "://" in text:
        raise BadRequest(f"db: unsupported database URL {text!r} (expected sqlite:///PATH)")
    from trainfleet.queue.sqlite import SqliteQueue

    return SqliteQueue(text, stale_after_s=stale_after_s)

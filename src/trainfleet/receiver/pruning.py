"""Garbage collection of checkpoints: the store keeps only those a job may still resume from.

A worker uploads a checkpoint every `checkpoint_interval_s` and records it as its job's
`checkpoint_id`, each one replacing the one before; a day of training leaves hundreds of them.
A checkpoint artifact is deleted once no job that is not completed names it (a completed job's
model is its result; a failed or cancelled job keeps its checkpoint, since a requeue resumes
from it) and it is older than the grace period: the upload and the call that records it are
two requests, so a checkpoint just uploaded is not named by its job yet. Models are never
deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from trainfleet.queue.base import JobQueue
from trainfleet.store import ArtifactStore, kind_of

log = logging.getLogger("trainfleet.receiver")


def prunable(
    rows: Iterable[dict[str, Any]], in_use: set[str], now: float, grace_s: float
) -> list[dict[str, Any]]:
    """The index rows of the checkpoints that may go: not in use, stored `grace_s` before
    `now` or earlier. A row without a readable `stored_at` stays (its age is unknown)."""
    found = []
    for row in rows:
        if kind_of(row) != "checkpoint" or row.get("artifact_id") in in_use:
            continue
        stored = _epoch(row.get("stored_at"))
        if stored is not None and now - stored >= grace_s:
            found.append(row)
    return found


def prune_checkpoints(
    store: ArtifactStore, queue: JobQueue, now: float, grace_s: float
) -> list[dict[str, Any]]:
    """Delete the checkpoints no job needs any more; the index rows of those deleted.

    The store is listed before the jobs are read, so a checkpoint recorded in between counts
    as in use. One deletion that fails is logged and the others go on; the next sweep tries
    it again. A checkpoint another receiver deleted first is skipped quietly.
    """
    rows = store.entries()
    in_use = queue.checkpoints_in_use()
    deleted = []
    for row in prunable(rows, in_use, now, grace_s):
        artifact_id = str(row["artifact_id"])
        try:
            if not store.delete(artifact_id):
                continue
        except Exception:
            log.exception("checkpoint %s: could not delete it", artifact_id[:12])
            continue
        log.info("checkpoint %s of job %s deleted (%s bytes): no job resumes from it",
                 artifact_id[:12], str(row.get("job_id") or "?")[:12], row.get("size", "?"))
        deleted.append(row)
    return deleted


def _epoch(stamp: object) -> float | None:
    """An index row's ISO 8601 `stored_at` as seconds since the epoch, or None."""
    if not isinstance(stamp, str):
        return None
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None

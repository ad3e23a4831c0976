"""Checkpoint pruning: the store keeps only the checkpoints some job may still need.

A worker uploads a checkpoint every `checkpoint_interval_s` and records it as its job's
`checkpoint_id`, each replacing the one before; a day of training leaves hundreds. An
artifact is deleted only when all of these hold:

1. every index row of it says `checkpoint`, and no job of any status names it as its
   `artifact_id` (ids are content hashes: a model may have a checkpoint's bytes);
2. no job that is not completed names it as its `checkpoint_id` (a failed or cancelled job
   keeps its checkpoint: a requeue resumes from it);
3. its last use (placed, uploaded again, or named by the checkpoint route: the bundle's
   mtime, by the receiver's wall clock) is at least the grace period ago;
4. (3) is checked again, and the delete made, under the store's lock, which every use takes.

Why that is safe: the store is listed, and each checkpoint's use stamp taken, before the jobs
are read. A checkpoint recorded before the read is in use. One recorded after it was marked
used first (routes.checkpoint); if that use came after the listing, its stamp has moved,
whatever the clocks say, and the delete (under the lock) sees it. If it came before the
listing, the route was between its use and its record while the prune listed and read:
its use is then at most moments older than the read, so the delete, made within grace/2 of
the read (the plan is dropped after that, by either clock: the next prune carries on) and
by a clock less than grace/2 (less those moments) ahead of the one that stamped the use,
finds it younger than the grace period. Hence receivers sharing a store need clocks well
within grace/2 of each other (NTP keeps them within milliseconds).
Never deletes a model; never deletes anything from an S3 store (store/s3.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from trainfleet.queue.base import JobQueue
from trainfleet.store import ArtifactStore, kind_of
from trainfleet.store.base import UseStamp
from trainfleet.store.local import NO_SPACE

log = logging.getLogger("trainfleet.receiver")


@dataclass
class Plan:
    """The checkpoints one prune may delete (index rows, iterated), the use stamp each had
    when listed, and when the jobs were read, by the monotonic and the store's wall clock."""

    rows: list[dict[str, Any]]
    stamps: dict[str, UseStamp]
    read_mono: float
    read_wall: float

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def age_s(self, store: ArtifactStore, monotonic: Callable[[], float]) -> float:
        """How long ago the jobs were read, by whichever clock says longer (a wall clock
        stepped forward counts: uses stamped before the step look that much older)."""
        return max(monotonic() - self.read_mono, store.clock() - self.read_wall)


def candidates(rows: Iterable[dict[str, Any]], in_use: set[str]) -> list[dict[str, Any]]:
    """The index rows of checkpoints no job needs: rules 1 and 2, and nothing of time."""
    return [row for row in rows
            if kind_of(row) == "checkpoint" and row.get("artifact_id") not in in_use]


def plan(store: ArtifactStore, queue: JobQueue,
         monotonic: Callable[[], float] = time.monotonic) -> Plan:
    """The candidates now: the store listed and the use stamps taken, the clocks read, and
    only then the jobs."""
    listed = candidates(store.entries(), set())
    stamps = {}
    for row in listed:
        stamp = store.use_stamp(str(row["artifact_id"]))
        if stamp is not None:  # else gone since the listing (or a store that keeps no uses)
            stamps[str(row["artifact_id"])] = stamp
    read_mono, read_wall = monotonic(), store.clock()
    rows = [row for row in candidates(listed, queue.artifacts_in_use())
            if row["artifact_id"] in stamps]
    return Plan(rows, stamps, read_mono, read_wall)


def delete_unused(store: ArtifactStore, planned: Plan, grace_s: float, *,
                  stop: threading.Event | None = None,
                  monotonic: Callable[[], float] = time.monotonic) -> list[dict[str, Any]]:
    """Delete each planned checkpoint still unused for `grace_s` and not used since it was
    listed (the store decides, under its lock); the rows of those deleted. Stops when `stop`
    is set, and once the plan is grace_s/2 old (the next prune carries on). One that fails is
    logged and the others go on; a full disk, with no room for a tombstone, stops it."""
    deleted = []

    def fresh() -> bool:  # asked again under the store's lock, last thing before a delete
        return planned.age_s(store, monotonic) < grace_s / 2

    for row in planned:
        if stop is not None and stop.is_set():
            log.info("checkpoint pruning stopped: the receiver is stopping")
            break
        if not fresh():
            log.info("checkpoint pruning stopped %.0f s after it read the jobs: the next "
                     "prune goes on", planned.age_s(store, monotonic))
            break
        artifact_id = str(row["artifact_id"])
        try:
            if not store.delete_if_unused(artifact_id, grace_s, planned.stamps[artifact_id],
                                          fresh):
                continue
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                log.warning("checkpoint pruning stopped: the store's disk is full, and each "
                            "delete first appends a row to its index (%s). Free a little "
                            "space; the next prune goes on", exc)
                break
            log.exception("checkpoint %s: could not delete it", artifact_id[:12])
            continue
        log.info("checkpoint %s of job %s deleted (%s bytes): no job can resume from it",
                 artifact_id[:12], str(row.get("job_id") or "?")[:12], row.get("size", "?"))
        deleted.append(row)
    return deleted


def prune_checkpoints(store: ArtifactStore, queue: JobQueue, grace_s: float, *,
                      stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """Delete the checkpoints no job can resume from, unused for `grace_s`; their rows."""
    return delete_unused(store, plan(store, queue), grace_s, stop=stop)

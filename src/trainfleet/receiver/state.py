"""What the routes share: settings, the current manifest, the queue and the store."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable

from trainfleet import manifest as manifest_mod
from trainfleet.queue import open_queue
from trainfleet.queue.base import SyncResult
from trainfleet.receiver import pruning
from trainfleet.receiver.metrics import Metrics
from trainfleet.receiver.settings import ReceiverSettings
from trainfleet.store import ArtifactStore, open_store

log = logging.getLogger("trainfleet.receiver")


class ReceiverState:
    """What the routes share: settings, the current manifest, the queue and the store."""

    def __init__(
        self,
        settings: ReceiverSettings,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        # The receiver's clock: wall time read once at start, then advanced by the
        # monotonic clock, so a wall-clock step never makes live jobs look stale.
        self.started_at = wall()
        self._monotonic = monotonic
        self._started_mono = monotonic()
        self.manifest = manifest_mod.load(settings.manifest_path)  # invalid: refuse to start
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        self.queue = open_queue(settings.db_path, stale_after_s=settings.stale_after_s)
        if self.queue.database_clock:  # receivers sharing a database keep its time
            self.started_at, self._started_mono = self.queue.clock(), monotonic()
        self.store: ArtifactStore = open_store(settings.store, settings.store_root,
                                               settings.s3_endpoint_url)
        purged = self.store.purge_temp()
        if purged:
            log.info("removed %d partial upload(s) left by an earlier run", purged)
        self.sync = self.queue.sync_manifest(self.manifest, now=self.queue_now())
        self.metrics = Metrics(lambda: self.queue)
        self.uploads = asyncio.Semaphore(settings.max_concurrent_uploads)
        self._pruning = threading.Lock()  # held by the one prune running
        self._pruned_at: float | None = None  #: monotonic time of the last prune
        self._prune_task: asyncio.Future[int] | None = None  #: the sweep's, in its thread
        #: Set when the receiver stops: a prune stops between two deletes.
        self.stopping = threading.Event()
        log.info("checkpoints: %s", self._pruning_policy())

    def now(self) -> float:
        """Seconds since the epoch by this receiver's step-free clock (started from the
        database's clock when the queue has one)."""
        return self.started_at + (self._monotonic() - self._started_mono)

    def queue_now(self) -> float | None:
        """`now` for a queue call: None lets a database with a clock time it in the statement,
        so receivers on several hosts stamp leases by one clock."""
        return None if self.queue.database_clock else self.now()

    @property
    def heartbeat_interval_s(self) -> float:
        return min(30.0, self.settings.stale_after_s / 3)

    def reload(self) -> SyncResult:
        manifest = manifest_mod.load(self.settings.manifest_path)
        result = self.queue.sync_manifest(manifest, now=self.queue_now())
        self.manifest = manifest
        gc.collect()  # the new manifest too lives until the next reload (see app.lifespan)
        gc.freeze()
        return result

    def _pruning_policy(self) -> str:
        if self.settings.keep_checkpoints:
            return "all kept (--keep-checkpoints)"
        if not self.store.prunes:
            return "all kept: pruning is not supported on an S3 store"
        return (f"those no job can resume from are deleted once unused for "
                f"{self.settings.checkpoint_grace_s:g} s (--checkpoint-grace)")

    def prune_due(self) -> bool:
        """Whether the periodic sweep should prune now: allowed, and not done within
        `prune_every_s` (the first sweep prunes)."""
        if self.settings.keep_checkpoints or not self.store.prunes:
            return False
        return (self._pruned_at is None
                or self._monotonic() - self._pruned_at >= self.settings.prune_every_s)

    @property
    def prune_running(self) -> bool:
        """Whether a prune runs now (in whichever thread)."""
        return self._pruning.locked()

    def prune_soon(self) -> None:
        """Start a prune in a thread when one is due and none runs: a task of its own, so the
        stale sweep goes on meanwhile. Called on the event loop."""
        if self.prune_due() and (self._prune_task is None or self._prune_task.done()):
            # Store calls block (a disk, or a network filesystem's flock): off the event loop.
            self._prune_task = asyncio.ensure_future(asyncio.to_thread(self.prune_checkpoints))

    async def stop_pruning(self) -> None:
        """Ask a running prune to stop, and wait until it has: the queue it reads is about
        to be closed."""
        self.stopping.set()
        if self._prune_task is not None:
            await self._prune_task

    def prune_checkpoints(self) -> int:
        """Delete the checkpoints no job can resume from (pruning.py); how many. Blocks on
        the store: the periodic sweep runs it in a thread. Never two at once (a prune already
        running makes this one do nothing), never raises: a failure is logged."""
        if self.settings.keep_checkpoints or not self.store.prunes:
            return 0
        if not self._pruning.acquire(blocking=False):
            return 0
        try:
            self._pruned_at = self._monotonic()
            deleted = pruning.prune_checkpoints(self.store, self.queue,
                                                self.settings.checkpoint_grace_s,
                                                stop=self.stopping)
        except Exception:
            log.exception("checkpoint pruning failed")
            return 0
        finally:
            self._pruning.release()
        self.metrics.checkpoints_pruned.inc(len(deleted))
        self.metrics.checkpoint_bytes_pruned.inc(sum(int(row.get("size") or 0)
                                                     for row in deleted))
        return len(deleted)

    def sweep(self) -> list[str]:
        swept = self.queue.sweep_stale(now=self.queue_now(), since=self.started_at)
        self.metrics.swept.inc(len(swept))
        for job_id in swept:
            log.warning("job %s: worker went silent; swept", job_id[:12])
        stalled = self.queue.fail_stalled(now=self.queue_now(), since=self.started_at)
        self.metrics.failures.labels("stalled").inc(len(stalled))
        for job_id in stalled:
            log.warning("job %s: progress stopped moving; failed as stalled", job_id[:12])
        rescheduled = self.queue.reschedule(now=self.queue_now())
        for job_id in rescheduled.unschedulable:
            log.warning("job %s: no worker seen in the fleet can run it; unschedulable",
                        job_id[:12])
        return swept

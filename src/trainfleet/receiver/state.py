"""What the routes share: settings, the current manifest, the queue and the store."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

from trainfleet import manifest as manifest_mod
from trainfleet.queue import open_queue
from trainfleet.queue.base import SyncResult
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

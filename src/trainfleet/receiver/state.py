"""What the routes share: settings, the current manifest, the queue and the store."""

from __future__ import annotations

import logging
import time

from trainfleet import manifest as manifest_mod
from trainfleet.queue import open_queue
from trainfleet.queue.base import SyncResult
from trainfleet.receiver.metrics import Metrics
from trainfleet.receiver.settings import ReceiverSettings
from trainfleet.store import LocalStore

log = logging.getLogger("trainfleet.receiver")


class ReceiverState:
    """What the routes share: settings, the current manifest, the queue and the store."""

    def __init__(self, settings: ReceiverSettings) -> None:
        self.settings = settings
        self.manifest = manifest_mod.load(settings.manifest_path)  # invalid: refuse to start
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        self.queue = open_queue(settings.db_path, stale_after_s=settings.stale_after_s)
        self.store = LocalStore(settings.store_root)
        purged = self.store.purge_temp()
        if purged:
            log.info("removed %d partial upload(s) left by an earlier run", purged)
        self.sync = self.queue.sync_manifest(self.manifest)
        self.started_at = time.time()
        self.metrics = Metrics(lambda: self.queue)

    @property
    def heartbeat_interval_s(self) -> float:
        return min(30.0, self.settings.stale_after_s / 3)

    def reload(self) -> SyncResult:
        manifest = manifest_mod.load(self.settings.manifest_path)
        result = self.queue.sync_manifest(manifest)
        self.manifest = manifest
        return result

    def sweep(self) -> list[str]:
        swept = self.queue.sweep_stale(since=self.started_at)
        self.metrics.swept.inc(len(swept))
        for job_id in swept:
            log.warning("job %s: worker went silent; swept", job_id[:12])
        return swept

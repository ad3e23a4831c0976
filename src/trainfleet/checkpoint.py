"""Trainer checkpoints: the newest one in an attempt's checkpoint dir, packed and uploaded
in the background while the trainer runs, and a resumed attempt's unpacked.

The trainer's side of the contract: each checkpoint is one entry (a file or a directory) in
`{checkpoint_dir}`, written under a temporary name (starting with "." or ending in ".tmp")
and renamed into place once whole. An entry changed within the last SETTLE_S is passed over,
while the trainer runs and also within SETTLE_S of its end (a trainer killed mid in-place
write leaves a torn file that every retry would resume from), and an entry that changes while
it is packed is dropped. Standard library only.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainfleet import bundle
from trainfleet.client import Client
from trainfleet.errors import TrainfleetError

log = logging.getLogger("trainfleet.worker")

SETTLE_S = 1.0  #: an entry changed more recently than this may still be being written
TEMP_SUFFIXES = (".tmp", ".partial")


class Changed(OSError):
    """The entry changed while it was packed: the bundle may mix old and new bytes."""


class Abandoned(Exception):
    """The attempt no longer needs this upload (raised inside it to stop it early)."""


@dataclass(frozen=True)
class Found:
    """The newest finished checkpoint entry and a fingerprint that changes when it does."""

    path: Path
    fingerprint: tuple[tuple[str, int, int], ...]  #: (relative path, mtime_ns, size) of each
    mtime: float  #: the newest mtime in the entry


def newest(checkpoint_dir: Path, settle_s: float = SETTLE_S,
           now: float | None = None) -> Found | None:
    """The newest entry by mtime that looks finished, or None; unreadable entries are skipped
    (the trainer may be renaming or deleting old checkpoints as we look)."""
    now = time.time() if now is None else now
    best: Found | None = None
    try:
        names = sorted(os.listdir(checkpoint_dir))
    except OSError:
        return None
    for name in names:
        if name.startswith(".") or name.endswith(TEMP_SUFFIXES):
            continue
        try:
            found = _fingerprint(checkpoint_dir / name)
        except OSError:
            continue
        if found.mtime > now - settle_s:
            continue
        if best is None or found.mtime > best.mtime:
            best = found
    return best


def _fingerprint(path: Path) -> Found:
    """Every file of the entry with its mtime and size; a symlink or a device is refused."""
    files: list[tuple[str, int, int]] = []
    if path.is_dir() and not path.is_symlink():
        for dirpath, _dirs, filenames in os.walk(path):
            for filename in filenames:
                full = Path(dirpath, filename)
                st = full.lstat()
                files.append((full.relative_to(path).as_posix(), st.st_mtime_ns, st.st_size))
        files.append((".", path.stat().st_mtime_ns, 0))
    else:
        st = path.lstat()
        if not path.is_file() or path.is_symlink():
            raise OSError(f"{path}: not a regular file or directory")
        files.append((".", st.st_mtime_ns, st.st_size))
    files.sort()
    return Found(path, tuple(files), max(mtime for _, mtime, _ in files) / 1e9)


def pack(found: Found, work_dir: Path) -> bundle.Bundle:
    """Bundle the entry as `<name>` at the bundle's top, via hard links where the filesystem
    allows (no copy of a large checkpoint), into `work_dir/checkpoint.bundle`.

    A hard link shares the trainer's file, so a rewrite in place that starts after `newest`
    would leak into the bundle: every file is fingerprinted again once packed, and Changed is
    raised (the bundle removed) when anything differs from `found`."""
    stage = work_dir / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        target = stage / found.path.name
        if found.path.is_dir():
            shutil.copytree(found.path, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(found.path), str(target))
        made = bundle.create(stage, work_dir / "checkpoint.bundle")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    try:
        same = _fingerprint(found.path).fingerprint == found.fingerprint
    except OSError:
        same = False
    if not same:
        made.path.unlink(missing_ok=True)
        raise Changed(f"{found.path.name} changed while it was packed")
    return made


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def unpack(bundle_path: Path, dest_dir: Path) -> Path:
    """Extract a checkpoint bundle (checked like any bundle); the path to hand the trainer:
    the single entry it holds, or `dest_dir` when it holds several."""
    bundle.extract(bundle_path, dest_dir)
    entries = sorted(dest_dir.iterdir())
    return entries[0] if len(entries) == 1 else dest_dir


class Uploader:
    """Uploads one attempt's newest checkpoint, at most one upload at a time.

    `due`/`start` run it on a background thread, so a large checkpoint never delays a
    heartbeat; `final` waits for that and uploads once more (the worker runs it on a thread
    and heartbeats meanwhile); `abandon` ends an upload whose result is no longer needed.
    A failure is logged and never fails the job: the previous checkpoint stays the job's.
    """

    def __init__(
        self, client: Client, job_id: str, lease: str, attempt: int, checkpoint_dir: Path,
        work_dir: Path, interval_s: float, progress: Callable[[], dict[str, Any] | None],
    ) -> None:
        self.client = client
        self.job_id, self.lease, self.attempt = job_id, lease, attempt
        self.checkpoint_dir = checkpoint_dir
        self.work_dir = work_dir
        self.interval_s = interval_s
        self.progress = progress
        self.uploaded: str | None = None  #: the artifact id last recorded
        self._fingerprint: tuple[tuple[str, int, int], ...] | None = None
        self._next = time.monotonic() + interval_s
        self._thread: threading.Thread | None = None
        self._abandoned = threading.Event()

    def due(self, now: float) -> bool:
        """Whether a periodic upload should start now (none running, the interval passed)."""
        if self.interval_s <= 0 or now < self._next:
            return False
        return self._thread is None or not self._thread.is_alive()

    def start(self, now: float) -> None:
        """Upload the newest settled checkpoint on a background thread."""
        self._next = now + self.interval_s
        self._thread = threading.Thread(target=self.upload_newest, args=(SETTLE_S,),
                                        name=f"checkpoint-{self.job_id[:12]}", daemon=True)
        self._thread.start()

    def final(self, stopped_at: float | None = None) -> None:
        """The trainer stopped (at `stopped_at`, time.time()): wait for a running upload, then
        upload its last checkpoint. An entry changed within SETTLE_S of the stop may be torn
        (killed mid-write in place): the newest entry settled by then is taken instead."""
        if self._thread is not None:
            self._thread.join()
        if self.interval_s > 0 and not self._abandoned.is_set():
            self.upload_newest(SETTLE_S, now=stopped_at)

    def abandon(self) -> None:
        """The attempt no longer needs an upload (it completed, or lost its lease): a running
        one stops at its next chunk and records nothing. Never waits. (The receiver fences
        a checkpoint recorded after the attempt ended in any case.)"""
        self._abandoned.set()

    def upload_newest(self, settle_s: float, now: float | None = None) -> str | None:
        """Pack, upload and record the newest checkpoint settled at `now` if it changed; its
        artifact id."""
        found = newest(self.checkpoint_dir, settle_s, now)
        if found is None or found.fingerprint == self._fingerprint or self._abandoned.is_set():
            return None
        short = self.job_id[:12]
        try:
            made = pack(found, self.work_dir)
            try:
                if made.artifact_id != self.uploaded:
                    self._send(made)
            finally:
                made.path.unlink(missing_ok=True)
        except Abandoned:
            log.info("job %s: checkpoint upload abandoned: the attempt is over", short)
            return None
        except (OSError, ValueError, TrainfleetError) as exc:
            log.warning("job %s: checkpoint %s not uploaded (training goes on): %s",
                        short, found.path.name, exc)
            return None
        self._fingerprint = found.fingerprint
        return made.artifact_id

    def _send(self, made: bundle.Bundle) -> None:
        if not self.client.has_artifact(made.artifact_id):
            self.client.upload(made.artifact_id, made.path, self.job_id, self.lease,
                               progress=self._check_abandoned, attempt=self.attempt,
                               kind="checkpoint")
        self._check_abandoned()
        self.client.checkpoint(self.job_id, self.lease, made.artifact_id, attempt=self.attempt,
                               progress=self.progress())
        self.uploaded = made.artifact_id
        log.info("job %s: checkpoint of %d bytes uploaded as %s", self.job_id[:12], made.size,
                 made.artifact_id[:12])

    def _check_abandoned(self, sent: int = 0, total: int = 0) -> None:
        """Raise Abandoned once `abandon` was called (also the upload's per-chunk progress)."""
        if self._abandoned.is_set():
            raise Abandoned

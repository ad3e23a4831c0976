"""The artifact store on a filesystem several receivers share (NFS, SMB, one local disk).

The layout and the atomic publish are LocalStore's. What sharing adds: the existence check,
the rename and the index append happen under an exclusive `flock` on `<root>/.lock`, so two
receivers never tear `index.jsonl` or index one artifact twice; each receiver streams into its
own `.tmp/<owner>/` (held by a lock while it lives), so a starting receiver removes only what
dead ones left; and every read first picks up the rows other receivers appended.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainfleet.errors import TrainfleetError
from trainfleet.store.local import _FILENAMES, LocalStore, _fsync_dir, _mkdir_durable, _parse_row

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)

STRAY_TEMP_AGE_S = 24 * 3600.0  #: loose temp files this old (from a LocalStore) are removed


class SharedStore(LocalStore):
    """LocalStore that any number of receivers, on any hosts, may use at once."""

    def __init__(self, root: Path) -> None:
        if sys.platform == "win32":
            raise TrainfleetError("--store: a shared store needs POSIX file locks (flock)")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self._lock_path = root / ".lock"
        self._offset = 0  #: bytes of index.jsonl already read
        with _exclusive(self._lock_path):  # nobody publishes while the index is checked
            super().__init__(root)
            self._offset = _size(self.index_path)
        owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp_dir = self.root / ".tmp" / owner
        self.tmp_dir.mkdir(parents=True)
        # Held until this process ends: while it is, no other receiver purges this dir.
        self._owner_fd = _hold(self.tmp_dir / ".owner")

    def has(self, artifact_id: str) -> bool:
        self._refresh()
        return super().has(artifact_id)

    def path(self, artifact_id: str) -> Path:
        self._refresh()
        return super().path(artifact_id)

    def entry(self, artifact_id: str) -> dict[str, Any]:
        self._refresh()
        return super().entry(artifact_id)

    def entries(self, model: str | None = None) -> list[dict[str, Any]]:
        self._refresh()
        return super().entries(model)

    def purge_temp(self) -> int:
        """Remove the temp dirs of receivers that are gone (their lock is free); a count."""
        count = 0
        for path in (self.root / ".tmp").iterdir():
            if path == self.tmp_dir:
                continue
            if path.is_dir():
                count += _remove_if_abandoned(path)
            elif time.time() - path.stat().st_mtime > STRAY_TEMP_AGE_S:
                path.unlink(missing_ok=True)
                count += 1
        return count

    def close(self) -> None:
        os.close(self._owner_fd)

    # -- plumbing ------------------------------------------------------------

    def _refresh(self) -> None:
        """Take in the index rows other receivers appended since the last look."""
        with self._lock:
            self._read_new_rows()

    def _read_new_rows(self) -> None:
        size = _size(self.index_path)
        if size <= self._offset:
            return
        with open(self.index_path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read(size - self._offset)
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
        self._offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            row = _parse_row(line)
            if row is None:
                continue
            artifact_id = row["artifact_id"]
            self._rows.setdefault(artifact_id, row)
            target = self._target(row)
            if artifact_id not in self._paths and target.exists():
                self._paths[artifact_id] = target

    def _target(self, row: dict[str, Any]) -> Path:
        folder = self.root / f"{row['model']}_{row['mode']}" / str(row["artifact_id"])
        return folder / _FILENAMES.get(str(row.get("compression")), "bundle.tar.gz")

    def _place(self, tmp_path: Path, row: dict[str, Any]) -> bool:
        """Under the store's lock: rename into place and index once; False if already stored."""
        artifact_id = row["artifact_id"]
        target = self._target(row)
        with self._lock, _exclusive(self._lock_path):
            self._read_new_rows()
            if artifact_id in self._paths:
                return False
            _mkdir_durable(target.parent)
            os.replace(tmp_path, target)
            _fsync_dir(target.parent)
            self._paths[artifact_id] = target
            if artifact_id not in self._rows:
                self._index_placed(row)
            return True

    def _append_row(self, row: dict[str, Any]) -> None:
        """One O_APPEND write of one whole line, fsynced; the caller holds the lock."""
        created = not self.index_path.exists()
        line = (json.dumps(row) + "\n").encode("utf-8")
        fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.root)
        self._rows[row["artifact_id"]] = row
        self._offset = _size(self.index_path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on lock_path for the block (blocks until it is free)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _hold(lock_path: Path) -> int:
    """Take an exclusive flock on lock_path and keep it; the open descriptor."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _remove_if_abandoned(folder: Path) -> int:
    """Remove another receiver's temp dir if its owner is gone; how many files it held."""
    fd = os.open(folder / ".owner", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # its receiver is alive and may be mid-upload
        count = sum(1 for path in folder.iterdir() if path.name != ".owner")
        shutil.rmtree(folder, ignore_errors=True)
        if count:
            log.info("%s: removed %d partial upload(s) of a stopped receiver", folder, count)
        return count
    finally:
        os.close(fd)

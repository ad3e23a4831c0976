"""The artifact store on a filesystem several receivers share (NFS, SMB, one local disk).

The layout and the atomic publish are LocalStore's. What sharing adds: the existence check,
the rename and the index append happen under an exclusive `flock` on `<root>/.lock`, so two
receivers never tear `index.jsonl` or index one artifact twice; each receiver streams into its
own `.tmp/<owner>/` (held by a lock while it lives), so a starting receiver removes only what
dead ones left; and every read first picks up the rows other receivers appended, their
re-kindings and tombstones included. Every use of an artifact (mark_used) and every delete
take the same `flock`, so a delete's last look at a bundle's last use is never stale.

A receiver of an earlier release reads no tombstone: it would go on serving what another
deleted. This release marks its temp dir with `.reads-tombstones`, and deletes nothing while
a live receiver's temp dir lacks the mark.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainfleet.errors import TrainfleetError
from trainfleet.store.local import LocalStore, _parse_row

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)

STRAY_TEMP_AGE_S = 24 * 3600.0  #: loose temp files this old (from a LocalStore) are removed
#: In a receiver's temp dir: it reads tombstones (deletes). Receivers of earlier releases
#: leave none, and while one of them lives nothing is deleted.
READS_TOMBSTONES = ".reads-tombstones"


class SharedStore(LocalStore):
    """LocalStore that any number of receivers, on any hosts, may use at once."""

    uses_block = True  #: mark_used waits for the `flock`, which another receiver may hold

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        if sys.platform == "win32":
            raise TrainfleetError("--store: a shared store needs POSIX file locks (flock)")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self._lock_path = root / ".lock"
        self._offset = 0  #: bytes of index.jsonl already read
        self._warned: set[str] = set()  #: receivers of an earlier release already logged
        with _exclusive(self._lock_path):  # nobody publishes while the index is checked
            super().__init__(root, clock)
            self._offset = _size(self.index_path)
        owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp_dir = self.root / ".tmp" / owner
        self.tmp_dir.mkdir(parents=True)
        (self.tmp_dir / READS_TOMBSTONES).touch()  # before .owner: never seen live without it
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

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The store's `flock`, then this process's lock, after the rows others appended. In
        that order: a thread waiting for another receiver's flock holds nothing that has(),
        on the event loop, waits for."""
        with _exclusive(self._lock_path), self._lock:
            self._read_new_rows()
            yield

    def _deletes_blocked(self) -> bool:
        """Whether a receiver of an earlier release is alive: it would go on answering that
        it holds what is deleted. The lock is held."""
        older = _earlier_receivers(self.root / ".tmp")
        for owner in sorted(set(older) - self._warned):
            log.warning("store: receiver %s, of an earlier release, shares %s: no checkpoint "
                        "is deleted while it runs (upgrade or stop it)", owner, self.root)
        self._warned = set(older)
        return bool(older)

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
            self._remember(row)  # the last row wins; a tombstone forgets the artifact
            artifact_id = row["artifact_id"]
            known = self._rows.get(artifact_id)
            if known is not None and artifact_id not in self._paths:
                target = self._target(known)
                if target.exists():
                    self._paths[artifact_id] = target

    def _append_row(self, row: dict[str, Any]) -> None:
        """LocalStore's (whole or nothing); the caller holds the lock, and has read every row
        before: what lies past them is a torn line a dead receiver left."""
        super()._append_row(row)
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
        count = sum(1 for path in folder.iterdir()
                    if path.name not in (".owner", READS_TOMBSTONES))
        shutil.rmtree(folder, ignore_errors=True)
        if count:
            log.info("%s: removed %d partial upload(s) of a stopped receiver", folder, count)
        return count
    finally:
        os.close(fd)


def _earlier_receivers(tmp_root: Path) -> list[str]:
    """The live receivers whose temp dir lacks the READS_TOMBSTONES mark: earlier releases."""
    found = []
    for folder in sorted(tmp_root.iterdir()):
        if folder.is_dir() and not (folder / READS_TOMBSTONES).exists() and _alive(folder):
            found.append(folder.name)
    return found


def _alive(folder: Path) -> bool:
    """Whether the receiver owning a temp dir holds its `.owner` lock. The test takes the lock
    for a moment; a dir without `.owner` is not (or not yet) a receiver's, and one whose
    `.owner` cannot be opened is taken for alive: nothing is deleted on a doubt."""
    try:
        fd = os.open(folder / ".owner", os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the lock, if this took it
    return False

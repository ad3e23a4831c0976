"""The local-filesystem artifact store: the only code that writes under the store root.

`<root>/<model>_<mode>/<sha256>/bundle.tar.{zst,gz}` plus `<root>/index.jsonl`, one row per
artifact. One process owns a root; no artifact is visible before its digest is verified.

The index is append-only and an id's last row wins: a later row re-kinds a checkpoint as a
model (never back), and a tombstone (`{"artifact_id", "deleted_at", "last_used_ns", ...}`)
deletes it. A row is appended whole or not at all: a failed write is cut back off, so no torn
line is left for the next row to be glued to. A delete writes its tombstone (fsynced) first,
then moves the bundle's folder into `.tmp/` and removes it; a start that finds a bundle whose
last row is a tombstone finishes the delete, unless the bundle was stored again after it
(mtime past the tombstone's `last_used_ns`: an earlier release, which appends no row for an
id it has one for): that one is kept, and indexed as a model. A bundle's mtime is its last
use (placed, uploaded again, named by a job), by `clock`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from trainfleet.bundle import sniff_compression
from trainfleet.errors import (
    ArtifactNotFound,
    BadRequest,
    DigestMismatch,
    InsufficientStorage,
    PayloadTooLarge,
    TrainfleetError,
)
from trainfleet.store.base import DEFAULT_KIND, UseStamp, check_kind, kind_of

log = logging.getLogger(__name__)

_ARTIFACT_ID = re.compile(r"[0-9a-f]{64}")
_PATH_PART = re.compile(r"[A-Za-z0-9._-]+")
_FILENAMES = {"zstd": "bundle.tar.zst", "gzip": "bundle.tar.gz"}
_COMPRESSION_OF = {filename: compression for compression, filename in _FILENAMES.items()}
# A full disk, a file size limit (RLIMIT_FSIZE) or a quota: the client should retry later.
NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


class LocalStore:
    """Artifacts on a local filesystem, with an append-only index kept in memory too."""

    remote = False  #: disk calls are made on the event loop, as they always were
    prunes = True  #: delete_if_unused deletes
    uses_block = False  #: mark_used waits only on this process's lock, held briefly

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / ".tmp"  # inside root, so the final rename never crosses devices
        self.index_path = self.root / "index.jsonl"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock  #: this receiver's wall clock, which stamps and reads last uses
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, Any]] = {}
        self._paths: dict[str, Path] = {}
        self._tombstoned: dict[str, dict[str, Any]] = {}  #: the tombstones that are last rows
        self._load_index()
        self._paths = self._scan()
        self._finish_deletes()
        self._repair_index()

    def has(self, artifact_id: str) -> bool:
        with self._lock:
            return artifact_id in self._paths

    def path(self, artifact_id: str) -> Path:
        """Where the artifact's bundle lies; ArtifactNotFound if it is not stored."""
        with self._lock:
            if artifact_id not in self._paths:
                raise ArtifactNotFound(artifact_id)
            return self._paths[artifact_id]

    def location(self, artifact_id: str) -> str:
        """The bundle's path, for people."""
        return str(self.path(artifact_id))

    def local_path(self, artifact_id: str) -> Path:
        """The bundle's file, which the receiver sends as it is."""
        return self.path(artifact_id)

    def open(self, artifact_id: str) -> IO[bytes]:
        """The bundle, opened for reading; ArtifactNotFound if it is not stored."""
        return open(self.path(artifact_id), "rb")

    def entry(self, artifact_id: str) -> dict[str, Any]:
        """The artifact's index row; ArtifactNotFound if it is not stored."""
        with self._lock:
            if artifact_id not in self._paths:
                raise ArtifactNotFound(artifact_id)
            return dict(self._rows[artifact_id])

    def entries(self, model: str | None = None) -> list[dict[str, Any]]:
        """Index rows of stored artifacts, oldest first, optionally of one model."""
        with self._lock:
            rows = [self._rows[artifact_id] for artifact_id in self._paths]
        rows = [dict(row) for row in rows if model is None or row.get("model") == model]
        return sorted(rows, key=lambda row: str(row.get("stored_at")))

    def begin_upload(self, artifact_id: str, max_bytes: int) -> Upload:
        """Start streaming an artifact into a temp file; see Upload."""
        if not _ARTIFACT_ID.fullmatch(artifact_id):
            raise BadRequest(f"sha256: expected 64 lowercase hex digits, got {artifact_id!r}")
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix=f"{artifact_id}.", suffix=".part")
        return Upload(self, artifact_id, max_bytes, os.fdopen(fd, "wb"), Path(name))

    def purge_temp(self) -> int:
        """Remove temp files that crashed uploads left, and the folders of deleted bundles a
        stop left there; only safe while no upload runs."""
        count = 0
        for path in self.tmp_dir.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            count += 1
        return count

    def mark_used(self, artifact_id: str, kind: str | None = None) -> bool:
        """Make now the artifact's last use (its bundle's mtime) and, with kind "model", make
        a stored checkpoint a model; False when it is not stored."""
        with self._locked():
            return self._use(artifact_id, kind)

    def use_stamp(self, artifact_id: str) -> UseStamp | None:
        """What changes with every use of the artifact (its bundle's mtime and ctime, whatever
        the clocks say); None when it is not stored."""
        with self._lock:
            path = self._paths.get(artifact_id)
        try:
            return None if path is None else _stamp(path.stat())
        except FileNotFoundError:
            return None

    def delete_if_unused(self, artifact_id: str, unused_for_s: float,
                         unchanged_since: UseStamp | None = None,
                         plan_fresh: Callable[[], bool] | None = None) -> bool:
        """Delete a checkpoint last used `unused_for_s` or more ago, not used since its use
        stamp was `unchanged_since`, and while `plan_fresh()` holds, all checked under the
        lock that every use takes; whether it was deleted. Its folder is removed after the
        lock is let go: unlinking gigabytes takes a while, and the routes wait for the lock."""
        with self._locked():
            deleted, trash = self._delete_if_unused(artifact_id, unused_for_s, unchanged_since,
                                                    plan_fresh)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return deleted

    # -- plumbing ------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The store's lock, which publishing, every use and every delete hold."""
        with self._lock:
            yield

    def _target(self, row: dict[str, Any]) -> Path:
        folder = self.root / f"{row['model']}_{row['mode']}" / str(row["artifact_id"])
        return folder / _FILENAMES.get(str(row.get("compression")), "bundle.tar.gz")

    def _place(self, tmp_path: Path, row: dict[str, Any]) -> bool:
        """Rename a verified, fsynced temp file into place and index it; False if it was
        already stored. Either way the upload is a use of the artifact."""
        artifact_id = row["artifact_id"]
        target = self._target(row)
        with self._locked():
            if artifact_id in self._paths:
                self._use(artifact_id, row["kind"])
                return False
            _mkdir_durable(target.parent)
            os.replace(tmp_path, target)
            _fsync_dir(target.parent)
            self._paths[artifact_id] = target
            # Else a row whose bundle was deleted by hand. After a delete (a tombstone forgets
            # the row) should this row fail to follow the tombstone on disk, the next start
            # finds the bundle used after the tombstone's `last_used_ns`, and keeps it.
            if artifact_id not in self._rows:
                self._index_placed(row)
            self._use(artifact_id, row["kind"])
            return True

    def _use(self, artifact_id: str, kind: str | None) -> bool:
        """mark_used() with the lock held."""
        path = self._paths.get(artifact_id)
        if path is None:
            return False
        now = self.clock()
        try:
            os.utime(path, (now, now))
        except FileNotFoundError:  # removed by hand: no longer stored
            del self._paths[artifact_id]
            return False
        row = self._rows.get(artifact_id)
        if kind == "model" and row is not None and kind_of(row) != "model":
            try:
                self._append_row({**row, "kind": "model"})
            except OSError as exc:  # its job's reference protects it all the same
                log.warning("%s: %s not re-kinded as a model (%s)", self.index_path,
                            artifact_id[:12], exc)
        return True

    def _delete_if_unused(self, artifact_id: str, unused_for_s: float,
                          unchanged_since: UseStamp | None,
                          plan_fresh: Callable[[], bool] | None) -> tuple[bool, Path | None]:
        """delete_if_unused() with the lock held: whether it deleted, and the folder moved
        into the temp dir for removal (None if the move failed: the next start removes it)."""
        path, row = self._paths.get(artifact_id), self._rows.get(artifact_id)
        if path is None or row is None or kind_of(row) != "checkpoint":
            return False, None
        try:
            st = _fresh_stat(path)
        except FileNotFoundError:
            return False, None
        if unchanged_since is not None and _stamp(st) != unchanged_since:
            return False, None  # used since the prune listed it, by whatever clock
        if self.clock() - st.st_mtime < unused_for_s:
            return False, None
        if plan_fresh is not None and not plan_fresh():
            return False, None
        if self._deletes_blocked():
            return False, None
        folder = self._bundle_folder(path, artifact_id)
        # First: see the module docstring.
        self._append_row(_tombstone(row, self.clock(), st.st_mtime_ns))
        return True, self._move_aside(folder)

    def _deletes_blocked(self) -> bool:
        """Whether nothing may be deleted now: never, for a store one process owns."""
        return False

    def _bundle_folder(self, path: Path, artifact_id: str) -> Path:
        """The folder `<root>/<model>_<mode>/<artifact_id>` of a bundle about to be deleted;
        an error, and nothing deleted, when links lead it anywhere else."""
        root, real = self.root.resolve(), path.resolve()
        if (real.parent.name != artifact_id or real.parent.parent.parent != root
                or real.name not in _COMPRESSION_OF):
            raise TrainfleetError(f"store: {path} is not a bundle inside {root}; not deleted")
        return path.parent

    def _move_aside(self, folder: Path) -> Path | None:
        """Rename a deleted bundle's folder into the temp dir (one filesystem), where it is
        removed; None when the rename failed, for the next start to finish."""
        trash = self.tmp_dir / f"{folder.name}.{secrets.token_hex(4)}.deleted"
        try:
            os.replace(folder, trash)
            _fsync_dir(folder.parent)
        except OSError as exc:
            log.warning("%s: not moved aside (%s); the next start removes it", folder, exc)
            return None
        return trash

    def _finish_deletes(self) -> None:
        """Remove the bundles whose last index row is a tombstone: deletes that stopped
        between the tombstone and the bundle's removal. A bundle used after the tombstone's
        `last_used_ns` was stored again since, by an earlier release (it appends no row for
        an id it has a row for); so was one under a tombstone without `last_used_ns` (the
        reverted first version's, which removed the bundle before writing it). Those are
        kept, and indexed as models."""
        for artifact_id in sorted(self._tombstoned.keys() & self._paths.keys()):
            path = self._paths[artifact_id]
            if _stored_since(path, self._tombstoned[artifact_id]):
                log.warning("%s: stored again after its delete (by a receiver of an earlier "
                            "release?); kept, and indexed as a model", path)
                self._index_placed(_repaired_row(artifact_id, path))
                continue
            del self._paths[artifact_id]
            if self._deletes_blocked():
                continue  # not served; removed at a start with no such receiver alive
            log.warning("%s: deleted in the index; finishing the delete", path)
            try:
                trash = self._move_aside(self._bundle_folder(path, artifact_id))
            except TrainfleetError as exc:
                log.warning("%s", exc.message)
                continue
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)

    def _index_placed(self, row: dict[str, Any]) -> None:
        """Index a bundle already renamed into place. When the row cannot be appended (disk
        full), it is kept in memory only, so the artifact is served now; the bundle is
        durable, and the next start's repair writes a row for it, of kind model (the kind
        is not on disk): a checkpoint so rebuilt is never pruned, which is the safe side."""
        try:
            self._append_row(row)
        except OSError as exc:
            self._remember(row)
            log.warning("%s: index row of %s not written (%s); it is rebuilt from the bundle "
                        "at the next start", self.index_path, row["artifact_id"][:12], exc)

    def _append_row(self, row: dict[str, Any]) -> None:
        """Append one index row, whole and fsynced, or raise having appended nothing; the
        caller holds the lock."""
        _append_line(self.index_path, (json.dumps(row) + "\n").encode("utf-8"))
        self._remember(row)

    def _remember(self, row: dict[str, Any]) -> None:
        """Take an index row in: an id's last row wins, but a model stays a model; a
        tombstone forgets the artifact."""
        artifact_id = row["artifact_id"]
        if is_tombstone(row):
            self._rows.pop(artifact_id, None)
            self._paths.pop(artifact_id, None)
            self._tombstoned[artifact_id] = row
            return
        self._tombstoned.pop(artifact_id, None)
        before = self._rows.get(artifact_id)
        if before is not None and kind_of(before) == "model" and kind_of(row) != "model":
            row = {**row, "kind": "model"}
        self._rows[artifact_id] = row

    def _load_index(self) -> None:
        """Take in the index rows; a torn last line (crash mid-append) is cut off."""
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            log.warning("%s: dropping a torn last line", self.index_path)
            with open(self.index_path, "r+b") as fh:
                fh.truncate(len(complete))
                os.fsync(fh.fileno())
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            row = _parse_row(line)
            if row is None:
                log.warning("%s:%d: not an index row, skipped", self.index_path, number)
                continue
            self._remember(row)

    def _scan(self) -> dict[str, Path]:
        """The bundles actually on disk: the truth that has() and path() answer from."""
        found: dict[str, Path] = {}
        for path in sorted(self.root.glob("*/*/bundle.tar.*")):
            if path.name in _COMPRESSION_OF and _ARTIFACT_ID.fullmatch(path.parent.name):
                found.setdefault(path.parent.name, path)
        return found

    def _repair_index(self) -> None:
        """Add rows for bundles a crash left unindexed (renamed into place, row not appended)."""
        for artifact_id, path in self._paths.items():
            if artifact_id not in self._rows:
                log.warning("%s: bundle without an index row, adding one", path)
                self._append_row(_repaired_row(artifact_id, path))


class Upload:
    """One artifact streaming into a temp file, hashed as it goes; invisible until commit().

    As a context manager it aborts on leaving, which does nothing after a commit.
    """

    def __init__(
        self, store: LocalStore, artifact_id: str, max_bytes: int, fh: IO[bytes], tmp_path: Path
    ) -> None:
        self.artifact_id = artifact_id
        self.max_bytes = max_bytes
        self.size = 0
        self._store = store
        self._fh: IO[bytes] | None = fh
        self._tmp_path = tmp_path
        self._digest = hashlib.sha256()
        self._head = b""  # the first bytes, whose magic number names the compression

    def write_blocks(self, size: int) -> bool:
        """Never: a local disk write is quick enough for the event loop (issue 8 measured)."""
        return False

    def write(self, chunk: bytes) -> None:
        """Append a chunk; PayloadTooLarge (and the temp file removed) once past max_bytes."""
        fh = self._open_file()
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(self.max_bytes)
        try:
            fh.write(chunk)
        except OSError as exc:
            self.abort()
            if exc.errno in NO_SPACE:
                raise InsufficientStorage("upload", exc.strerror or str(exc)) from exc
            raise
        self._digest.update(chunk)
        if len(self._head) < 4:
            self._head = (self._head + chunk)[:4]

    def commit(
        self, *, job_id: str, model: str, mode: str, host: str, kind: str = DEFAULT_KIND
    ) -> bool:
        """Verify, make durable and publish the artifact; False if it was already stored.

        On any error the temp file is removed and nothing becomes visible.
        """
        self._open_file()  # a finished upload cannot be committed
        try:
            row = self._row(job_id=job_id, model=model, mode=mode, host=host, kind=kind)
            self._sync_and_close()
            placed = self._store._place(self._tmp_path, row)
        except OSError as exc:
            self.abort()
            if exc.errno in NO_SPACE:
                raise InsufficientStorage("upload", exc.strerror or str(exc)) from exc
            raise
        except BaseException:
            self.abort()
            raise
        if not placed:
            self.abort()  # the stored copy has the same bytes: never rewrite it
        return placed

    def abort(self) -> None:
        """Drop the temp file; safe to call any number of times."""
        fh, self._fh = self._fh, None
        if fh is not None:
            with suppress(OSError):  # flushing what a full disk refused fails again
                fh.close()
        self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> Upload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fh is not None:
            self.abort()

    def _open_file(self) -> IO[bytes]:
        if self._fh is None:
            raise ValueError(f"upload of {self.artifact_id} is already finished")
        return self._fh

    def _row(
        self, *, job_id: str, model: str, mode: str, host: str, kind: str
    ) -> dict[str, Any]:
        """The index row, once the fields and the uploaded bytes have been checked."""
        return make_row(self.artifact_id, self._digest.hexdigest(), self._head, self.size,
                        job_id=job_id, model=model, mode=mode, host=host, kind=kind)

    def _sync_and_close(self) -> None:
        fh = self._open_file()
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        self._fh = None


def make_row(
    artifact_id: str, actual: str, head: bytes, size: int, *,
    job_id: str, model: str, mode: str, host: str, kind: str,
) -> dict[str, Any]:
    """An upload's index row, once its fields and its bytes (their digest `actual` and first
    bytes `head`) have been checked; every store writes this same row."""
    _check_path_part("model", model)
    _check_path_part("mode", mode)
    check_kind(kind)
    if actual != artifact_id:
        raise DigestMismatch(artifact_id, actual)
    compression = sniff_compression(head)
    if compression is None:
        raise BadRequest("body: not a zstd or gzip bundle")
    return {
        "artifact_id": artifact_id,
        "job_id": job_id,
        "model": model,
        "mode": mode,
        "kind": kind,
        "size": size,
        "host": host,
        "compression": compression,
        "stored_at": _iso(datetime.now(UTC)),
    }


def is_tombstone(row: dict[str, Any]) -> bool:
    """Whether an index row records a deletion rather than an artifact."""
    return "deleted_at" in row


def _tombstone(row: dict[str, Any], now: float, used_ns: int) -> dict[str, Any]:
    """The row that deletes `row`'s artifact, whose bundle's mtime (its last use) is
    `used_ns`. It keeps model, mode, kind and compression, so that a receiver of an earlier
    version sharing the store reads it as a row and reads on."""
    tombstone: dict[str, Any] = {"artifact_id": row["artifact_id"]}
    tombstone.update((key, row[key]) for key in ("model", "mode", "kind", "compression")
                     if key in row)
    tombstone["deleted_at"] = _iso(datetime.fromtimestamp(now, UTC))
    tombstone["last_used_ns"] = used_ns
    return tombstone


def _stored_since(path: Path, tombstone: dict[str, Any]) -> bool:
    """Whether the bundle at `path` was placed or used after `tombstone` deleted it; yes for
    a tombstone without `last_used_ns` (see _finish_deletes)."""
    used_ns = tombstone.get("last_used_ns")
    return not isinstance(used_ns, int) or path.stat().st_mtime_ns > used_ns


def _stamp(st: os.stat_result) -> UseStamp:
    """A use sets the mtime (by a receiver's clock), and with it the ctime (by the kernel's or
    the file server's): either moving tells of a use, even one stamped with an old time."""
    return st.st_mtime_ns, st.st_ctime_ns


def _fresh_stat(path: Path) -> os.stat_result:
    """The file's status as the file server has it now: opening revalidates what an NFS client
    caches (close-to-open), which a bare stat may answer from for up to a minute."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _append_line(path: Path, line: bytes) -> None:
    """Append `line`, fsynced, all of it or none: a short or failed write (a full disk, a
    quota, RLIMIT_FSIZE) is cut back off before the error is raised. A torn line already at
    the end (a crash mid-append, a cut that failed) is ended first, so that `line` is not
    glued onto it and lost with it."""
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)  # O_APPEND writes go to the end all the same
            if os.read(fd, 1) != b"\n":
                line = b"\n" + line
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            with suppress(OSError):  # if even this fails, the next append ends the torn line
                os.ftruncate(fd, size)
                os.fsync(fd)
            raise
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


def _check_path_part(field: str, value: str) -> None:
    """Model and mode name a directory, so they must not be able to climb out of the root."""
    if not _PATH_PART.fullmatch(value) or value in (".", ".."):
        raise BadRequest(f"{field}: expected letters, digits, '.', '_' or '-', got {value!r}")


def _parse_row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("artifact_id"), str):
        return None
    row.setdefault("kind", DEFAULT_KIND)  # rows written before kinds existed are models
    return row


def _repaired_row(artifact_id: str, path: Path) -> dict[str, Any]:
    """What the disk still tells about an unindexed bundle.

    The directory is `<model>_<mode>`; it is split at its last '_', a guess when the mode
    itself holds one, so the row is marked `repaired`.
    """
    model, _, mode = path.parent.parent.name.rpartition("_")
    st = path.stat()
    return {
        "artifact_id": artifact_id,
        "job_id": None,
        "model": model,
        "mode": mode,
        "kind": DEFAULT_KIND,
        "size": st.st_size,
        "host": None,
        "compression": _COMPRESSION_OF[path.name],
        "stored_at": _iso(datetime.fromtimestamp(st.st_mtime, UTC)),
        "repaired": True,
    }


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _mkdir_durable(path: Path) -> None:
    """mkdir -p that fsyncs each parent it adds an entry to, so a crash cannot lose a level."""
    if path.is_dir():
        return
    _mkdir_durable(path.parent)
    path.mkdir(exist_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory for fsync; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

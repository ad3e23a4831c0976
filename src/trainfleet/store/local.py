"""The local-filesystem artifact store: the only code that writes under the store root.

`<root>/<model>_<mode>/<sha256>/bundle.tar.{zst,gz}` plus `<root>/index.jsonl`, one row per
artifact. One process owns a root; no artifact is visible before its digest is verified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from contextlib import suppress
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
)
from trainfleet.store.base import DEFAULT_KIND, check_kind

log = logging.getLogger(__name__)

_ARTIFACT_ID = re.compile(r"[0-9a-f]{64}")
_PATH_PART = re.compile(r"[A-Za-z0-9._-]+")
_FILENAMES = {"zstd": "bundle.tar.zst", "gzip": "bundle.tar.gz"}
_COMPRESSION_OF = {filename: compression for compression, filename in _FILENAMES.items()}
# A full disk, a file size limit (RLIMIT_FSIZE) or a quota: the client should retry later.
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


class LocalStore:
    """Artifacts on a local filesystem, with an append-only index kept in memory too."""

    remote = False  #: disk calls are made on the event loop, as they always were

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / ".tmp"  # inside root, so the final rename never crosses devices
        self.index_path = self.root / "index.jsonl"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._rows = self._load_index()
        self._paths = self._scan()
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
        """Remove temp files that crashed uploads left; only safe while no upload runs."""
        count = 0
        for path in self.tmp_dir.iterdir():
            path.unlink()
            count += 1
        return count

    def _place(self, tmp_path: Path, row: dict[str, Any]) -> bool:
        """Rename a verified, fsynced temp file into place and index it; False if already stored."""
        artifact_id = row["artifact_id"]
        target = self.root / f"{row['model']}_{row['mode']}" / artifact_id
        target = target / _FILENAMES[row["compression"]]
        with self._lock:
            if artifact_id in self._paths:
                return False
            _mkdir_durable(target.parent)
            os.replace(tmp_path, target)
            _fsync_dir(target.parent)
            self._paths[artifact_id] = target
            if artifact_id not in self._rows:  # e.g. a row whose bundle was deleted by hand
                self._index_placed(row)
            return True

    def _index_placed(self, row: dict[str, Any]) -> None:
        """Index a bundle already renamed into place. When the row cannot be appended (disk
        full), it is kept in memory only, so the artifact is served now; the bundle is
        durable, and the next start's repair writes its row."""
        try:
            self._append_row(row)
        except OSError as exc:
            self._rows[row["artifact_id"]] = row
            log.warning("%s: index row of %s not written (%s); it is rebuilt from the bundle "
                        "at the next start", self.index_path, row["artifact_id"][:12], exc)

    def _append_row(self, row: dict[str, Any]) -> None:
        created = not self.index_path.exists()
        with open(self.index_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if created:
            _fsync_dir(self.root)
        self._rows[row["artifact_id"]] = row

    def _load_index(self) -> dict[str, dict[str, Any]]:
        """Index rows by artifact id; a torn last line (crash mid-append) is cut off."""
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            return {}
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            log.warning("%s: dropping a torn last line", self.index_path)
            with open(self.index_path, "r+b") as fh:
                fh.truncate(len(complete))
                os.fsync(fh.fileno())
        rows: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            row = _parse_row(line)
            if row is None:
                log.warning("%s:%d: not an index row, skipped", self.index_path, number)
                continue
            rows.setdefault(row["artifact_id"], row)
        return rows

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
            if exc.errno in _NO_SPACE:
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
            if exc.errno in _NO_SPACE:
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

"""Deterministic bundles of a job's output directory, their sha256, and safe extraction.

Standard library only at import time; `zstandard` is imported lazily where it is used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, cast

from trainfleet.errors import BadRequest

COMPRESSIONS = ("zstd", "gzip")
_MAGIC = {b"\x28\xb5\x2f\xfd": "zstd", b"\x1f\x8b": "gzip"}
# Fixed levels: a different level would be different bytes, hence a different artifact id.
_ZSTD_LEVEL = 10
_GZIP_LEVEL = 6
# Slack on top of max_bytes for tar headers, long-name records and padding of each member.
_HEADER_ALLOWANCE = 4096
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Bundle:
    path: Path
    artifact_id: str  #: sha256 hex of the file's bytes
    size: int
    compression: str  #: "zstd" | "gzip"


def zstd_available() -> bool:
    """True when `zstandard` can be imported, so new bundles default to zstd."""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def create(src_dir: Path, dest: Path, *, compression: str | None = None) -> Bundle:
    """Bundle `src_dir` into the file `dest`; the same content always gives the same bytes.

    Entries are sorted, owners and mtimes zeroed and modes normalised, so two bit-identical
    training runs deduplicate in the store. `dest` appears whole or not at all.
    """
    src_dir, dest = Path(src_dir), Path(dest)
    compression = compression or ("zstd" if zstd_available() else "gzip")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression: expected one of {COMPRESSIONS}, got {compression!r}")
    if dest.resolve().is_relative_to(src_dir.resolve()):
        raise ValueError(f"{dest}: the bundle must not be written inside {src_dir}")
    entries = _collect(src_dir)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            with _compressor(raw, compression) as stream:
                _write_tar(stream, src_dir, entries)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Bundle(dest, sha256_file(dest), dest.stat().st_size, compression)


def sha256_file(path: Path, chunk_size: int = _CHUNK) -> str:
    """sha256 hex of a file, read in chunks so a bundle of any size fits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sniff_compression(head: bytes) -> str | None:
    """The compression whose magic number starts `head`, or None."""
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    return None


def detect_compression(path: Path) -> str:
    """Name "zstd" or "gzip" by the file's magic bytes; BadRequest for anything else."""
    with open(path, "rb") as fh:
        found = sniff_compression(fh.read(4))
    if found is None:
        raise BadRequest(f"{path}: not a zstd or gzip bundle")
    return found


def extract(
    bundle_path: Path, dest_dir: Path, *, max_members: int = 100_000, max_bytes: int = 64 << 30
) -> list[Path]:
    """Extract a bundle into `dest_dir` (absent or empty) and return the paths written.

    Bundles come from other machines, so every member is checked here rather than trusting
    tarfile's filters: only regular files and directories, no absolute or '..' paths, and
    caps on member count and total size. A refusal raises BadRequest naming the member and
    leaves nothing behind, because members go to a temp dir that is renamed into place last.
    """
    bundle_path, dest_dir = Path(bundle_path), Path(dest_dir)
    if dest_dir.exists() and any(dest_dir.iterdir()):
        raise FileExistsError(f"{dest_dir}: extraction needs an absent or empty directory")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest_dir.parent, prefix=f".{dest_dir.name}.extract-"))
    try:
        names = _extract_all(bundle_path, staging, max_members, max_bytes)
        if dest_dir.exists():
            dest_dir.rmdir()
        os.rename(staging, dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [dest_dir.joinpath(*name.parts) for name in names]


# --- create -----------------------------------------------------------------


def _collect(src_dir: Path) -> list[tuple[str, Path]]:
    """All (archive name, path) pairs under src_dir, sorted; anything but files/dirs is refused."""

    def fail(exc: OSError) -> None:
        raise exc

    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(src_dir, onerror=fail):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file or directory"
                raise ValueError(f"{path}: {kind}; bundles hold regular files and directories only")
            found.append((path.relative_to(src_dir).as_posix(), path))
    return sorted(found)


def _write_tar(stream: IO[bytes], src_dir: Path, entries: list[tuple[str, Path]]) -> None:
    # utf-8 rather than the platform's filesystem encoding, so names are the same bytes everywhere.
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
        for name, path in entries:
            info = _normalised_info(name, path.lstat())
            if info.isdir():
                tar.addfile(info)
                continue
            with open(path, "rb") as fh:
                tar.addfile(info, fh)


def _normalised_info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    """A TarInfo carrying only what the content determines: no owners, times or odd modes."""
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    return info


@contextmanager
def _compressor(out: IO[bytes], compression: str) -> Iterator[IO[bytes]]:
    if compression == "gzip":
        # filename="" keeps the temp file's name out of the header; mtime=0 keeps the time out.
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=out, compresslevel=_GZIP_LEVEL, mtime=0
        ) as gz:
            yield cast(IO[bytes], gz)  # a binary stream; typeshed just doesn't say IO[bytes]
        return
    try:
        import zstandard
    except ImportError as exc:
        raise RuntimeError(
            "zstd bundles need the zstandard package: pip install 'trainfleet[zstd]'"
        ) from exc
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True)
    with compressor.stream_writer(out, closefd=False) as zst:
        yield zst


# --- extract ----------------------------------------------------------------


def _extract_all(
    bundle_path: Path, staging: Path, max_members: int, max_bytes: int
) -> list[PurePosixPath]:
    """Check and write every member into staging; foreign decoding errors become BadRequest."""
    slack = _HEADER_ALLOWANCE * (max_members + 1) + tarfile.RECORDSIZE
    try:
        with _decompressed(bundle_path) as raw:
            capped = _CappedReader(raw, max_bytes + slack, bundle_path)
            # Stream mode ("r|") only ever calls read(), which is all _CappedReader has.
            with tarfile.open(fileobj=cast(IO[bytes], capped), mode="r|", encoding="utf-8") as tar:
                names = _Extraction(staging, max_members, max_bytes).run(tar)
            # tarfile stops at the end-of-archive marker; reading on to the end is what makes
            # gzip check its CRC and zstd its checksum, so damaged content cannot pass.
            while capped.read(_CHUNK):
                pass
            return names
    except tarfile.TarError as exc:
        raise BadRequest(f"{bundle_path}: not a readable tar: {exc}") from exc


@contextmanager
def _decompressed(bundle_path: Path) -> Iterator[IO[bytes]]:
    """The bundle's tar stream; corrupt compressed data becomes BadRequest."""
    if detect_compression(bundle_path) == "gzip":
        try:
            with gzip.open(bundle_path, "rb") as gz:
                yield cast(IO[bytes], gz)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise BadRequest(f"{bundle_path}: corrupt gzip data: {exc}") from exc
        return
    try:
        import zstandard
    except ImportError as exc:
        raise BadRequest(
            f"{bundle_path}: a zstd bundle needs the zstandard package on this host"
        ) from exc
    try:
        with open(bundle_path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as zst:
            yield zst
    except zstandard.ZstdError as exc:
        raise BadRequest(f"{bundle_path}: corrupt zstd data: {exc}") from exc


class _CappedReader:
    """Stops decompression past a byte budget, so headers alone cannot make a bomb."""

    def __init__(self, raw: IO[bytes], limit: int, source: Path) -> None:
        self._raw = raw
        self._left = limit
        self._source = source

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size if size >= 0 else _CHUNK)
        self._left -= len(data)
        if self._left < 0:
            raise BadRequest(f"{self._source}: decompresses to more than the size cap")
        return data


class _Extraction:
    """One pass over a tar stream: validate each member, then write it into staging."""

    def __init__(self, staging: Path, max_members: int, max_bytes: int) -> None:
        self.staging = staging
        self.max_members = max_members
        self.max_bytes = max_bytes
        self.members = 0
        self.total_bytes = 0
        self.is_dir: dict[PurePosixPath, bool] = {}
        self.names: list[PurePosixPath] = []

    def run(self, tar: tarfile.TarFile) -> list[PurePosixPath]:
        for member in tar:
            name = self._check(member)
            if name.parts:  # a "./" entry is the root itself: nothing to write
                self._write(tar, member, name)
        return self.names

    def _check(self, member: tarfile.TarInfo) -> PurePosixPath:
        self.members += 1
        if self.members > self.max_members:
            raise BadRequest(f"{member.name}: more than {self.max_members} members")
        kind = _refused_kind(member)
        if kind:
            raise BadRequest(f"{member.name}: {kind} members are not allowed")
        name = _safe_name(member.name)
        if not name.parts and not member.isdir():
            raise BadRequest(f"{member.name!r}: a file member needs a name")
        self.total_bytes += member.size if member.isreg() else 0
        if self.total_bytes > self.max_bytes:
            raise BadRequest(f"{member.name}: total size exceeds the cap of {self.max_bytes} bytes")
        self._check_layout(member, name)
        return name

    def _check_layout(self, member: tarfile.TarInfo, name: PurePosixPath) -> None:
        """Refuse a name that collides with an earlier member or sits under an earlier file."""
        for parent in reversed(name.parents[:-1]):
            if self.is_dir.setdefault(parent, True) is False:
                raise BadRequest(f"{member.name}: its parent {parent} is a file")
        if name in self.is_dir and not (member.isdir() and self.is_dir[name]):
            raise BadRequest(f"{member.name}: duplicate member")
        self.is_dir[name] = member.isdir()

    def _write(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: PurePosixPath) -> None:
        target = self.staging.joinpath(*name.parts)
        self.names.append(name)
        if member.isdir():
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
            return
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None  # regular members always have data
        try:
            with open(target, "xb") as out:
                shutil.copyfileobj(source, out, _CHUNK)
        except FileExistsError as exc:  # e.g. 'A' and 'a' on a case-insensitive filesystem
            raise BadRequest(f"{member.name}: collides with another member") from exc
        target.chmod(0o755 if member.mode & 0o111 else 0o644)


def _refused_kind(member: tarfile.TarInfo) -> str | None:
    if member.isreg() or member.isdir():
        return None
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    return "special"


def _safe_name(raw: str) -> PurePosixPath:
    """The member's relative path; absolute paths and '..' are refused, read as POSIX or Windows."""
    posix, windows = PurePosixPath(raw), PureWindowsPath(raw)
    if posix.is_absolute() or windows.anchor:
        raise BadRequest(f"{raw}: absolute member paths are not allowed")
    if ".." in posix.parts or ".." in windows.parts:
        raise BadRequest(f"{raw}: '..' in member paths is not allowed")
    return posix

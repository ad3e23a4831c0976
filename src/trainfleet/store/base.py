"""What every artifact store offers the receiver, so the routes need not know where bytes live.

A local directory, a filesystem several receivers share, or an S3-compatible bucket: each
streams an upload while hashing it, publishes it only once its sha256 is verified, keeps one
index row per artifact, and hands a bundle back for download.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from trainfleet.errors import BadRequest

#: What an artifact is: a finished model (listed by default) or a mid-training checkpoint.
KINDS = ("model", "checkpoint")
DEFAULT_KIND = "model"
#: What changes with every use of a stored artifact, whatever any clock says (its bundle's
#: mtime and ctime in nanoseconds): a prune compares it with what it saw when it listed.
UseStamp = tuple[int, int]


def check_kind(kind: str) -> str:
    """`kind`, or a BadRequest naming the field."""
    if kind not in KINDS:
        raise BadRequest(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def kind_of(row: dict[str, Any]) -> str:
    """A row's kind; rows written before kinds existed are models."""
    return str(row.get("kind") or DEFAULT_KIND)


class Readable(Protocol):
    """A bundle opened for download: read it in chunks, then close it."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class ArtifactUpload(Protocol):
    """One artifact streaming in, hashed as it goes; invisible until commit() verified it.

    As a context manager it aborts on leaving, which does nothing after a commit.
    """

    artifact_id: str
    size: int

    def write_blocks(self, size: int) -> bool:
        """Whether write()ing `size` more bytes makes a call the event loop must not wait on
        (the routes then run it in a thread); False keeps a local disk's fast path."""
        ...

    def write(self, chunk: bytes) -> None: ...

    def commit(
        self, *, job_id: str, model: str, mode: str, host: str, kind: str = DEFAULT_KIND
    ) -> bool:
        """Verify and publish; False if the artifact was already stored."""
        ...

    def abort(self) -> None: ...

    def __enter__(self) -> ArtifactUpload: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class ArtifactStore(Protocol):
    """Where verified bundles live, and their index rows."""

    #: True when calls go over the network: the routes then make them in a thread.
    remote: bool
    #: False when delete_if_unused never deletes (S3): the receiver then keeps every checkpoint.
    prunes: bool
    #: True when mark_used may wait on a lock other processes hold (or on the network): the
    #: routes then call it in a thread.
    uses_block: bool
    #: This receiver's wall clock, which stamps uses and measures how long ago they were.
    clock: Callable[[], float]

    def has(self, artifact_id: str) -> bool: ...

    def entry(self, artifact_id: str) -> dict[str, Any]:
        """The artifact's index row; ArtifactNotFound if it is not stored."""
        ...

    def entries(self, model: str | None = None) -> list[dict[str, Any]]:
        """Index rows of stored artifacts (every kind), oldest first."""
        ...

    def begin_upload(self, artifact_id: str, max_bytes: int) -> ArtifactUpload: ...

    def purge_temp(self) -> int:
        """Remove what crashed uploads left behind; how many things were removed."""
        ...

    def mark_used(self, artifact_id: str, kind: str | None = None) -> bool:
        """Record that the artifact is used now (re-uploaded, or named by a job), under the
        lock that delete_if_unused takes; with kind "model", a stored checkpoint becomes a
        model for good. False when it is not stored (it may have just been deleted)."""
        ...

    def use_stamp(self, artifact_id: str) -> UseStamp | None:
        """What changes with every use of the artifact; None when it is not stored (or the
        store keeps no uses)."""
        ...

    def delete_if_unused(self, artifact_id: str, unused_for_s: float,
                         unchanged_since: UseStamp | None = None,
                         plan_fresh: Callable[[], bool] | None = None) -> bool:
        """Delete the artifact if, under the store's lock, it is still a checkpoint last used
        at least `unused_for_s` ago by the store's clock, not used at all since its use stamp
        was `unchanged_since`, and `plan_fresh()` (asked last) is still true, each when given;
        whether it was deleted. A deleted artifact is gone at once and for good (a restart
        does not bring it back)."""
        ...

    def location(self, artifact_id: str) -> str:
        """Where the bundle lies, for people: a filesystem path or an s3:// URL."""
        ...

    def local_path(self, artifact_id: str) -> Path | None:
        """A file on this host to send as it is, or None when the bundle lives elsewhere."""
        ...

    def open(self, artifact_id: str) -> Readable:
        """The bundle's bytes; ArtifactNotFound if it is not stored."""
        ...

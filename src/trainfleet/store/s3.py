"""The artifact store in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW), shared by receivers.

`--store s3://bucket/prefix` lays out, under the prefix:

    <model>_<mode>/<sha256>/bundle.tar.{zst,gz}   the bundle, as on a filesystem store
    index/<sha256>.json                           its index row, one small object each
    .tmp/<unix-time>-<uuid>                       an upload, from its first part to its copy

An upload streams into a multipart upload at a temp key, part by part (never whole in memory),
hashed as it goes. Only once the digest and the size limit are verified is the multipart
completed, copied server-side to its final key and the temp key deleted; a mismatch, an
oversize body or a client that goes away aborts the multipart, so nothing is published. The
index row is written last, with `If-None-Match: *`, so receivers racing on one artifact
publish one row between them and no reader sees a row before its bundle (a receiver that
loses the race deletes a bundle it copied to a key the winner's row does not name). One
object per row means there is no shared index file to tear.

Nothing is ever deleted here: the receivers sharing a bucket cache its rows and hold no lock
in common, so a checkpoint one of them deleted could still be named by another's job. The
receiver keeps every checkpoint on S3 and says so at start (receiver/pruning.py).

Conditional writes need botocore 1.35.2 or later (boto3 1.35.2 pins it): an older one
refuses `IfNoneMatch` before sending anything, so the store refuses to start with it.

Credentials, region and endpoint come the boto3 way (AWS_* variables, ~/.aws, instance
roles), plus an explicit endpoint URL for MinIO, Ceph or moto.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from trainfleet.errors import (
    ArtifactNotFound,
    BadRequest,
    InsufficientStorage,
    PayloadTooLarge,
    TrainfleetError,
)
from trainfleet.store.base import DEFAULT_KIND, Readable, UseStamp
from trainfleet.store.local import _FILENAMES, make_row

log = logging.getLogger(__name__)

PART_BYTES = 8 << 20  #: bytes buffered per multipart part (S3's minimum is 5 MiB)
MIN_PART_BYTES = 5 << 20
STRAY_TEMP_AGE_S = 24 * 3600.0  #: abandoned multiparts and temp objects this old are removed
_ARTIFACT_ID = re.compile(r"[0-9a-f]{64}")
_BUNDLE_KEY = re.compile(r"[^/]+/[0-9a-f]{64}/bundle\.tar\.(zst|gz)")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: Error codes that mean "no room" (AWS, MinIO, Ceph): the client should retry later.
_NO_SPACE = {"EntityTooLarge", "QuotaExceeded", "XMinioStorageFull", "InsufficientStorage",
             "StorageFull"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
#: The conditional index write lost: a row is there already (412).
_ALREADY = {"PreconditionFailed", "412"}
#: Another conditional write on the key is in flight (409): S3 asks for a retry.
_CONFLICT = {"ConditionalRequestConflict", "409"}
CONFLICT_RETRIES = 5  #: tries of the index write while S3 answers 409
CONFLICT_BACKOFF_S = 0.05  #: doubled after each 409
ROW_CACHE = 100_000  #: index rows kept in memory (a few hundred bytes each)
LIST_THREADS = 8  #: index objects entries() fetches at once


class StoreUnavailable(TrainfleetError):
    """The object store did not answer or refused a call; nothing was published, retry."""

    status = 503
    headers = {"Retry-After": "5"}


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; a BadRequest naming --store otherwise."""
    if not url.startswith("s3://"):
        raise BadRequest(f"--store: expected s3://bucket/prefix, got {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise BadRequest(f"--store: {bucket!r} is not an S3 bucket name")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise BadRequest(f"--store: the prefix {prefix!r} has an empty, '.' or '..' part")
    return bucket, prefix


class S3Store:
    """Artifacts in one bucket under one prefix, which any number of receivers may share."""

    remote = True  #: every call is a network call: the routes make them in a thread
    prunes = False  #: delete_if_unused never deletes: see the module docstring
    uses_block = True  #: a use is a network call (remote says so too)

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        part_bytes: int = PART_BYTES,
        copy_threshold_bytes: int = 4 << 30,
        row_cache: int = ROW_CACHE,
    ) -> None:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError as exc:
            raise TrainfleetError(
                "--store s3://...: needs the s3 extra: pip install 'trainfleet[s3]'") from exc
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes: S3 needs at least {MIN_PART_BYTES}, got {part_bytes}")
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.part_bytes = part_bytes
        self.clock = time.time  #: stamps nothing (no use is kept): what the protocol asks
        # Custom endpoints (MinIO, Ceph, moto) are reached by path, not by bucket subdomain.
        config = Config(retries={"mode": "standard", "max_attempts": 5},
                        s3={"addressing_style": "path"} if endpoint_url else None)
        self._s3 = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        # Above this size the server-side copy goes in parts (a single copy stops at 5 GiB).
        self._transfer = TransferConfig(multipart_threshold=copy_threshold_bytes,
                                        multipart_chunksize=max(part_bytes, 512 << 20))
        self._lock = threading.Lock()
        #: rows known to be published (immutable), least recently used first
        self._rows: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.row_cache = row_cache
        put = self._s3.meta.service_model.operation_model("PutObject")
        if "IfNoneMatch" not in put.input_shape.members:
            raise TrainfleetError(
                "--store s3://...: botocore is too old for conditional writes (If-None-Match):"
                " pip install 'boto3>=1.35.2'")
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise TrainfleetError(f"--store {self.url}: the bucket is not reachable: {exc}",
                                  ) from exc

    # -- reads ---------------------------------------------------------------

    def has(self, artifact_id: str) -> bool:
        return self._row(artifact_id) is not None

    def entry(self, artifact_id: str) -> dict[str, Any]:
        """The artifact's index row; ArtifactNotFound if it is not stored."""
        row = self._row(artifact_id)
        if row is None:
            raise ArtifactNotFound(artifact_id)
        return dict(row)

    def entries(self, model: str | None = None) -> list[dict[str, Any]]:
        """Index rows of stored artifacts, oldest first; rows other receivers wrote included.

        Rows not cached yet are fetched a few at a time: one GET each, and thousands of
        them one after another would hold a listing up for seconds."""
        ids = self._listed_ids()
        with self._lock:
            missing = [artifact_id for artifact_id in ids if artifact_id not in self._rows]
        fetched: dict[str, dict[str, Any] | None] = {}
        if len(missing) > 1:
            with ThreadPoolExecutor(min(LIST_THREADS, len(missing)),
                                    thread_name_prefix="s3-index") as pool:
                fetched = dict(zip(missing, pool.map(self._row, missing), strict=True))
        rows = []
        for artifact_id in ids:
            row = fetched[artifact_id] if artifact_id in fetched else self._row(artifact_id)
            if row is not None and (model is None or row.get("model") == model):
                rows.append(dict(row))
        return sorted(rows, key=lambda row: str(row.get("stored_at")))

    def location(self, artifact_id: str) -> str:
        """The bundle's s3:// URL."""
        return f"s3://{self.bucket}/{self._bundle_key(self.entry(artifact_id))}"

    def local_path(self, artifact_id: str) -> None:
        """None: the bundle is streamed from the bucket."""
        return None

    def open(self, artifact_id: str) -> Readable:
        """The bundle's body, streamed from the bucket; read it in chunks, then close it."""
        key = self._bundle_key(self.entry(artifact_id))
        try:
            body: Readable = self._s3.get_object(Bucket=self.bucket, Key=key)["Body"]
        except Exception as exc:
            if _code(exc) in _NOT_FOUND:
                raise ArtifactNotFound(artifact_id) from exc
            raise _unavailable("download", exc) from exc
        return body

    # -- writes --------------------------------------------------------------

    def begin_upload(self, artifact_id: str, max_bytes: int) -> S3Upload:
        """Start streaming an artifact into a multipart upload; see S3Upload."""
        if not _ARTIFACT_ID.fullmatch(artifact_id):
            raise BadRequest(f"sha256: expected 64 lowercase hex digits, got {artifact_id!r}")
        return S3Upload(self, artifact_id, max_bytes)

    def mark_used(self, artifact_id: str, kind: str | None = None) -> bool:
        """Whether the artifact is stored. Uses are not recorded, nor kinds changed: an S3
        store never deletes, so neither would change what it keeps."""
        return self.has(artifact_id)

    def use_stamp(self, artifact_id: str) -> UseStamp | None:
        """None: no use is kept."""
        return None

    def delete_if_unused(self, artifact_id: str, unused_for_s: float,
                         unchanged_since: UseStamp | None = None,
                         plan_fresh: Callable[[], bool] | None = None) -> bool:
        """False: an S3 store never deletes (see the module docstring)."""
        return False

    def purge_temp(self, older_than_s: float = STRAY_TEMP_AGE_S) -> int:
        """Abort multipart uploads and remove temp objects older than `older_than_s`.

        Other receivers may be mid-upload into the same prefix, so only old leftovers go.
        Multipart uploads are looked for under the whole prefix: a server-side copy of a
        bundle over 4 GiB is one too, at the bundle's final key, and a receiver that died
        during it left it open. The age of a temp upload is read from its key's name (some
        servers report no true Initiated time); a bucket lifecycle rule
        (AbortIncompleteMultipartUpload) is the belt to these braces.
        """
        prefix = self._key(".tmp") + "/"
        cutoff = time.time() - older_than_s
        count = 0
        try:
            pages = self._s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._key(""))
            for page in pages:
                for upload in page.get("Uploads", []):
                    if not self._ours(upload["Key"]):  # the bucket may hold others' uploads
                        continue
                    if _started(upload["Key"], upload["Initiated"].timestamp()) <= cutoff:
                        self._s3.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                        UploadId=upload["UploadId"])
                        count += 1
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    if _started(obj["Key"], obj["LastModified"].timestamp()) <= cutoff:
                        self._s3.delete_object(Bucket=self.bucket, Key=obj["Key"])
                        count += 1
        except Exception as exc:
            raise _unavailable("purge", exc) from exc
        return count

    def close(self) -> None:
        self._s3.close()

    # -- plumbing ------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _ours(self, key: str) -> bool:
        """Whether `key` is one this store writes in parts: a temp upload or a bundle."""
        if key.startswith(self._key(".tmp") + "/"):
            return True
        start = len(self._key(""))
        return key.startswith(self._key("")) and _BUNDLE_KEY.fullmatch(key[start:]) is not None

    def _index_key(self, artifact_id: str) -> str:
        return self._key("index", f"{artifact_id}.json")

    def _bundle_key(self, row: dict[str, Any]) -> str:
        filename = _FILENAMES.get(str(row.get("compression")), "bundle.tar.gz")
        return self._key(f"{row['model']}_{row['mode']}", str(row["artifact_id"]), filename)

    def _row(self, artifact_id: str) -> dict[str, Any] | None:
        """The published row (cached: artifacts never change), or None."""
        if not _ARTIFACT_ID.fullmatch(artifact_id):
            return None
        with self._lock:
            row = self._rows.get(artifact_id)
            if row is not None:
                self._rows.move_to_end(artifact_id)
        if row is not None:
            return row
        try:
            answer = self._s3.get_object(Bucket=self.bucket, Key=self._index_key(artifact_id))
            data = answer["Body"].read()
        except Exception as exc:
            if _code(exc) in _NOT_FOUND:
                return None
            raise _unavailable("index read", exc) from exc
        try:
            row = json.loads(data)
        except ValueError:
            row = None
        if not isinstance(row, dict) or row.get("artifact_id") != artifact_id:
            log.warning("%s: not an index row, ignored", self._index_key(artifact_id))
            return None
        row.setdefault("kind", DEFAULT_KIND)
        return self._remember(row)

    def _remember(self, row: dict[str, Any]) -> dict[str, Any]:
        """Cache a published row (the first one cached wins); the least recently used rows
        go once there are more than `row_cache`."""
        with self._lock:
            row = self._rows.setdefault(str(row["artifact_id"]), row)
            while len(self._rows) > self.row_cache:
                self._rows.popitem(last=False)
            return row

    def _listed_ids(self) -> list[str]:
        prefix = self._key("index") + "/"
        ids = []
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if name.endswith(".json") and _ARTIFACT_ID.fullmatch(name[:-5]):
                        ids.append(name[:-5])
        except Exception as exc:
            raise _unavailable("index listing", exc) from exc
        return ids

    def _publish(self, tmp_key: str, row: dict[str, Any]) -> bool:
        """Copy a verified, completed temp object to its final key, then write its index row;
        False if another upload published the artifact first."""
        artifact_id = row["artifact_id"]
        source = {"Bucket": self.bucket, "Key": tmp_key}
        bundle_key = self._bundle_key(row)
        self._s3.copy(source, self.bucket, bundle_key, Config=self._transfer)
        if self._write_row(row):
            self._remember(row)
            return True
        winner = self._row(artifact_id)  # cached while in a thread, for the caller's answer
        if winner is None:
            raise StoreUnavailable(f"store: {self._index_key(artifact_id)} exists but is not "
                                   "an index row")
        if self._bundle_key(winner) != bundle_key:  # same bytes, another model or mode
            try:  # no row will ever name this key: only the winner's row can exist
                self._s3.delete_object(Bucket=self.bucket, Key=bundle_key)
            except Exception as exc:
                log.warning("%s: could not remove the unpublished copy: %s", bundle_key, exc)
        return False

    def _write_row(self, row: dict[str, Any]) -> bool:
        """Write the index row unless one is there (If-None-Match: *): False if one is.

        S3 answers 409 while another conditional write on the key is in flight; that one
        may yet fail, so the write is retried (a few times, backing off) until S3 says which
        row is there."""
        key = self._index_key(row["artifact_id"])
        delay = CONFLICT_BACKOFF_S
        for attempt in range(1, CONFLICT_RETRIES + 1):
            try:
                self._s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(row).encode(),
                                    IfNoneMatch="*", ContentType="application/json")
                return True
            except Exception as exc:
                if _code(exc) in _ALREADY:
                    return False
                if _code(exc) not in _CONFLICT or attempt == CONFLICT_RETRIES:
                    raise
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover


class S3Upload:
    """One artifact streaming into a multipart upload, hashed as it goes; unpublished until
    commit() has verified it. As a context manager it aborts on leaving (a no-op after a
    commit)."""

    def __init__(self, store: S3Store, artifact_id: str, max_bytes: int) -> None:
        self.artifact_id = artifact_id
        self.max_bytes = max_bytes
        self.size = 0
        self.tmp_key = store._key(".tmp", f"{int(time.time())}-{uuid.uuid4().hex}")
        self.upload_id: str | None = None  #: created with the first full part
        self._store = store
        self._buffer = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._digest = hashlib.sha256()
        self._head = b""
        self._completed = False  #: the temp object exists
        self._finished = False

    @property
    def parts_sent(self) -> int:
        return len(self._parts)

    @property
    def buffered(self) -> int:
        """Bytes held in memory, waiting to fill a part."""
        return len(self._buffer)

    def write_blocks(self, size: int) -> bool:
        """True when this write sends a part, or aborts the multipart upload (over the limit)."""
        return len(self._buffer) + size >= self._store.part_bytes or (
            self.size + size > self.max_bytes)

    def write(self, chunk: bytes) -> None:
        """Hash and buffer a chunk, sending each full part; PayloadTooLarge (and the multipart
        upload aborted) once past max_bytes."""
        self._check_open()
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(self.max_bytes)
        self._digest.update(chunk)
        if len(self._head) < 4:
            self._head = (self._head + chunk)[:4]
        self._buffer += chunk
        part = self._store.part_bytes
        while len(self._buffer) >= part:
            self._send(bytes(self._buffer[:part]))
            del self._buffer[:part]

    def commit(
        self, *, job_id: str, model: str, mode: str, host: str, kind: str = DEFAULT_KIND
    ) -> bool:
        """Verify, then publish the artifact; False if it was already stored.

        The digest is checked before the multipart upload is completed: on any error it is
        aborted (or the temp object deleted) and nothing becomes visible.
        """
        self._check_open()
        s3, bucket = self._store._s3, self._store.bucket
        try:
            row = make_row(self.artifact_id, self._digest.hexdigest(), self._head, self.size,
                           job_id=job_id, model=model, mode=mode, host=host, kind=kind)
            if self._store.has(self.artifact_id):
                self.abort()
                return False
            if self._buffer or not self._parts:  # the last part may be short
                self._send(bytes(self._buffer))
                self._buffer.clear()
            s3.complete_multipart_upload(Bucket=bucket, Key=self.tmp_key, UploadId=self.upload_id,
                                         MultipartUpload={"Parts": self._parts})
            self._completed = True
            placed = self._store._publish(self.tmp_key, row)
        except TrainfleetError:
            self.abort()
            raise
        except Exception as exc:
            self.abort()
            raise _unavailable("upload", exc) from exc
        except BaseException:
            self.abort()
            raise
        self.abort()  # the temp object's bytes now lie under the final key
        return placed

    def abort(self) -> None:
        """Abort the multipart upload or delete the temp object; safe to call repeatedly."""
        if self._finished:
            return
        self._finished = True
        self._buffer = bytearray()
        s3, bucket = self._store._s3, self._store.bucket
        try:
            if self._completed:
                s3.delete_object(Bucket=bucket, Key=self.tmp_key)
            elif self.upload_id is not None:
                try:
                    s3.abort_multipart_upload(Bucket=bucket, Key=self.tmp_key,
                                              UploadId=self.upload_id)
                except Exception as exc:
                    # The completion went through though its answer was lost: the upload
                    # is an object now.
                    if _code(exc) != "NoSuchUpload":
                        raise
                    s3.delete_object(Bucket=bucket, Key=self.tmp_key)
        except Exception as exc:  # purge_temp removes it later
            log.warning("%s: could not clean up the temp upload: %s", self.tmp_key, exc)

    def __enter__(self) -> S3Upload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    def _check_open(self) -> None:
        if self._finished:
            raise ValueError(f"upload of {self.artifact_id} is already finished")

    def _send(self, data: bytes) -> None:
        """Upload one part, starting the multipart upload with the first."""
        s3, bucket = self._store._s3, self._store.bucket
        try:
            if self.upload_id is None:
                answer = s3.create_multipart_upload(Bucket=bucket, Key=self.tmp_key)
                self.upload_id = str(answer["UploadId"])
            number = len(self._parts) + 1
            sent = s3.upload_part(Bucket=bucket, Key=self.tmp_key, UploadId=self.upload_id,
                                  PartNumber=number, Body=data)
        except Exception as exc:
            self.abort()
            raise _unavailable("upload", exc) from exc
        self._parts.append({"PartNumber": number, "ETag": sent["ETag"]})


def _started(key: str, reported: float) -> float:
    """When a temp upload began: the time in its name, else what the server reports."""
    stamp = key.rsplit("/", 1)[-1].partition("-")[0]
    return float(stamp) if stamp.isdigit() else reported


def _code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError, else ''."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _unavailable(what: str, exc: BaseException) -> TrainfleetError:
    """A failed S3 call as one of ours: 507 when the server is out of room, else 503."""
    if isinstance(exc, TrainfleetError):
        return exc
    if _code(exc) in _NO_SPACE:
        return InsufficientStorage(what, str(exc))
    return StoreUnavailable(f"store: {what} failed: {exc}", detail={"code": _code(exc)})

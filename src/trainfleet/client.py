"""HTTP client for workers and the CLI: one method per endpoint of docs/protocol.md.

Standard library only (urllib for JSON calls, http.client for streamed uploads). Foreign
errors become trainfleet errors in exactly one place, `_translate`.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import random
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from trainfleet import __version__
from trainfleet.errors import (
    DigestMismatch,
    LeaseLost,
    ReceiverError,
    ReceiverUnreachable,
    TrainfleetError,
)

log = logging.getLogger("trainfleet.client")
T = TypeVar("T")
Progress = Callable[[int, int], None]  #: called with (bytes sent, total bytes)

CHUNK_BYTES = 1 << 20
USER_AGENT = f"trainfleet/{__version__}"


def tls_context(
    ca: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None
) -> ssl.SSLContext | None:
    """A verifying TLS context trusting `ca` (else the system store), with an optional
    client certificate; None when nothing is configured (plain defaults apply)."""
    if ca is None and client_cert is None:
        return None
    if bool(client_cert) != bool(client_key):
        raise TrainfleetError("--client-cert and --client-key: give both or neither")
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if client_cert is not None:
            context.load_cert_chain(str(client_cert), str(client_key))
    except (OSError, ssl.SSLError) as exc:
        raise TrainfleetError(f"TLS files: cannot load: {exc}") from exc
    return context


class Client:
    """Talks to a receiver; transient failures are retried with capped exponential backoff.

    With `fallback_urls` (several receivers serving one fleet), a connection error moves the
    client on to the next URL at once, and it stays there until that one fails in turn.

    Errors: a 4xx answer raises `ReceiverError(status, error, detail)` at once. A 409 to a
    call that carries a lease (heartbeat, upload, checkpoint, complete, fail, upload_log)
    raises `LeaseLost` instead (its `.status` is also 409): stop that job. Connection errors,
    timeouts and 5xx are retried `retries` times, then raise `ReceiverUnreachable`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        worker_token: str | None = None,
        operator_token: str | None = None,
        read_token: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        fallback_urls: Sequence[str] = (),
    ) -> None:
        self._bases = [_base(url) for url in (base_url, *fallback_urls)]
        self._current = 0  #: index into _bases of the receiver in use
        self.worker_token = worker_token
        self.operator_token = operator_token
        self.read_token = read_token  #: sent with every call, for receivers that guard reads
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.ssl_context = ssl_context
        #: When set (a worker shutting down), backoff waits end and retries stop.
        self.stop_event: threading.Event | None = None
        # No proxy: the receiver is on the lab's network, and the streamed upload
        # (http.client) could not honour one anyway.
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ssl_context)
        )

    @property
    def base_url(self) -> str:
        """The receiver in use: the first URL, or the one the last connection error moved to."""
        return self._bases[self._current][0]

    @property
    def _parts(self) -> urllib.parse.SplitResult:
        return self._bases[self._current][1]

    # --- worker calls -------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        capability: dict[str, Any],
        slot: int = 0,
        slot_vram_gib: float | None = None,
        allow_jobs: list[str] | tuple[str, ...] | None = None,
        deny_jobs: list[str] | tuple[str, ...] = (),
        free_vram_gib: float | None = None,
        gpus_free: int | None = None,
        free_vram_per_gpu: list[float] | None = None,
        host_gpus: int | None = None,
    ) -> dict[str, Any] | None:
        """Claim the best eligible job: its claim answer (job, lease, attempt, command), or None.

        `free_vram_per_gpu`: the free memory of each GPU of this host the slot can give one
        job now (`gpus_free` and `free_vram_gib`: the older, single-figure offer);
        `host_gpus`: the host's GPU count. Fields left None are not sent."""
        body = {
            "worker_id": worker_id,
            "capability": capability,
            "slot": slot,
            "slot_vram_gib": slot_vram_gib,
            "free_vram_gib": free_vram_gib,
            **({} if gpus_free is None else {"gpus_free": gpus_free}),
            **({} if free_vram_per_gpu is None else {"free_vram_per_gpu": free_vram_per_gpu}),
            **({} if host_gpus is None else {"host_gpus": host_gpus}),
            "allow_jobs": None if allow_jobs is None else list(allow_jobs),
            "deny_jobs": list(deny_jobs),
        }
        answer: dict[str, Any] | None = self._json("POST", "/v1/job/claim", body=body)
        return answer

    def heartbeat(
        self,
        job_id: str,
        lease: str,
        progress: dict[str, Any] | None = None,
        log_tail: str | None = None,
        peak_vram_gib: float | None = None,
        attempt: int | None = None,
        lent_slots: list[str] | None = None,
    ) -> str:
        """Report liveness; the receiver's action, "continue" or "cancel".

        `lent_slots`: the worker ids of the sibling slots the job borrowed, which make no
        calls of their own meanwhile; the receiver marks them seen and lent to the job.
        Not retried: heartbeats are periodic, so the next one is the retry, and a worker
        blocked in backoff could not watch its trainer.
        """
        body: dict[str, Any] = {"lease": lease, "progress": progress, "log_tail": log_tail}
        if peak_vram_gib is not None:
            body["peak_vram_gib"] = peak_vram_gib
        if lent_slots:
            body["lent_slots"] = list(lent_slots)
        if attempt is not None:
            body["attempt"] = attempt
        path = f"/v1/job/{_seg(job_id)}/heartbeat"
        answer = self._json("POST", path, body=body, fenced_job_id=job_id, retries=0)
        return str(answer["action"])

    def complete(
        self, job_id: str, lease: str, artifact_id: str, metrics: dict[str, Any],
        attempt: int | None = None, peak_vram_gib: float | None = None,
    ) -> dict[str, Any]:
        """Mark the job completed with a stored artifact; idempotent for the same lease."""
        body: dict[str, Any] = {"lease": lease, "artifact_id": artifact_id, "metrics": metrics}
        if attempt is not None:
            body["attempt"] = attempt
        if peak_vram_gib is not None:
            body["peak_vram_gib"] = peak_vram_gib
        path = f"/v1/job/{_seg(job_id)}/complete"
        answer: dict[str, Any] = self._json("POST", path, body=body, fenced_job_id=job_id)
        return answer

    def fail(
        self, job_id: str, lease: str, error: str, retryable: bool, kind: str,
        diagnosis: Mapping[str, Any] | None = None, attempt: int | None = None,
    ) -> dict[str, Any]:
        """Report a failed attempt; the job resource with its new status.

        `diagnosis` adds the optional `cause`, `signature` and `peak_vram_gib` fields.
        """
        body = {"lease": lease, "error": error, "retryable": retryable, "kind": kind,
                "attempt": attempt,
                **{k: v for k, v in (diagnosis or {}).items() if v is not None}}
        path = f"/v1/job/{_seg(job_id)}/fail"
        answer: dict[str, Any] = self._json("POST", path, body=body, fenced_job_id=job_id)
        return answer

    def upload(
        self,
        artifact_id: str,
        path: Path,
        job_id: str,
        lease: str,
        progress: Progress | None = None,
        attempt: int | None = None,
        kind: str | None = None,
    ) -> dict[str, Any]:
        """Stream a bundle to the store in chunks, never holding it in memory; `kind`
        "checkpoint" marks a trainer checkpoint rather than a finished model."""
        query = {"job_id": job_id, "lease": lease}
        if attempt is not None:
            query["attempt"] = str(attempt)
        if kind is not None:
            query["kind"] = kind
        path_ = f"/v1/model/{_seg(artifact_id)}"
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size

            def send() -> bytes:
                fh.seek(0)
                return self._stream_put(self._target(path_, query), fh, size, progress)

            raw = self._retrying("PUT", path_, send, fenced_job_id=job_id)
        answer: dict[str, Any] = json.loads(raw)
        return answer

    def checkpoint(
        self, job_id: str, lease: str, artifact_id: str, attempt: int | None = None,
        progress: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record an uploaded checkpoint as the job's latest; the job resource."""
        body: dict[str, Any] = {"lease": lease, "artifact_id": artifact_id, "attempt": attempt,
                                "progress": progress}
        path = f"/v1/job/{_seg(job_id)}/checkpoint"
        answer: dict[str, Any] = self._json("POST", path, body=body, fenced_job_id=job_id)
        return answer

    def upload_log(self, job_id: str, lease: str, attempt: int, text: str) -> None:
        """Store an attempt's full trainer log."""
        path = f"/v1/job/{_seg(job_id)}/log"
        query = {"lease": lease, "attempt": str(attempt)}
        data = text.encode("utf-8", errors="replace")
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        self._call("PUT", path, query, data, headers, fenced_job_id=job_id)

    # --- artifacts ----------------------------------------------------------

    def has_artifact(self, artifact_id: str) -> bool:
        """True when the store already holds this artifact."""
        try:
            self._call("HEAD", f"/v1/model/{_seg(artifact_id)}")
        except ReceiverError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def download(self, artifact_id: str, dest: Path) -> Path:
        """Fetch an artifact to `dest` (a file, or a directory to hold `<artifact_id>.bundle`).

        Streams to a temp file beside the destination, verifies the sha256, then renames,
        so `dest` is never a partial or corrupt bundle.
        """
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{artifact_id}.bundle"
        dest.parent.mkdir(parents=True, exist_ok=True)
        path = f"/v1/model/{_seg(artifact_id)}"
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w+b") as out:
                digest = self._retrying("GET", path, lambda: self._stream_get(self._url(path), out))
            if digest != artifact_id:
                raise DigestMismatch(artifact_id, digest)
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return dest

    # --- reads and operator calls -----------------------------------------

    def health(self) -> dict[str, Any]:
        """The receiver's health: ok, version, backend, counts, uptime_s."""
        answer: dict[str, Any] = self._json("GET", "/v1/health")
        return answer

    def get_log(self, job_id: str, attempt: int | None = None) -> str:
        """An attempt's trainer log (default: the latest; the tail while it runs)."""
        query = None if attempt is None else {"attempt": str(attempt)}
        raw = self._call("GET", f"/v1/jobs/{_seg(job_id)}/log", query)
        return raw.decode("utf-8", errors="replace")

    def jobs(
        self, status: str | None = None, model: str | None = None, host: str | None = None
    ) -> list[dict[str, Any]]:
        """Job resources, filtered by whichever of status, model and host are given."""
        query = {"status": status, "model": model, "host": host}
        answer = self._json("GET", "/v1/jobs", query={k: v for k, v in query.items() if v})
        jobs: list[dict[str, Any]] = answer["jobs"]
        return jobs

    def why(self, job_id: str) -> dict[str, Any]:
        """Each live worker's reasons for not taking the job."""
        answer: dict[str, Any] = self._json("GET", f"/v1/jobs/{_seg(job_id)}/why")
        return answer

    def models(self, model: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Stored artifacts (index rows with their path), optionally for one model; of one
        kind, model (the receiver's default) or checkpoint."""
        query = {"model": model, "kind": kind}
        answer = self._json("GET", "/v1/models", query={k: v for k, v in query.items() if v})
        rows: list[dict[str, Any]] = answer["models"]
        return rows

    def job(self, job_id: str) -> dict[str, Any]:
        """One job with its history and attempts; the id may be a unique prefix."""
        answer: dict[str, Any] = self._json("GET", f"/v1/jobs/{_seg(job_id)}")
        return answer

    def workers(self) -> list[dict[str, Any]]:
        """Worker resources, alive or not."""
        workers: list[dict[str, Any]] = self._json("GET", "/v1/workers")["workers"]
        return workers

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job from any live state (operator)."""
        path = f"/v1/job/{_seg(job_id)}/cancel"
        answer: dict[str, Any] = self._json("POST", path, operator=True)
        return answer

    def requeue(self, job_id: str) -> dict[str, Any]:
        """Put a failed or cancelled job back to pending (operator)."""
        path = f"/v1/job/{_seg(job_id)}/requeue"
        answer: dict[str, Any] = self._json("POST", path, operator=True)
        return answer

    def reload_manifest(self) -> dict[str, Any]:
        """Re-read the manifest: added / updated / unchanged / orphaned counts (operator)."""
        answer: dict[str, Any] = self._json("POST", "/v1/manifest/reload", operator=True)
        return answer

    # --- per-host tokens and enrollment -------------------------------------

    def create_token(
        self, hostname: str, enroll: bool = False, ttl_s: float | None = None
    ) -> dict[str, Any]:
        """Mint a worker token (or a one-time enrollment code) for a host (operator)."""
        body = {"hostname": hostname, "enroll": enroll, "ttl_s": ttl_s}
        answer: dict[str, Any] = self._json("POST", "/v1/tokens", body=body, operator=True)
        return answer

    def tokens(self) -> list[dict[str, Any]]:
        """Every token and code the receiver has issued, without the secrets (operator)."""
        tokens: list[dict[str, Any]] = self._json("GET", "/v1/tokens", operator=True)["tokens"]
        return tokens

    def revoke_host(self, hostname: str) -> dict[str, Any]:
        """Refuse a host's tokens from now on; its live jobs are requeued (operator)."""
        path = f"/v1/tokens/{_seg(hostname)}/revoke"
        answer: dict[str, Any] = self._json("POST", path, operator=True)
        return answer

    def release_host(self, hostname: str) -> dict[str, Any]:
        """Lift a host's quarantine (operator): `{"hostname", "was_until", "reason"}`."""
        path = f"/v1/hosts/{_seg(hostname)}/release"
        answer: dict[str, Any] = self._json("POST", path, operator=True)
        return answer

    def enroll(self, code: str, hostname: str) -> dict[str, Any]:
        """Trade a one-time enrollment code for this host's worker token."""
        body = {"code": code, "hostname": hostname}
        answer: dict[str, Any] = self._json("POST", "/v1/enroll", body=body)
        return answer

    # --- plumbing -----------------------------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, str] | None = None,
        operator: bool = False,
        fenced_job_id: str | None = None,
        retries: int | None = None,
    ) -> Any:
        """A JSON call: the decoded answer, or None for an empty one (204)."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        raw = self._call(method, path, query, data, headers, operator, fenced_job_id, retries)
        return json.loads(raw) if raw.strip() else None

    def _call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        operator: bool = False,
        fenced_job_id: str | None = None,
        retries: int | None = None,
    ) -> bytes:
        """One urllib request, retried as the client's policy says; the answer's body."""
        all_headers = self._headers(operator) | (headers or {})

        def attempt() -> bytes:
            request = urllib.request.Request(self._url(path, query), data=data,
                                             headers=all_headers, method=method)
            with self._opener.open(request, timeout=self.timeout_s) as response:
                body: bytes = response.read()
                return body

        return self._retrying(method, path, attempt, fenced_job_id, retries)

    def _retrying(
        self,
        method: str,
        path: str,
        attempt: Callable[[], T],
        fenced_job_id: str | None = None,
        retries: int | None = None,
    ) -> T:
        """Run `attempt`, retrying while the failure is transient (ReceiverUnreachable).

        A connection error moves on to the next receiver, tried at once; the backoff waits
        only once every receiver has failed in a row.
        """
        retries = self.retries if retries is None else retries
        n = 0  # backoff rounds so far
        untried = len(self._bases) - 1
        while True:
            try:
                return attempt()
            except (OSError, http.client.HTTPException) as exc:
                error = _translate(exc, f"{method} {self.base_url}{path}", fenced_job_id)
                if not isinstance(error, ReceiverUnreachable):
                    raise error from exc
                if self._fail_over(exc) and untried > 0:
                    untried -= 1
                    continue  # the next receiver, at once
                if n == retries:
                    raise error from exc
                untried = len(self._bases) - 1
                if self._pause(self._backoff(n)):
                    raise error from exc  # the caller is shutting down: stop retrying
                n += 1

    def _fail_over(self, exc: OSError | http.client.HTTPException) -> bool:
        """After a connection error, use the next receiver; False when there is no other."""
        if len(self._bases) < 2 or isinstance(exc, urllib.error.HTTPError):
            return False  # an answer, even a 5xx, means the receiver is there
        failed = self.base_url
        self._current = (self._current + 1) % len(self._bases)
        log.warning("%s: cannot connect (%s); trying %s", failed,
                    getattr(exc, "reason", None) or exc, self.base_url)
        return True

    def _pause(self, delay_s: float) -> bool:
        """Wait out a backoff; True if the stop event cut it short."""
        if self.stop_event is None:
            time.sleep(delay_s)
            return False
        return self.stop_event.wait(delay_s)

    def _backoff(self, n: int) -> float:
        """Capped exponential backoff with jitter, so a restarted receiver is not stampeded."""
        delay = min(self.max_backoff_s, self.backoff_s * 2**n)
        return float(delay * random.uniform(0.5, 1.0))

    def _stream_put(self, target: str, fh: BinaryIO, size: int, progress: Progress | None) -> bytes:
        """PUT the open file in chunks with Content-Length; the answer's body on 2xx."""
        conn = self._connection()
        try:
            conn.putrequest("PUT", target)
            headers = self._headers(operator=False) | {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
            }
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            try:
                _send_file(conn, fh, size, progress)
            except OSError:
                # The receiver may refuse early (413, 409) and close: its answer beats ours.
                pass
            response = conn.getresponse()
            body = response.read()
            if response.status >= 400:
                raise _http_error(target, response.status, response.reason, body)
            return body
        finally:
            conn.close()

    def _stream_get(self, url: str, out: BinaryIO) -> str:
        """GET into `out` from its start, hashing as it goes; the sha256 hex of what came."""
        request = urllib.request.Request(url, headers=self._headers(operator=False))
        out.seek(0)
        out.truncate()
        digest = hashlib.sha256()
        with self._opener.open(request, timeout=self.timeout_s) as response:
            while chunk := response.read(CHUNK_BYTES):
                digest.update(chunk)
                _write_local(out, chunk)
        return digest.hexdigest()

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self._parts.hostname or "", self._parts.port
        if self._parts.scheme == "https":
            return http.client.HTTPSConnection(
                host, port, timeout=self.timeout_s, context=self.ssl_context
            )
        return http.client.HTTPConnection(host, port, timeout=self.timeout_s)

    def _headers(self, operator: bool) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.worker_token:
            headers["X-Worker-Token"] = self.worker_token
        if self.read_token:
            headers["X-Read-Token"] = self.read_token
        if operator and self.operator_token:
            headers["X-Operator-Token"] = self.operator_token
        return headers

    def _target(self, path: str, query: dict[str, str] | None = None) -> str:
        """Path and query as sent on the request line, under the base url's own path."""
        target = self._parts.path.rstrip("/") + path
        return f"{target}?{urllib.parse.urlencode(query)}" if query else target

    def _url(self, path: str, query: dict[str, str] | None = None) -> str:
        return self.base_url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")


def _translate(
    exc: OSError | http.client.HTTPException, what: str, fenced_job_id: str | None
) -> TrainfleetError:
    """The one mapping of foreign errors to ours; ReceiverUnreachable means "worth a retry"."""
    if not isinstance(exc, urllib.error.HTTPError):
        reason = getattr(exc, "reason", None) or exc
        return ReceiverUnreachable(f"{what}: cannot reach the receiver: {reason}")
    message, detail = _error_body(exc)
    if exc.code >= 500:
        return ReceiverUnreachable(f"{what}: receiver answered {exc.code}: {message}", detail)
    if exc.code == 409 and fenced_job_id is not None:
        return LeaseLost(fenced_job_id, message)
    return ReceiverError(exc.code, message, detail)


def _error_body(exc: urllib.error.HTTPError) -> tuple[str, Any]:
    """(message, detail) from a `{"error", "detail"}` body, tolerating any other body."""
    try:
        raw = exc.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and ("error" in body or "detail" in body):
        message = body.get("error") or str(body.get("detail"))
        return str(message), body.get("detail")
    text = raw.decode("utf-8", errors="replace").strip()[:200]
    return f"HTTP {exc.code} {exc.reason}" + (f": {text}" if text else ""), None


def _send_file(
    conn: http.client.HTTPConnection, fh: BinaryIO, size: int, progress: Progress | None
) -> None:
    sent = 0
    while chunk := fh.read(CHUNK_BYTES):
        conn.send(chunk)
        sent += len(chunk)
        if progress is not None:
            progress(sent, size)


def _write_local(out: BinaryIO, chunk: bytes) -> None:
    """Write to a local file; its OSError must not pass for a network one and be retried."""
    try:
        out.write(chunk)
    except OSError as exc:
        raise TrainfleetError(f"{getattr(out, 'name', 'download')}: cannot write: {exc}") from exc


def _http_error(url: str, status: int, reason: str, body: bytes) -> urllib.error.HTTPError:
    """An http.client error answer dressed as urllib's, so `_translate` sees one kind."""
    return urllib.error.HTTPError(url, status, reason, http.client.HTTPMessage(), io.BytesIO(body))


def _base(url: str) -> tuple[str, urllib.parse.SplitResult]:
    """A receiver URL without its trailing slash, and its parts; checked."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TrainfleetError(f"receiver url: expected http(s)://host[:port], got {url!r}")
    return url.rstrip("/"), parts


def _seg(value: str) -> str:
    """A path segment, quoted: ids are hex, but nothing from outside goes in a URL raw."""
    return urllib.parse.quote(value, safe="")

"""The HTTP API of DESIGN.md, under /v1; every handler is a thin call into queue or store."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from trainfleet import __version__, matching
from trainfleet.capability import Capability
from trainfleet.errors import (
    ArtifactNotFound,
    BadRequest,
    Forbidden,
    LeaseLost,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceBusy,
    Unauthorized,
    WrongHost,
)
from trainfleet.failures import Cause
from trainfleet.queue.base import FailureKind, Job, Status
from trainfleet.receiver import schemas as s
from trainfleet.receiver.state import ReceiverState
from trainfleet.store import ArtifactStore, kind_of
from trainfleet.store.base import Readable
from trainfleet.tokens import TokenKind, hash_token

router = APIRouter()
log = logging.getLogger(__name__)

worker_header = APIKeyHeader(name="X-Worker-Token", scheme_name="WorkerToken", auto_error=False,
                             description="the worker token, when the receiver has one")
operator_header = APIKeyHeader(name="X-Operator-Token", scheme_name="OperatorToken",
                               auto_error=False, description="the operator token")

read_header = APIKeyHeader(name="X-Read-Token", auto_error=False, scheme_name="ReadToken",
                           description="the read token, when the receiver has one")
JobRef = Annotated[str, PathParam(min_length=1, max_length=200,
                                  description="job name, id, or unique id prefix (8+ hex)")]
ArtifactId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{64}$", description="sha256 hex")]
ArtifactKind = Annotated[Literal["model", "checkpoint"], Query(
    description="model (a finished training's output) or checkpoint (mid-training)")]
P = ParamSpec("P")
T = TypeVar("T")
TOUCH_EVERY_S = 60.0  #: how often a per-host token's last use is written down
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": s.ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422)
}


# Dependencies are `async def` although they never await: FastAPI runs a plain `def` one in
# the thread pool, and those hops cost more than the whole claim statement.
async def receiver(request: Request) -> ReceiverState:
    state: ReceiverState = request.app.state.receiver
    return state


State = Annotated[ReceiverState, Depends(receiver)]


def _state(request: Request) -> ReceiverState:
    # The worker's hot paths (claim, heartbeat, complete and their auth) read the state
    # here rather than through Depends: FastAPI re-solves every dependency node per request.
    state: ReceiverState = request.app.state.receiver
    return state


def _token_matches(given: str | None, expected: str) -> bool:
    # Headers arrive as latin-1 text: compare raw bytes so any header gives 401, never 500.
    if given is None:
        return False
    return hmac.compare_digest(given.encode("latin-1", "replace"), expected.encode())


def _refuse_repeated(request: Request, header: str) -> None:
    # Only the first copy would be checked, while a proxy or a log may see another: refuse.
    if len(request.headers.getlist(header)) > 1:
        raise Unauthorized(header, "sent more than once")


async def worker_auth(
    request: Request, token: Annotated[str | None, Depends(worker_header)]
) -> str | None:
    """The host a per-host token binds its caller to; None for the shared token or when open.

    Worker calls are open only on a receiver with no shared token (nor
    --require-worker-token) that has never issued a per-host one; revoking every host
    therefore never reopens it.
    """
    _refuse_repeated(request, "X-Worker-Token")
    state = _state(request)
    expected = state.settings.worker_token
    if expected and _token_matches(token, expected):
        return None
    now = state.now()
    if token is not None:
        info = state.queue.lookup_token(hash_token(token), state.queue_now())
        if info is not None and info.kind is TokenKind.WORKER:
            if info.last_used_at is None or now - info.last_used_at >= TOUCH_EVERY_S:
                state.queue.touch_token(info.token_hash, state.queue_now())
            return info.hostname
    if expected or not state.settings.open_to_workers or state.queue.has_worker_tokens():
        raise Unauthorized("X-Worker-Token", _refusal(state, token))
    return None


def _refusal(state: ReceiverState, token: str | None) -> str:
    """Why a worker token was refused, so a revoked or misused one says so."""
    if token is None:
        return "missing token"
    token_hash = hash_token(token)
    for info in state.queue.list_tokens():  # the failure path only: a small table
        if info.token_hash != token_hash:
            continue
        if info.kind is TokenKind.ENROLL:
            return "that is an enrollment code: exchange it with `trainfleet enroll` first"
        if info.revoked_at is not None:
            return (f"the token of host {info.hostname!r} was revoked; "
                    "enrol the host again to get a new one")
        return f"the token of host {info.hostname!r} has expired"
    return "wrong token"


Bound = Annotated[str | None, Depends(worker_auth)]


async def worker_job_auth(request: Request, host: Bound) -> None:
    """A per-host token may touch only jobs its host holds (a log: the attempt's host)."""
    ref = request.path_params.get("job_ref") or request.query_params.get("job_id")
    if host is None or not ref:
        return
    state = _state(request)
    job_id = state.queue.resolve(ref)
    attempt = request.query_params.get("attempt", "")
    if attempt.isdigit():
        holder = next((a.hostname for a in state.queue.attempts(job_id)
                       if a.attempt == int(attempt)), None)
    else:
        holder = state.queue.get(job_id).hostname
    if holder != host:
        raise WrongHost(host, holder or "(none)")


async def read_auth(
    request: Request,
    state: State,
    token: Annotated[str | None, Depends(read_header)],
    operator: Annotated[str | None, Depends(operator_header)],
    worker: Annotated[str | None, Depends(worker_header)],
) -> None:
    """Reads are open unless the receiver has a read token; then any token of ours will do."""
    expected = state.settings.read_token
    if not expected:
        return
    _refuse_repeated(request, "X-Read-Token")
    operator_token = state.settings.operator_token
    if _token_matches(token, expected) or (
        operator_token and _token_matches(operator, operator_token)
    ):
        return
    if worker is not None:
        await worker_auth(request, worker)  # raises unless it is a valid worker token
        return
    raise Unauthorized("X-Read-Token")


ReadAuth = [Depends(read_auth)]


async def operator_auth(
    request: Request, state: State, token: Annotated[str | None, Depends(operator_header)]
) -> None:
    _refuse_repeated(request, "X-Operator-Token")
    expected = state.settings.operator_token
    if not expected:
        raise Forbidden(
            "operator calls are disabled: start the receiver with --operator-token-file "
            "or TRAINFLEET_OPERATOR_TOKEN"
        )
    if not _token_matches(token, expected):
        raise Unauthorized("X-Operator-Token")


WorkerAuth = [Depends(worker_auth)]
WorkerJobAuth = [Depends(worker_job_auth)]
OperatorAuth = [Depends(operator_auth)]


def _job_out(job: Job) -> s.JobOut:
    return s.JobOut(**job.to_dict())


# -- the worker's calls ------------------------------------------------------
# claim, heartbeat and complete are served by hot_routes.HotLane, which calls these very
# functions with these routes' own fields, bypassing FastAPI's per-request machinery. Their
# declarations here are what /openapi.json describes; a receiver refuses to start if one
# is changed in a way the lane does not follow (another dependency, a query parameter).


@router.post("/v1/job/claim", responses={204: {"description":
             "nothing eligible now"}, **ERRORS}, response_model=s.ClaimOut)
async def claim(body: s.ClaimRequest, request: Request, host: Bound) -> Any:
    """Hand the best eligible pending job to this worker slot."""
    state = _state(request)  # `host`, the worker's auth, ran first
    capability = Capability.from_dict(body.capability)
    if host is not None and capability.hostname != host:
        raise WrongHost(host, capability.hostname, "claim as host")
    allow = tuple(body.allow_jobs) if body.allow_jobs is not None else None
    claimed = state.queue.claim_next(
        body.worker_id, capability, body.slot_vram_gib, allow, tuple(body.deny_jobs),
        now=state.queue_now(), free_vram_gib=body.free_vram_gib, gpus_free=body.gpus_free,
        free_vram_per_gpu=body.free_vram_per_gpu, host_gpus=body.host_gpus,
    )
    if claimed is None:
        state.metrics.empty_claims.inc()
        return Response(status_code=204)
    state.metrics.claims.inc()
    return s.ClaimOut(
        job=_job_out(claimed.job),
        lease=claimed.lease,
        attempt=claimed.attempt,
        command=list(claimed.command or state.manifest.trainer.command),
        timeout_s=claimed.job.timeout_s,
        heartbeat_interval_s=state.heartbeat_interval_s,
        resume_from=claimed.job.checkpoint_id,
    )


def _fenced_job(state: ReceiverState, ref: str, lease: str, attempt: int | None) -> str:
    """The job's id; 409 when the call names an attempt its lease was not handed out for."""
    job_id = state.queue.resolve(ref)
    if attempt is not None and not state.queue.attempt_lease_matches(job_id, attempt, lease):
        raise LeaseLost(job_id, f"the lease does not belong to attempt {attempt}")
    return job_id


@router.post("/v1/job/{job_ref}/heartbeat", dependencies=WorkerJobAuth, responses=ERRORS)
async def heartbeat(
    job_ref: JobRef, body: s.HeartbeatRequest, request: Request
) -> s.HeartbeatOut:
    """Liveness and progress; the answer says whether to go on or cancel."""
    state = _state(request)
    job_id = _fenced_job(state, job_ref, body.lease, body.attempt)
    progress = body.progress.model_dump(exclude_none=True) if body.progress else None
    action = state.queue.heartbeat(job_id, body.lease, progress, body.log_tail,
                                   state.queue_now(), peak_vram_gib=body.peak_vram_gib,
                                   lent_slots=body.lent_slots)
    state.metrics.heartbeats.inc()
    return s.HeartbeatOut(action=action)  # type: ignore[arg-type]


@router.post("/v1/job/{job_ref}/checkpoint", dependencies=WorkerJobAuth, responses=ERRORS)
async def checkpoint(job_ref: JobRef, body: s.CheckpointRequest, state: State) -> s.JobOut:
    """Record the job's latest checkpoint, already in the store: later attempts resume it."""
    job_id = _fenced_job(state, job_ref, body.lease, body.attempt)
    # Marked used (under the store's lock) BEFORE the queue records it: this order is what
    # makes checkpoint pruning safe. A prune racing this call either finds the fresh use at
    # its last look and keeps the artifact, or deleted it first, and then this answers 400
    # and the worker uploads it again (receiver/pruning.py).
    if not await _mark_used(state, body.artifact_id):
        raise BadRequest(f"artifact_id: {body.artifact_id} is not in the store; upload it first")
    progress = body.progress.model_dump(exclude_none=True) if body.progress else None
    job = state.queue.record_checkpoint(job_id, body.lease, body.artifact_id, state.queue_now(),
                                        progress=progress)
    return _job_out(job)


@router.post("/v1/job/{job_ref}/complete", dependencies=WorkerJobAuth, responses=ERRORS)
async def complete(job_ref: JobRef, body: s.CompleteRequest, request: Request) -> s.JobOut:
    """Accept the job's artifact, which must already be in the store."""
    state = _state(request)
    job_id = _fenced_job(state, job_ref, body.lease, body.attempt)
    # Marked used before the job names it, as in checkpoint(): the artifact may be a stored
    # checkpoint with the same bytes (a worker skips uploading what the store has).
    if not await _mark_used(state, body.artifact_id):
        raise BadRequest(f"artifact_id: {body.artifact_id} is not in the store; upload it first")
    job = state.queue.complete(job_id, body.lease, body.artifact_id, body.metrics,
                               state.queue_now(), peak_vram_gib=body.peak_vram_gib)
    state.metrics.completions.inc()
    return _job_out(job)


@router.post("/v1/job/{job_ref}/fail", dependencies=WorkerJobAuth, responses=ERRORS)
async def fail(job_ref: JobRef, body: s.FailRequest, state: State) -> s.JobOut:
    """End the attempt; the job is retried while attempts remain."""
    job_id = _fenced_job(state, job_ref, body.lease, body.attempt)
    job = state.queue.fail(job_id, body.lease, body.error, body.retryable, FailureKind(body.kind),
                           state.queue_now(), cause=None if body.cause is None else
                           Cause(body.cause), signature=body.signature,
                           peak_vram_gib=body.peak_vram_gib)
    state.metrics.failures.labels(body.kind).inc()
    return _job_out(job)


@router.put("/v1/model/{artifact_id}", dependencies=WorkerJobAuth, status_code=201,
            responses={200: {"model": s.ArtifactOut, "description": "already stored"}, **ERRORS,
                       408: {"model": s.ErrorOut, "description":
                             "the body stalled or arrived below the minimum rate"},
                       503: {"model": s.ErrorOut, "description": "too many uploads running, "
                             "or the store cannot be reached; retry after Retry-After"},
                       507: {"model": s.ErrorOut, "description": "the store's disk is full"}})
async def put_model(
    artifact_id: ArtifactId,
    request: Request,
    state: State,
    job_id: Annotated[str, Query(min_length=1, max_length=200)],
    lease: Annotated[str, Query(min_length=1, max_length=128, pattern=s.LEASE_PATTERN)],
    response: Response,
    attempt: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    kind: ArtifactKind = "model",
) -> s.ArtifactOut:
    """Stream a bundle into the store; its sha256 is checked before it becomes visible."""
    job = state.queue.check_lease(_fenced_job(state, job_id, lease, attempt), lease,
                                  state.queue_now())
    # Bytes already stored: the upload is a use of them, and a model upload makes them a model.
    if await _mark_used(state, artifact_id, kind):
        async for _ in request.stream():  # drain, so the client sees a clean answer
            pass
        response.status_code = 200
        size = await _in_store(state, _size, state, artifact_id)
        return s.ArtifactOut(artifact_id=artifact_id, size=size, new=False)
    if state.uploads.locked():
        raise ServiceBusy(f"uploads: {state.settings.max_concurrent_uploads} already running; "
                          "retry later")
    async with state.uploads:
        with state.store.begin_upload(artifact_id, state.settings.max_upload_bytes) as upload:
            try:
                async for chunk in _until_idle(request, state.settings.upload_idle_timeout_s,
                                               state.settings.upload_min_bytes_per_s):
                    if upload.write_blocks(len(chunk)):  # an S3 part goes out
                        await run_in_threadpool(upload.write, chunk)
                    else:  # the local disk's fast path
                        upload.write(chunk)
                new = await run_in_threadpool(
                    upload.commit, job_id=job.job_id, model=job.model, mode=job.mode,
                    host=job.hostname or "", kind=kind,
                )
            except BaseException:  # a client gone mid-body cancels the request, too
                if state.store.remote:  # aborting a multipart upload is a network call too
                    with anyio.CancelScope(shield=True):  # run it even in a cancelled scope
                        await run_in_threadpool(upload.abort)
                raise
    response.status_code = 201 if new else 200
    size = await _in_store(state, _size, state, artifact_id)
    if new:
        state.metrics.upload_bytes.inc(size)
    return s.ArtifactOut(artifact_id=artifact_id, size=size, new=new)


async def _until_idle(
    request: Request, idle_s: float, min_bytes_per_s: float
) -> AsyncIterator[bytes]:
    """The request body's chunks; 408 when none arrives for `idle_s`, or when, past the
    first `idle_s`, it arrives slower than `min_bytes_per_s` on average (a drip-feed that
    would hold an upload slot forever)."""
    chunks = request.stream().__aiter__()
    started, received = time.monotonic(), 0
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise RequestTimeout(f"body: nothing received for {idle_s:g} s") from exc
        received += len(chunk)
        elapsed = time.monotonic() - started
        if elapsed > idle_s and received < min_bytes_per_s * elapsed:
            raise RequestTimeout(
                f"body: {received / elapsed:.0f} bytes/s, below the minimum of "
                f"{min_bytes_per_s:.0f} bytes/s"
            )
        yield chunk


def _size(state: ReceiverState, artifact_id: str) -> int:
    return int(state.store.entry(artifact_id)["size"])  # after has(): cached by every store


async def _in_store(state: ReceiverState, call: Callable[P, T], *args: P.args,
                    **kwargs: P.kwargs) -> T:
    """A store call: made right here for a filesystem store, in a thread for one across the
    network (S3), whose calls must not hold up the event loop."""
    if state.store.remote:
        return await run_in_threadpool(call, *args, **kwargs)
    return call(*args, **kwargs)


async def _mark_used(state: ReceiverState, artifact_id: str, kind: str | None = None) -> bool:
    """store.mark_used: in a thread when it may wait on a lock other receivers hold (a shared
    store's flock, perhaps on a stalled NFS server) or on the network, never on the loop."""
    if state.store.remote or state.store.uses_block:
        return await run_in_threadpool(state.store.mark_used, artifact_id, kind)
    return state.store.mark_used(artifact_id, kind)


@router.put("/v1/job/{job_ref}/log", dependencies=WorkerJobAuth, responses=ERRORS)
async def put_log(
    job_ref: JobRef,
    request: Request,
    state: State,
    lease: Annotated[str, Query(min_length=1, max_length=128, pattern=s.LEASE_PATTERN)],
    attempt: Annotated[int, Query(ge=1, le=100_000)],
) -> dict[str, int]:
    """Keep an attempt's full trainer log under the state dir."""
    job_id = state.queue.resolve(job_ref)
    if not state.queue.attempt_lease_matches(job_id, attempt, lease):
        raise LeaseLost(job_id, f"lease does not belong to attempt {attempt}")
    body = await request.body()
    if len(body) > state.settings.max_log_bytes:
        raise PayloadTooLarge(state.settings.max_log_bytes)
    await run_in_threadpool(_write_log, _log_path(state, job_id, attempt), body)
    return {"bytes": len(body)}


def _log_path(state: ReceiverState, job_id: str, attempt: int) -> Path:
    if not re.fullmatch(r"[0-9a-f]{64}", job_id):  # ids come from the queue; be sure anyway
        raise BadRequest(f"job_id: not a job id: {job_id!r}")
    return state.settings.logs_dir / job_id / f"{attempt}.log"


def _write_log(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, path)


# -- reads -------------------------------------------------------------------


# response_class=Response: a text/plain class would make /openapi.json say errors are text too.
@router.get("/v1/jobs/{job_ref}/log", dependencies=ReadAuth, response_class=Response, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "the log"},
    **ERRORS})
async def get_log(
    job_ref: JobRef, state: State,
    attempt: Annotated[int | None, Query(ge=1, le=100_000)] = None,
) -> Any:
    """An attempt's full log (default the latest); a running attempt's last tail."""
    job = state.queue.get(state.queue.resolve(job_ref))
    number = attempt or job.attempts
    if number < 1 or number > job.attempts:
        raise NotFound(f"attempt: job {job.name} has no attempt {number}")
    path = _log_path(state, job.job_id, number)
    if path.exists():
        return FileResponse(path, media_type="text/plain; charset=utf-8")
    tail = state.queue.log_tail(job.job_id) if number == job.attempts else None
    if tail is None:
        raise NotFound(f"attempt: no log for attempt {number} of job {job.name}")
    return PlainTextResponse(tail)


@router.head("/v1/model/{artifact_id}", dependencies=ReadAuth, responses=ERRORS)
async def head_model(artifact_id: ArtifactId, state: State) -> Response:
    """Whether the store holds this artifact, so a worker can skip the upload."""
    if not await _in_store(state, state.store.has, artifact_id):
        raise ArtifactNotFound(artifact_id)
    return Response(headers={"Content-Length": str(_size(state, artifact_id))})


@router.get("/v1/model/{artifact_id}", dependencies=ReadAuth, response_class=FileResponse,
            responses=ERRORS)
async def get_model(artifact_id: ArtifactId, state: State) -> Response:
    """Download a bundle: sent from its file, or streamed from the bucket."""
    path = state.store.local_path(artifact_id)
    if path is not None:
        return FileResponse(path, media_type="application/octet-stream",
                            filename=f"{artifact_id[:12]}-{path.name}")
    size = await _in_store(state, _size, state, artifact_id)
    location = await _in_store(state, state.store.location, artifact_id)
    body = await _in_store(state, state.store.open, artifact_id)
    name = f"{artifact_id[:12]}-{location.rsplit('/', 1)[-1]}"
    return StreamingResponse(_chunks(body), media_type="application/octet-stream", headers={
        "Content-Length": str(size), "Content-Disposition": f'attachment; filename="{name}"'})


def _chunks(body: Readable, size: int = 1 << 20) -> Iterator[bytes]:
    """The body in chunks; Starlette pulls each in a thread, off the event loop."""
    try:
        while chunk := body.read(size):
            yield chunk
    finally:
        body.close()


@router.get("/v1/models", dependencies=ReadAuth, responses=ERRORS)
async def list_models(
    state: State, model: str | None = None, kind: ArtifactKind = "model",
) -> s.ModelsOut:
    """Stored artifacts of one kind (default: models), one index row each, with where the
    bundle lies under `path` (a filesystem path or an s3:// URL)."""
    return s.ModelsOut(models=await _in_store(state, _listing, state.store, model, kind))


def _listing(store: ArtifactStore, model: str | None, kind: str) -> list[dict[str, Any]]:
    return [{**row, "kind": kind_of(row), "path": store.location(row["artifact_id"])}
            for row in store.entries(model) if kind_of(row) == kind]


def _location(store: ArtifactStore, artifact_id: str) -> str | None:
    return store.location(artifact_id) if store.has(artifact_id) else None


@router.get("/v1/jobs", dependencies=ReadAuth, responses=ERRORS)
async def list_jobs(
    state: State, status: Annotated[str | None, Query(json_schema_extra=s.STATUS_ENUM)] = None,
    model: str | None = None, host: str | None = None,
) -> s.JobsOut:
    """Jobs in manifest order, optionally filtered."""
    return s.JobsOut(jobs=[_job_out(j) for j in state.queue.list_jobs(status, model, host)])


@router.get("/v1/jobs/{job_ref}", dependencies=ReadAuth, responses=ERRORS)
async def get_job(job_ref: JobRef, state: State) -> s.JobDetailOut:
    """One job with its history and attempts."""
    job_id = state.queue.resolve(job_ref)
    job = state.queue.get(job_id)
    history = [s.EventOut(at=e.at, kind=e.kind, attempt=e.attempt, worker_id=e.worker_id,
                          detail=dict(e.detail)) for e in state.queue.history(job_id)]
    attempts = [s.AttemptOut(attempt=a.attempt, worker_id=a.worker_id, hostname=a.hostname,
                             started_at=a.started_at, ended_at=a.ended_at, outcome=a.outcome,
                             error=a.error, cause=a.cause, signature=a.signature,
                             peak_vram_gib=a.peak_vram_gib)
                for a in state.queue.attempts(job_id)]
    path = None
    if job.artifact_id:
        path = await _in_store(state, _location, state.store, job.artifact_id)
    return s.JobDetailOut(**job.to_dict(), history=history, attempts_detail=attempts,
                          artifact_path=path)


@router.get("/v1/jobs/{job_ref}/why", dependencies=ReadAuth, responses=ERRORS)
async def why(job_ref: JobRef, state: State) -> s.WhyOut:
    """For each live worker, every rule that keeps it from this job (matching.explain)."""
    now = state.now()
    job = state.queue.get(state.queue.resolve(job_ref))
    live = [w for w in state.queue.workers(now) if w.alive]
    slots = {w.worker_id: w.slot() for w in live}
    waited_s = max(0.0, now - job.pending_since)
    # A multi-GPU host may hold the job back for a wider one that ranks above it.
    wide_host = job.status is Status.PENDING and any(w.host_gpus > 1 for w in live)
    pending = state.queue.list_jobs(status="pending") if wide_host else []
    reasons = matching.explain_fleet(job, slots, waited_s, pending)
    expires = job.pending_since + job.prefer_wait_s if job.prefer_cuda else None
    return s.WhyOut(
        job_id=job.job_id, name=job.name, status=job.status.value, waited_s=waited_s,
        preference_expires_at=expires,
        reason=job.error if job.status is Status.UNSCHEDULABLE else None,
        workers=[s.WhyWorker(worker_id=w.worker_id, hostname=w.hostname,
                             reasons=reasons[w.worker_id]) for w in live],
    )


@router.get("/v1/workers", dependencies=ReadAuth, responses=ERRORS)
async def list_workers(state: State) -> s.WorkersOut:
    """Every worker seen, with capability, liveness and the jobs it holds."""
    workers = state.queue.workers(state.now())
    return s.WorkersOut(workers=[s.WorkerOut(**w.to_dict()) for w in workers])


@router.get("/v1/health")
async def health(state: State) -> s.HealthOut:
    return s.HealthOut(
        ok=True, version=__version__, backend=state.queue.backend, manifest=state.manifest.name,
        counts=state.queue.counts(), uptime_s=round(state.now() - state.started_at, 3),
    )


# -- the operator's calls ----------------------------------------------------


@router.post("/v1/job/{job_ref}/cancel", dependencies=OperatorAuth, responses=ERRORS)
async def cancel(job_ref: JobRef, state: State) -> s.JobOut:
    """Stop a pending or live job; its worker stops at its next heartbeat."""
    return _job_out(state.queue.cancel(state.queue.resolve(job_ref), state.now()))


@router.post("/v1/job/{job_ref}/requeue", dependencies=OperatorAuth, responses=ERRORS)
async def requeue(job_ref: JobRef, state: State) -> s.JobOut:
    """Give a failed or cancelled job a fresh set of attempts."""
    return _job_out(state.queue.requeue(state.queue.resolve(job_ref), state.now()))


@router.post("/v1/manifest/reload", dependencies=OperatorAuth, responses=ERRORS)
async def reload(state: State) -> s.ReloadOut:
    """Re-read the manifest file; an invalid one changes nothing and returns its errors."""
    result = state.reload()
    return s.ReloadOut(added=result.added, updated=result.updated, unchanged=result.unchanged,
                       orphaned=result.orphaned)


@router.post("/v1/hosts/{hostname}/release", dependencies=OperatorAuth, responses=ERRORS)
async def release_host(
    hostname: Annotated[str, PathParam(min_length=1, max_length=253)], state: State
) -> s.ReleaseOut:
    """Lift a host's quarantine: it claims again at once; 404 when it is not quarantined."""
    released = state.queue.release_host(hostname, state.queue_now())
    log.warning("host %s released from quarantine (%s)", hostname, released.reason)
    return s.ReleaseOut(hostname=hostname, was_until=released.was_until,
                        reason=released.reason)

"""Typed request and response bodies: they make /openapi.json describe the whole API.

Request models forbid unknown fields, so a body can never set status, attempt
or worker id by accident or on purpose.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainfleet.queue.base import Status

Sha256 = Field(pattern=r"^[0-9a-f]{64}$")
#: Printable ASCII: a lease is what a claim handed out (hex); anything else is refused as 422.
LEASE_PATTERN = r"^[!-~]+$"
Lease = Field(min_length=1, max_length=128, pattern=LEASE_PATTERN)
FreeGib = Annotated[float, Field(ge=0, allow_inf_nan=False)]
WorkerId = Annotated[str, Field(min_length=1, max_length=200)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# What Capability.from_dict accepts (it validates, naming every bad field): documented here so
# that /openapi.json describes a claim body exactly.
_SIZE = {"type": "number", "minimum": 0}
CAPABILITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["hostname"],
    "properties": {
        "hostname": {"type": "string", "pattern": r"\S"},
        "os": {"type": "string"},
        "cpu_count": {"type": "integer", "minimum": 1},
        "ram_gib": _SIZE,
        "cuda": {"type": "boolean"},
        "gpus": {"type": "array", "items": {
            "type": "object", "required": ["vram_gib"], "properties": {
                "index": {"type": "integer", "minimum": 0}, "name": {"type": "string"},
                "vram_gib": _SIZE, "free_vram_gib": {"anyOf": [_SIZE, {"type": "null"}]}}}},
        "python": {"type": "string"},
        "torch": {"type": ["string", "null"]},
        "git_commit": {"type": ["string", "null"]},
        "version": {"type": "string"},
        "overridden": {"type": "array", "items": {"type": "string"}},
        "problems": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
STATUS_ENUM: dict[str, Any] = {"enum": [status.value for status in Status]}


class ClaimRequest(Strict):
    worker_id: str = Field(min_length=1, max_length=200)
    capability: dict[str, Any] = Field(json_schema_extra=CAPABILITY_SCHEMA)
    slot: int = Field(default=0, ge=0, le=1024)
    slot_vram_gib: float | None = Field(default=None, ge=0)
    #: the free GPU memory (GiB, nvidia-smi) of each GPU of its host the slot can hand one job
    #: now, in any order: a job on N GPUs fits when its VRAM need fits the N-th best. When
    #: given, free_vram_gib and gpus_free are ignored.
    free_vram_per_gpu: list[FreeGib] | None = Field(default=None, max_length=64)
    #: older workers: `gpus_free` GPUs, each with `free_vram_gib` free (capped at
    #: slot_vram_gib). Default: one GPU with slot_vram_gib for a CUDA slot, none for a CPU one.
    free_vram_gib: float | None = Field(default=None, ge=0)
    gpus_free: int | None = Field(default=None, ge=0, le=1024)
    #: the GPUs of the slot's host; with an offer narrower than that, the claim holds back
    #: lower-ranked jobs for a higher-ranked job needing more GPUs (docs/protocol.md)
    host_gpus: int | None = Field(default=None, ge=0, le=1024)
    allow_jobs: list[str] | None = None
    deny_jobs: list[str] = []


class Progress(BaseModel):
    model_config = ConfigDict(extra="allow")
    fraction: float | None = Field(default=None, ge=0, le=1)
    step: int | None = None
    message: str | None = Field(default=None, max_length=1000)


Attempt = Field(default=None, ge=1, le=1_000_000,
                description="the attempt the lease was handed out for; checked when given")


class HeartbeatRequest(Strict):
    lease: str = Lease
    attempt: int | None = Attempt
    progress: Progress | None = None
    log_tail: str | None = Field(default=None, max_length=64 * 1024)
    #: the most GPU memory the trainer held so far (sampled by the worker), kept per attempt
    peak_vram_gib: float | None = Field(default=None, ge=0)
    #: the worker ids of the sibling slots (same host) the job borrowed GPUs from: they make
    #: no calls while it runs, so this heartbeat marks them seen and lent to the job
    lent_slots: list[WorkerId] = Field(default=[], max_length=64)


class CompleteRequest(Strict):
    lease: str = Lease
    attempt: int | None = Attempt
    artifact_id: str = Sha256
    metrics: dict[str, Any] = {}
    #: the most GPU memory the trainer held (sampled by the worker up to its exit)
    peak_vram_gib: float | None = Field(default=None, ge=0)


class FailRequest(Strict):
    lease: str = Lease
    attempt: int | None = Attempt
    error: str = Field(max_length=64 * 1024)
    retryable: bool = True
    kind: Literal["trainer_error", "timeout", "worker_shutdown"] = "trainer_error"
    #: The worker's diagnosis (failures.diagnose): it steers the retry.
    cause: Literal["cuda_oom", "ram_oom", "killed", "signal", "timeout", "trainer_error"] | None \
        = None
    signature: str | None = Field(default=None, max_length=1000)
    peak_vram_gib: float | None = Field(default=None, ge=0)


class CheckpointRequest(Strict):
    lease: str = Lease
    attempt: int | None = Attempt
    artifact_id: str = Sha256  #: the checkpoint's bundle, already uploaded to the store
    progress: Progress | None = None  #: where the trainer was, for the job's history


class JobOut(BaseModel):
    """A job resource."""

    job_id: str
    name: str
    model: str
    mode: str
    hyper: dict[str, Any]
    split_recipe: str | None
    train_hosts: list[str]
    seed: int
    priority: int
    require_cuda: bool
    prefer_cuda: bool
    min_vram_gib: float
    min_ram_gib: float
    allowed_hosts: list[str]
    max_attempts: int
    max_lost: int
    timeout_s: float
    prefer_wait_s: float
    manifest_index: int
    orphaned: bool
    status: str
    attempts: int
    attempts_charged: int
    lost_count: int
    worker_id: str | None
    hostname: str | None
    progress: dict[str, Any] | None
    error: str | None
    metrics: dict[str, Any] | None
    artifact_id: str | None
    pending_since: float
    created_at: float
    updated_at: float
    heartbeat_at: float | None
    raised_vram_gib: float = 0.0
    raised_ram_gib: float = 0.0
    effective_vram_gib: float  #: what a slot must have now: declared, or raised after an OOM
    effective_ram_gib: float
    avoid_hosts: list[str] = []  #: hosts it failed on; the next attempt prefers others
    stall_after_s: float = 0.0  #: fail as stalled when progress stops this long (0: off)
    progress_at: float | None = None  #: when this attempt's progress last moved
    checkpoint_interval_s: float = 300.0  #: how often the worker uploads a checkpoint (0: never)
    checkpoint_id: str | None = None  #: the last checkpoint (an artifact id): retries resume it
    checkpoint_at: float | None = None  #: when it was recorded
    gpus: int = 0  #: GPUs of one host it needs at once (0: a CPU job)


class EventOut(BaseModel):
    at: float
    kind: str
    attempt: int | None
    worker_id: str | None
    detail: dict[str, Any]


class AttemptOut(BaseModel):
    attempt: int
    worker_id: str
    hostname: str
    started_at: float
    ended_at: float | None
    outcome: str | None
    error: str | None
    cause: str | None = None
    signature: str | None = None
    peak_vram_gib: float | None = None


class JobDetailOut(JobOut):
    history: list[EventOut]
    attempts_detail: list[AttemptOut]
    artifact_path: str | None


class JobsOut(BaseModel):
    jobs: list[JobOut]


class ClaimOut(BaseModel):
    job: JobOut
    lease: str
    attempt: int
    command: list[str]
    timeout_s: float
    heartbeat_interval_s: float
    #: the job's last checkpoint (an artifact id) for the trainer to resume from; None: start
    resume_from: str | None = None


class HeartbeatOut(BaseModel):
    action: Literal["continue", "cancel"]


class ArtifactOut(BaseModel):
    artifact_id: str
    size: int
    new: bool


class WorkerOut(BaseModel):
    worker_id: str
    hostname: str
    capability: dict[str, Any]
    allow_jobs: list[str] | None
    deny_jobs: list[str]
    slot_vram_gib: float
    first_seen: float
    last_seen: float
    alive: bool
    jobs: list[str]
    quarantined_until: float | None = None  #: its host claims nothing until then
    quarantine_reason: str | None = None
    job_names: list[str] = []  #: the names of `jobs`, in the same order
    host_gpus: int = 0  #: the GPUs its host has, as its slots reported them
    #: the live job a sibling slot borrowed this slot's GPU for (its name), or None
    lent_to: str | None = None


class WorkersOut(BaseModel):
    workers: list[WorkerOut]


class ReleaseOut(BaseModel):
    hostname: str
    was_until: float  #: when the lifted quarantine would have ended
    reason: str


class ReloadOut(BaseModel):
    added: int
    updated: int
    unchanged: int
    orphaned: int


class HealthOut(BaseModel):
    ok: bool
    version: str
    backend: str
    manifest: str
    counts: dict[str, int]
    uptime_s: float


class ModelsOut(BaseModel):
    models: list[dict[str, Any]]


class ErrorOut(BaseModel):
    error: str
    detail: Any = None


class WhyWorker(BaseModel):
    worker_id: str
    hostname: str
    reasons: list[str]


class WhyOut(BaseModel):
    """Why a job is (not) running: each live worker's blocking rules."""

    job_id: str
    name: str
    status: str
    waited_s: float
    preference_expires_at: float | None
    workers: list[WhyWorker]
    reason: str | None = None  #: why an unschedulable job is: no worker seen can run it


# -- per-host tokens and enrollment ------------------------------------------

Hostname = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class TokenCreateRequest(Strict):
    hostname: str = Hostname
    enroll: bool = False  #: a one-time enrollment code instead of a worker token
    ttl_s: float | None = Field(default=None, gt=0, le=10 * 365 * 86400)


class TokenOut(BaseModel):
    """A token or code as listed: a short id, never the token or its hash."""

    token_id: str
    hostname: str
    kind: Literal["worker", "enroll"]
    created_at: float
    expires_at: float | None
    used_at: float | None
    last_used_at: float | None
    revoked_at: float | None
    active: bool


class TokenCreatedOut(TokenOut):
    token: str  #: shown this once; the receiver keeps only its hash


class TokensOut(BaseModel):
    tokens: list[TokenOut]


class RevokeOut(BaseModel):
    hostname: str
    revoked: int
    requeued: list[str]


class EnrollRequest(Strict):
    code: str = Field(min_length=1, max_length=200)
    hostname: str = Hostname


class EnrollOut(BaseModel):
    token: str
    hostname: str
    token_id: str

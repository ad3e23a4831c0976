"""The JobQueue protocol every backend implements, and the records it returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from trainfleet.capability import Capability
from trainfleet.manifest import Manifest
from trainfleet.matching import Policy


class Status(StrEnum):
    PENDING = "pending"  #: waiting for an eligible slot
    CLAIMED = "claimed"  #: handed to a worker, no heartbeat yet
    RUNNING = "running"  #: the worker has heartbeated at least once
    COMPLETED = "completed"  #: an artifact was accepted; terminal
    FAILED = "failed"  #: out of attempts, or failed without retry; requeue to try again
    CANCELLED = "cancelled"  #: stopped by an operator; requeue to try again


LIVE = (Status.CLAIMED, Status.RUNNING)


class FailureKind(StrEnum):
    TRAINER_ERROR = "trainer_error"  #: the trainer exited non-zero
    TIMEOUT = "timeout"  #: the trainer ran past the job's timeout_s
    LOST_WORKER = "lost_worker"  #: no heartbeat within stale_after_s
    WORKER_SHUTDOWN = "worker_shutdown"  #: the worker was stopped; refunds the attempt


@dataclass(frozen=True)
class Job:
    job_id: str
    name: str
    model: str
    mode: str
    hyper: Mapping[str, Any]
    split_recipe: str | None
    train_hosts: tuple[str, ...]
    seed: int
    priority: int
    require_cuda: bool
    prefer_cuda: bool
    min_vram_gib: float
    min_ram_gib: float
    allowed_hosts: tuple[str, ...]
    max_attempts: int
    max_lost: int
    timeout_s: float
    prefer_wait_s: float
    manifest_index: int
    orphaned: bool
    status: Status
    attempts: int
    attempts_charged: int  #: trainer errors and timeouts, bounded by max_attempts
    lost_count: int  #: attempts lost with their worker, bounded by max_lost
    worker_id: str | None
    hostname: str | None
    progress: Mapping[str, Any] | None
    error: str | None
    metrics: Mapping[str, Any] | None
    artifact_id: str | None
    pending_since: float
    created_at: float
    updated_at: float
    heartbeat_at: float | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["hyper"] = dict(self.hyper)
        data["train_hosts"] = list(self.train_hosts)
        data["allowed_hosts"] = list(self.allowed_hosts)
        return data


@dataclass(frozen=True)
class Claim:
    job: Job
    lease: str
    attempt: int


@dataclass(frozen=True)
class SyncResult:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    orphaned: int = 0


@dataclass(frozen=True)
class Event:
    job_id: str
    at: float
    kind: str
    attempt: int | None = None
    worker_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Attempt:
    job_id: str
    attempt: int
    worker_id: str
    hostname: str
    started_at: float
    ended_at: float | None
    outcome: str | None  #: completed, a FailureKind value, cancelled, or None while live
    error: str | None


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    hostname: str
    capability: Capability
    policy: Policy
    slot_vram_gib: float
    first_seen: float
    last_seen: float
    alive: bool
    jobs: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "hostname": self.hostname,
            "capability": self.capability.to_dict(),
            "allow_jobs": None if self.policy.allow is None else sorted(self.policy.allow),
            "deny_jobs": sorted(self.policy.deny),
            "slot_vram_gib": self.slot_vram_gib,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "alive": self.alive,
            "jobs": list(self.jobs),
        }


class JobQueue(Protocol):
    """A durable job queue; every method is one atomic transaction.

    Calls about a claimed job carry its lease; a lease that is not the job's
    current one raises LeaseLost and changes nothing.
    """

    backend: str

    def sync_manifest(self, manifest: Manifest, now: float | None = None) -> SyncResult: ...
    def claim_next(
        self,
        worker_id: str,
        capability: Capability,
        slot_vram_gib: float | None = None,
        own_allow: tuple[str, ...] | None = None,
        own_deny: tuple[str, ...] = (),
        now: float | None = None,
    ) -> Claim | None: ...
    def heartbeat(
        self,
        job_id: str,
        lease: str,
        progress: Mapping[str, Any] | None = None,
        log_tail: str | None = None,
        now: float | None = None,
    ) -> str: ...
    def complete(
        self,
        job_id: str,
        lease: str,
        artifact_id: str,
        metrics: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> Job: ...
    def fail(
        self,
        job_id: str,
        lease: str,
        error: str,
        retryable: bool = True,
        kind: FailureKind = FailureKind.TRAINER_ERROR,
        now: float | None = None,
    ) -> Job: ...
    def check_lease(self, job_id: str, lease: str, now: float | None = None) -> Job: ...
    def attempt_lease_matches(self, job_id: str, attempt: int, lease: str) -> bool: ...
    def log_tail(self, job_id: str) -> str | None: ...
    def cancel(self, job_id: str, now: float | None = None) -> Job: ...
    def requeue(self, job_id: str, now: float | None = None) -> Job: ...
    def sweep_stale(self, now: float | None = None, since: float = 0.0) -> list[str]: ...
    def get(self, job_id: str) -> Job: ...
    def resolve(self, ref: str) -> str: ...
    def list_jobs(
        self, status: str | None = None, model: str | None = None, host: str | None = None
    ) -> list[Job]: ...
    def history(self, job_id: str) -> list[Event]: ...
    def attempts(self, job_id: str) -> list[Attempt]: ...
    def workers(self, now: float | None = None) -> list[WorkerInfo]: ...
    def counts(self) -> dict[str, int]: ...
    def close(self) -> None: ...

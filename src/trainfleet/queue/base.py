"""The JobQueue protocol every backend implements, and the records it returns."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, Protocol

from trainfleet.capability import Capability
from trainfleet.errors import EnrollmentRefused
from trainfleet.failures import Cause
from trainfleet.manifest import Manifest
from trainfleet.matching import Policy, Slot
from trainfleet.tokens import TokenKind, token_id


class Status(StrEnum):
    PENDING = "pending"  #: waiting for an eligible slot
    CLAIMED = "claimed"  #: handed to a worker, no heartbeat yet
    RUNNING = "running"  #: the worker has heartbeated at least once
    COMPLETED = "completed"  #: an artifact was accepted; terminal
    FAILED = "failed"  #: out of attempts, or failed without retry; requeue to try again
    CANCELLED = "cancelled"  #: stopped by an operator; requeue to try again
    #: no worker ever seen can run it (its error says why); pending again once one can
    UNSCHEDULABLE = "unschedulable"


LIVE = (Status.CLAIMED, Status.RUNNING)


class FailureKind(StrEnum):
    TRAINER_ERROR = "trainer_error"  #: the trainer exited non-zero
    TIMEOUT = "timeout"  #: the trainer ran past the job's timeout_s
    LOST_WORKER = "lost_worker"  #: no heartbeat within stale_after_s
    WORKER_SHUTDOWN = "worker_shutdown"  #: the worker was stopped; refunds the attempt
    STALLED = "stalled"  #: heartbeats came, but progress did not move for stall_after_s


#: Failures that are the training's own, counted against max_attempts.
CHARGED = (FailureKind.TRAINER_ERROR, FailureKind.TIMEOUT, FailureKind.STALLED)


def same_lease(stored: str, given: str) -> bool:
    """Constant-time lease check; on bytes, so a caller's non-ASCII lease is a mismatch
    (409), not a TypeError (500)."""
    return secrets.compare_digest(stored.encode(), given.encode())


def progress_moved(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> bool:
    """Whether a heartbeat's progress moved the step or the fraction on (stall detection)."""
    if new is None:
        return False
    before = old or {}
    return (new.get("step"), new.get("fraction")) != (before.get("step"), before.get("fraction"))


def stalled_error(row: Mapping[str, Any], idle_s: float) -> str:
    """The error of a job failed as stalled, from its database row."""
    progress = row["progress"]
    if isinstance(progress, str):  # SQLite keeps JSON as text
        progress = json.loads(progress)
    where = "no progress reported" if not progress else "last progress: " + ", ".join(
        f"{key} {progress[key]}" for key in ("step", "fraction", "message") if key in progress)
    return (f"stalled: progress has not moved for {idle_s:.0f} s (stall_after_s "
            f"{row['stall_after_s']:g}) while worker {row['worker_id']} kept heartbeating; "
            f"{where}")


def checkpoint_detail(progress: Mapping[str, Any] | None) -> dict[str, Any]:
    """The step and fraction a checkpoint was taken at, for its 'checkpoint' event."""
    found = progress or {}
    return {key: found[key] for key in ("step", "fraction") if key in found}


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
    #: Raised after an out-of-memory failure (0: not raised); the declared values stay.
    raised_vram_gib: float = 0.0
    raised_ram_gib: float = 0.0
    avoid_hosts: tuple[str, ...] = ()  #: hosts it failed on: the next attempt goes elsewhere
    stall_after_s: float = 0.0  #: 0: never failed as stalled
    progress_at: float | None = None  #: when this attempt's progress last moved (or began)
    checkpoint_interval_s: float = 300.0  #: how often the worker uploads a checkpoint; 0: never
    #: The last checkpoint a worker uploaded (an artifact id): a requeued attempt resumes from it.
    checkpoint_id: str | None = None
    checkpoint_at: float | None = None
    gpus: int = 0  #: GPUs of one host it needs at once (0: a CPU job)

    @property
    def effective_vram_gib(self) -> float:
        """What a slot must have: the declared min_vram_gib, or more after a CUDA OOM."""
        return max(self.min_vram_gib, self.raised_vram_gib)

    @property
    def effective_ram_gib(self) -> float:
        return max(self.min_ram_gib, self.raised_ram_gib)

    def to_dict(self) -> dict[str, Any]:
        # A shallow copy: asdict's recursive deep copy was a tenth of a claim's cost.
        data = {name: getattr(self, name) for name in JOB_FIELDS}
        data["status"] = self.status.value
        data["hyper"] = dict(self.hyper)
        data["progress"] = None if self.progress is None else dict(self.progress)
        data["metrics"] = None if self.metrics is None else dict(self.metrics)
        data["train_hosts"] = list(self.train_hosts)
        data["allowed_hosts"] = list(self.allowed_hosts)
        data["avoid_hosts"] = list(self.avoid_hosts)
        data["effective_vram_gib"] = self.effective_vram_gib
        data["effective_ram_gib"] = self.effective_ram_gib
        return data


#: A worker's last_seen is rewritten at most this often by its claims and heartbeats (or a
#: tenth of stale_after_s, if less): the registry row is not rewritten on every call.
SEEN_EVERY_S = 1.0


def seen_every_s(stale_after_s: float) -> float:
    """How often a worker's last_seen is due a write, for a queue with this stale timeout."""
    return min(SEEN_EVERY_S, stale_after_s / 10)


#: Job's field names, read on every claim, heartbeat and completion (fields() is slow).
JOB_FIELDS = tuple(f.name for f in fields(Job))


@dataclass(frozen=True)
class JobNeeds:
    """The hard constraints shared by a group of waiting jobs (matching.Needs)."""

    model: str
    require_cuda: bool
    min_vram_gib: float
    min_ram_gib: float
    raised_vram_gib: float
    raised_ram_gib: float
    allowed_hosts: tuple[str, ...]
    gpus: int = 0

    @property
    def effective_vram_gib(self) -> float:
        return max(self.min_vram_gib, self.raised_vram_gib)

    @property
    def effective_ram_gib(self) -> float:
        return max(self.min_ram_gib, self.raised_ram_gib)


@dataclass(frozen=True)
class Rescheduled:
    unschedulable: tuple[str, ...] = ()  #: jobs no worker seen can run, marked now
    pending: tuple[str, ...] = ()  #: unschedulable jobs a worker seen can run now


@dataclass(frozen=True)
class Claim:
    job: Job
    lease: str
    attempt: int
    #: The trainer command as the database knows it (so every receiver hands out the latest
    #: reload's); empty when the backend leaves it to the receiver's own manifest.
    command: tuple[str, ...] = ()


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
    cause: str | None = None  #: the worker's diagnosis (failures.Cause) of a failed attempt
    signature: str | None = None  #: the normalised error line: equal on two hosts = same bug
    peak_vram_gib: float | None = None


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
    quarantined_until: float | None = None  #: its host claims nothing until then
    quarantine_reason: str | None = None
    job_names: tuple[str, ...] = ()  #: the names of `jobs`, in the same order
    #: the GPUs its host has, as the registry knows them (see with_host_gpus); 0: none
    host_gpus: int = 0
    #: the name of the live job a sibling slot of its host borrowed its GPU for (a heartbeat's
    #: lent_slots); None when not lent, or once that job is no longer live
    lent_to: str | None = None

    @property
    def quarantine(self) -> str | None:
        """The host's quarantine as `why` words it, or None."""
        if self.quarantined_until is None:
            return None
        return f"host quarantined until {_utc(self.quarantined_until)}: {self.quarantine_reason}"

    def slot(self, quarantine: bool = True) -> Slot:
        """The worker's slot for matching (with its host's quarantine unless told not to)."""
        return Slot(self.capability, self.slot_vram_gib, self.policy,
                    self.quarantine if quarantine else None,
                    self.host_gpus if self.capability.cuda and self.host_gpus else None)

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
            "quarantined_until": self.quarantined_until,
            "quarantine_reason": self.quarantine_reason,
            "job_names": list(self.job_names),
            "host_gpus": self.host_gpus,
            "lent_to": self.lent_to,
        }


def with_host_gpus(workers: list[WorkerInfo]) -> list[WorkerInfo]:
    """Each worker with its host's GPU count: the distinct GPUs all its slots reported.

    A slot's claim offers the GPUs free now; the registry's rules (why, unschedulable) go by
    what the host has, as they go by a slot's total VRAM rather than its free VRAM."""
    seen: dict[str, set[int]] = {}
    for w in workers:
        if w.capability.cuda:
            seen.setdefault(w.hostname, set()).update(gpu.index for gpu in w.capability.gpus)
    return [dataclasses.replace(w, host_gpus=len(seen.get(w.hostname, ()))) for w in workers]


@dataclass(frozen=True)
class TokenInfo:
    """A stored token or enrollment code; the token itself is never stored, only its hash."""

    token_hash: str  #: sha256 hex of the token
    hostname: str  #: the host it is bound to
    kind: TokenKind
    created_at: float
    expires_at: float | None  #: None: never expires
    used_at: float | None  #: when an enrollment code was redeemed
    last_used_at: float | None  #: a worker token's latest use (updated about once a minute)
    revoked_at: float | None

    def active(self, now: float) -> bool:
        """Usable now: not revoked, not expired, and (a code) not yet redeemed."""
        return (
            self.revoked_at is None
            and (self.expires_at is None or self.expires_at > now)
            and (self.kind is TokenKind.WORKER or self.used_at is None)
        )

    def to_dict(self, now: float) -> dict[str, Any]:
        """The public view: a short id instead of the hash, and whether it is active."""
        data = asdict(self)
        del data["token_hash"]
        return {"token_id": token_id(self.token_hash), **data, "kind": self.kind.value,
                "active": self.active(now)}


def check_enroll_code(code: TokenInfo | None, hostname: str, now: float) -> None:
    """Raise EnrollmentRefused naming the first rule the code breaks; every backend uses it."""
    if code is None or code.kind is not TokenKind.ENROLL:
        raise EnrollmentRefused(
            "unknown", "the code is not known to this receiver (mistyped, or made by another)")
    again = f"create a new one with `trainfleet token create {code.hostname} --enroll`"
    if code.revoked_at is not None:
        raise EnrollmentRefused("revoked", f"the code for host {code.hostname!r} was revoked "
                                f"at {_utc(code.revoked_at)}; {again}")
    if code.used_at is not None:
        raise EnrollmentRefused("used", f"the code was already used at {_utc(code.used_at)}; "
                                f"a code works once: {again}")
    if code.expires_at is not None and code.expires_at <= now:
        raise EnrollmentRefused("expired", f"the code expired at {_utc(code.expires_at)}; "
                                f"{again}")
    if code.hostname != hostname:
        raise EnrollmentRefused(
            "hostname", f"the code is for host {code.hostname!r}, not {hostname!r} "
            "(enrol from that host, or pass --hostname if it claims under another name)")


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


@dataclass(frozen=True)
class HostRelease:
    hostname: str
    was_until: float  #: the quarantine's end, before the release
    reason: str


@dataclass(frozen=True)
class RevokeResult:
    hostname: str
    revoked: int  #: tokens and codes of the host made unusable
    requeued: tuple[str, ...]  #: its live jobs, swept at once like a lost worker's


_TUPLE_COLUMNS = ("train_hosts", "allowed_hosts", "avoid_hosts")
_BOOL_COLUMNS = ("require_cuda", "prefer_cuda", "orphaned")
#: Columns stored as JSON; a backend decodes them before job_from_row.
JSON_COLUMNS = ("hyper", "progress", "metrics", *_TUPLE_COLUMNS)


def job_from_row(row: Mapping[str, Any]) -> Job:
    """The Job of one jobs row whose JSON columns are already decoded (every backend)."""
    fields = {name: row[name] for name in JOB_FIELDS}
    for name in _TUPLE_COLUMNS:
        fields[name] = tuple(fields[name])
    for name in _BOOL_COLUMNS:
        fields[name] = bool(fields[name])
    fields["status"] = Status(fields["status"])
    return Job(**fields)


def attempt_from_row(row: Mapping[str, Any]) -> Attempt:
    return Attempt(**{f.name: row[f.name] for f in dataclasses.fields(Attempt)})


class JobQueue(Protocol):
    """A durable job queue; every method is one atomic transaction.

    Calls about a claimed job carry its lease; a lease that is not the job's
    current one raises LeaseLost and changes nothing.
    """

    backend: str
    #: True when calls made without `now` are timed by the database server's clock (shared by
    #: several receivers); a receiver then leaves `now` out, and reads the time from clock().
    database_clock: bool

    def clock(self) -> float: ...
    def sync_manifest(self, manifest: Manifest, now: float | None = None) -> SyncResult: ...
    def claim_next(
        self,
        worker_id: str,
        capability: Capability,
        slot_vram_gib: float | None = None,
        own_allow: tuple[str, ...] | None = None,
        own_deny: tuple[str, ...] = (),
        now: float | None = None,
        *,
        free_vram_gib: float | None = None,
        gpus_free: int | None = None,
        free_vram_per_gpu: Sequence[float] | None = None,
        host_gpus: int | None = None,
    ) -> Claim | None: ...
    def heartbeat(
        self,
        job_id: str,
        lease: str,
        progress: Mapping[str, Any] | None = None,
        log_tail: str | None = None,
        now: float | None = None,
        *,
        peak_vram_gib: float | None = None,
        lent_slots: Sequence[str] = (),
    ) -> str: ...
    def complete(
        self,
        job_id: str,
        lease: str,
        artifact_id: str,
        metrics: Mapping[str, Any] | None = None,
        now: float | None = None,
        *,
        peak_vram_gib: float | None = None,
    ) -> Job: ...
    def fail(
        self,
        job_id: str,
        lease: str,
        error: str,
        retryable: bool = True,
        kind: FailureKind = FailureKind.TRAINER_ERROR,
        now: float | None = None,
        *,
        cause: Cause | None = None,
        signature: str | None = None,
        peak_vram_gib: float | None = None,
    ) -> Job: ...
    # record_checkpoint: the job's last checkpoint is now `artifact_id` (already stored); fenced
    # on the lease like heartbeat, one 'checkpoint' event. Kept across retries, sweeps and
    # operator requeues, so the next attempt (on any host) resumes from it.
    def record_checkpoint(
        self,
        job_id: str,
        lease: str,
        artifact_id: str,
        now: float | None = None,
        *,
        progress: Mapping[str, Any] | None = None,
    ) -> Job: ...
    # artifacts_in_use: every job's artifact_id (any status) and the checkpoint_id of every job
    # not completed (a failed or cancelled one may be requeued and resume from it): what the
    # receiver's checkpoint pruning must never delete. One read.
    def artifacts_in_use(self) -> set[str]: ...
    def check_lease(self, job_id: str, lease: str, now: float | None = None) -> Job: ...
    def attempt_lease_matches(self, job_id: str, attempt: int, lease: str) -> bool: ...
    def log_tail(self, job_id: str) -> str | None: ...
    def cancel(self, job_id: str, now: float | None = None) -> Job: ...
    def requeue(self, job_id: str, now: float | None = None) -> Job: ...
    def sweep_stale(self, now: float | None = None, since: float = 0.0) -> list[str]: ...
    # fail_stalled: a live job with stall_after_s > 0 whose worker still heartbeats (within
    # stale_after_s) but whose progress has not moved for stall_after_s (never counting time
    # before `since`) fails as STALLED, charged like a trainer error; its ids.
    def fail_stalled(self, now: float | None = None, since: float = 0.0) -> list[str]: ...
    # reschedule: a waiting job that no worker ever seen (alive or not) could run, by the hard
    # constraints, becomes unschedulable with the reason as its error; an unschedulable one
    # that one could run is pending again. sync_manifest does it too, and a claim makes the
    # unschedulable jobs its slot can run pending before it picks.
    def reschedule(self, now: float | None = None) -> Rescheduled: ...
    # Host quarantine: fail quarantines a host whose last retry.QUARANTINE_AFTER attempts
    # (since its last quarantine or release) failed on different jobs with the same cause;
    # claims from it answer None until then. release_host lifts it (NotFound when none).
    def release_host(self, hostname: str, now: float | None = None) -> HostRelease: ...
    def get(self, job_id: str) -> Job: ...
    def resolve(self, ref: str) -> str: ...
    def list_jobs(
        self, status: str | None = None, model: str | None = None, host: str | None = None
    ) -> list[Job]: ...
    def history(self, job_id: str) -> list[Event]: ...
    def attempts(self, job_id: str) -> list[Attempt]: ...
    def workers(self, now: float | None = None) -> list[WorkerInfo]: ...
    def counts(self) -> dict[str, int]: ...
    # -- per-host tokens: only sha256 hashes are stored -------------------
    # lookup_token answers only active ones (TokenInfo.active). redeem_enroll_code is one
    # transaction: the code must be known, of kind enroll, unrevoked, unused, unexpired and
    # bound to `hostname` (else EnrollmentRefused naming the rule, and nothing changes); it is
    # marked used and a worker token for the host is stored. revoke_host revokes every token
    # and unused code of the host (NotFound when none is active) and sweeps its live jobs as the
    # stale sweep does, with "revoked" in their error.
    # has_worker_tokens: whether any worker token was ever issued (revoked and expired ones
    # count), so a receiver that has enrolled hosts never falls back to open worker calls.
    def create_token(
        self,
        hostname: str,
        kind: TokenKind,
        token_hash: str,
        expires_at: float | None = None,
        now: float | None = None,
    ) -> TokenInfo: ...
    def lookup_token(self, token_hash: str, now: float | None = None) -> TokenInfo | None: ...
    def touch_token(self, token_hash: str, now: float | None = None) -> None: ...
    def has_worker_tokens(self) -> bool: ...
    def redeem_enroll_code(
        self, code_hash: str, hostname: str, new_token_hash: str, now: float | None = None
    ) -> TokenInfo: ...
    def list_tokens(self) -> list[TokenInfo]: ...
    def revoke_host(self, hostname: str, now: float | None = None) -> RevokeResult: ...
    # grouped: the writes a request makes inside it may share one COMMIT with the other
    # requests of this turn of the event loop, and it returns only once they are committed
    # (group_commit.py); a backend without group commit does nothing.
    def grouped(self) -> AbstractAsyncContextManager[None]: ...
    def close(self) -> None: ...

"""The embedded SQLite job queue: one database file in WAL mode, one connection.

Every write is one `BEGIN IMMEDIATE` transaction, so concurrent processes
serialise on the write lock instead of failing with "database is locked".
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, cast

from trainfleet import matching
from trainfleet.capability import Capability
from trainfleet.errors import (
    AmbiguousJobId,
    BadRequest,
    IllegalTransition,
    JobNotFound,
    LeaseLost,
    NotFound,
    TrainfleetError,
)
from trainfleet.failures import Cause
from trainfleet.manifest import HostSpec, JobSpec, Manifest
from trainfleet.queue import group_commit
from trainfleet.queue import retry as retry_policy
from trainfleet.queue.base import (
    CHARGED,
    JSON_COLUMNS,
    LIVE,
    Attempt,
    Claim,
    Event,
    FailureKind,
    HostRelease,
    Job,
    JobNeeds,
    Rescheduled,
    RevokeResult,
    Status,
    SyncResult,
    TokenInfo,
    WorkerInfo,
    attempt_from_row,
    check_enroll_code,
    checkpoint_detail,
    job_from_row,
    progress_moved,
    same_lease,
    seen_every_s,
    stalled_error,
    with_host_gpus,
)
from trainfleet.tokens import TokenKind

SCHEMA_VERSION = 3
#: Upgrade steps: MIGRATIONS[v] takes schema v-1 to v. sqlite.sql is always the newest schema.
MIGRATIONS: dict[int, str] = {
    2: """
ALTER TABLE jobs ADD COLUMN raised_vram_gib REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN raised_ram_gib REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN avoid_hosts TEXT NOT NULL DEFAULT '[]';
ALTER TABLE attempts ADD COLUMN cause TEXT;
ALTER TABLE attempts ADD COLUMN signature TEXT;
ALTER TABLE attempts ADD COLUMN peak_vram_gib REAL;
ALTER TABLE jobs ADD COLUMN stall_after_s REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN progress_at REAL;
""",
    3: """
ALTER TABLE jobs ADD COLUMN checkpoint_interval_s REAL NOT NULL DEFAULT 300;
ALTER TABLE jobs ADD COLUMN checkpoint_id TEXT;
ALTER TABLE jobs ADD COLUMN checkpoint_at REAL;
ALTER TABLE jobs ADD COLUMN gpus INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET gpus = 1 WHERE require_cuda = 1;
CREATE INDEX IF NOT EXISTS jobs_pending_class
    ON jobs (json_array(model, require_cuda, prefer_cuda, allowed_hosts), priority DESC,
             manifest_index)
    WHERE status = 'pending' AND orphaned = 0;
DROP INDEX IF EXISTS attempts_host;
CREATE INDEX attempts_host ON attempts (hostname, ended_at) WHERE ended_at IS NOT NULL;
DROP INDEX IF EXISTS jobs_pending_cpu;
DROP INDEX IF EXISTS jobs_pending_cuda;
ALTER TABLE workers ADD COLUMN lent_to_job TEXT;
""",
}
HEX = set("0123456789abcdef")
#: The JSON columns that hold lists: job_from_row turns each into a tuple.
TUPLE_JSON = frozenset(("train_hosts", "allowed_hosts", "avoid_hosts"))

# Hard constraints as SQL; matching.explain is applied to each candidate as well,
# and a property test holds the two against each other.
CLAIM_CANDIDATES = """
SELECT * FROM jobs INDEXED BY {index}
WHERE status = 'pending' AND orphaned = 0
  AND (require_cuda = 0 OR :cuda = 1)
  AND gpus <= :gpus
  AND max(min_vram_gib, raised_vram_gib) <= :vram
  AND (gpus <= 1 OR :free IS NULL
       OR max(min_vram_gib, raised_vram_gib) <= json_extract(:free, '$[' || (gpus - 1) || ']'))
  AND max(min_ram_gib, raised_ram_gib) <= :ram
  AND (allowed_hosts = '[]'
       OR EXISTS (SELECT 1 FROM json_each(jobs.allowed_hosts) WHERE value = :hostname))
  AND (:allow IS NULL OR model IN (SELECT value FROM json_each(:allow)))
  AND model NOT IN (SELECT value FROM json_each(:deny))
ORDER BY {order}
"""
ORDER_CPU = "priority DESC, manifest_index"
ORDER_CUDA = "priority DESC, prefer_cuda DESC, manifest_index"
# The rank walk (too many classes) has one index for both orders, keyed by prefer_cuda
# first: a claim walks its two prefer_cuda runs, each in `priority DESC, manifest_index`, and
# merges them in the slot's order. One pending index fewer for every claim to update.
RANK_CANDIDATES = CLAIM_CANDIDATES.replace(
    "ORDER BY", "  AND prefer_cuda = :prefer_cuda\nORDER BY"
).format(index="jobs_pending_rank", order=ORDER_CPU)

# A claim's job classes: the hard constraints a slot can rule out for a whole class at once
# (model, require_cuda, allowed_hosts), plus prefer_cuda so that within a class both rank
# orders are `priority DESC, manifest_index`. The class key is their JSON array (unambiguous);
# the next class is one index seek past the last.
CLASS_KEY = "json_array(model, require_cuda, prefer_cuda, allowed_hosts)"
NEXT_CLASS = f"""
SELECT {CLASS_KEY} FROM jobs INDEXED BY jobs_pending_class
WHERE status = 'pending' AND orphaned = 0 AND {CLASS_KEY} > {{after}}
ORDER BY {CLASS_KEY} LIMIT 1
"""
#: More classes than this and the claim walks the rank index instead (CLAIM_CANDIDATES).
MAX_CLASSES = 64
# Every class, in one statement: a loose index scan, one seek per class.
CLASSES = f"""
WITH RECURSIVE classes(class) AS (
    SELECT ({NEXT_CLASS.format(after="''")})
    UNION ALL
    SELECT ({NEXT_CLASS.format(after="classes.class")}) FROM classes
    WHERE classes.class IS NOT NULL
)
SELECT class FROM classes WHERE class IS NOT NULL LIMIT {MAX_CLASSES + 1}
"""
# CLAIM_CANDIDATES within one class, in rank order straight off jobs_pending_class.
CLASS_CANDIDATES = CLAIM_CANDIDATES.replace(
    "ORDER BY", f"  AND {CLASS_KEY} = :job_class\nORDER BY"
).format(index="jobs_pending_class", order=ORDER_CPU)

MARK_CLAIMED = """
UPDATE jobs SET status = 'claimed', lease = :lease, attempts = attempts + 1,
       worker_id = :worker_id,
       hostname = :hostname, claimed_at = :now, heartbeat_at = :now, progress = NULL,
       progress_at = :now, log_tail = NULL, updated_at = :now
WHERE job_id = :job_id AND status = 'pending'
"""

UPSERT_WORKER = """
INSERT INTO workers (worker_id, hostname, capability, allow_jobs, deny_jobs, slot_vram_gib,
                     first_seen, last_seen)
VALUES (:worker_id, :hostname, :capability, :allow, :deny, :vram, :now, :now)
ON CONFLICT (worker_id) DO UPDATE SET
    hostname = excluded.hostname, capability = excluded.capability,
    allow_jobs = excluded.allow_jobs, deny_jobs = excluded.deny_jobs,
    slot_vram_gib = excluded.slot_vram_gib, last_seen = excluded.last_seen,
    lent_to_job = NULL
"""
# A heartbeat's lent_slots: the sibling slots its job borrowed are seen, and lent to the job;
# only slots of the job's own host (a worker vouches for no other host's).
MARK_LENT = """
UPDATE workers SET last_seen = :now, lent_to_job = :job_id
WHERE worker_id IN (SELECT value FROM json_each(:lent)) AND hostname = :hostname
  AND worker_id != :worker_id
"""

INSERT_JOB = """
INSERT INTO jobs (job_id, name, model, mode, hyper, split_recipe, train_hosts, seed, priority,
                  require_cuda, prefer_cuda, min_vram_gib, min_ram_gib, allowed_hosts,
                  max_attempts, max_lost, timeout_s, prefer_wait_s, stall_after_s,
                  checkpoint_interval_s, gpus,
                  manifest_index, status, pending_since, created_at, updated_at)
VALUES (:job_id, :name, :model, :mode, :hyper, :split_recipe, :train_hosts, :seed, :priority,
        :require_cuda, :prefer_cuda, :min_vram_gib, :min_ram_gib, :allowed_hosts,
        :max_attempts, :max_lost, :timeout_s, :prefer_wait_s, :stall_after_s,
        :checkpoint_interval_s, :gpus,
        :manifest_index, 'pending', :now, :now, :now)
"""

# Constraints follow the manifest only while the job waits; its place in the
# manifest always does.
UPDATE_PENDING_JOB = """
UPDATE jobs SET name = :name, priority = :priority, require_cuda = :require_cuda,
       prefer_cuda = :prefer_cuda, min_vram_gib = :min_vram_gib, min_ram_gib = :min_ram_gib,
       allowed_hosts = :allowed_hosts, max_attempts = :max_attempts, max_lost = :max_lost,
       timeout_s = :timeout_s, stall_after_s = :stall_after_s,
       checkpoint_interval_s = :checkpoint_interval_s, gpus = :gpus,
       prefer_wait_s = :prefer_wait_s, manifest_index = :manifest_index, orphaned = 0,
       updated_at = :now
WHERE job_id = :job_id
"""
UPDATE_PLACE = """
UPDATE jobs SET manifest_index = :manifest_index, orphaned = 0
WHERE job_id = :job_id AND (manifest_index != :manifest_index OR orphaned != 0)
"""

INSERT_TOKEN = """
INSERT INTO tokens (token_hash, hostname, kind, created_at, expires_at)
VALUES (:token_hash, :hostname, :kind, :now, :expires_at)
"""
ANY_WORKER_TOKEN = "SELECT EXISTS (SELECT 1 FROM tokens WHERE kind = 'worker')"
REVOKE_HOST_TOKENS = """
UPDATE tokens SET revoked_at = :now
WHERE hostname = :hostname AND revoked_at IS NULL AND (kind = 'worker' OR used_at IS NULL)
"""
HOST_LIVE_JOBS = """
SELECT * FROM jobs WHERE status IN ('claimed', 'running') AND hostname = :hostname
"""

# Live jobs whose worker heartbeats but whose progress has not moved for stall_after_s.
STALLED_JOBS = """
SELECT * FROM jobs
WHERE status IN ('claimed', 'running') AND stall_after_s > 0
  AND heartbeat_at >= :now - :stale_after_s
  AND max(coalesce(progress_at, claimed_at), :since) < :now - stall_after_s
ORDER BY job_id
"""

STALE_JOBS = """
SELECT job_id FROM jobs
WHERE status IN ('claimed', 'running') AND max(heartbeat_at, :since) < :cutoff
"""

# The other hosts where this job's attempts since its last requeue ended as an ordinary
# trainer error with the same signature.
SAME_SIGNATURE_HOSTS = """
SELECT DISTINCT hostname FROM attempts
WHERE job_id = :job_id AND signature = :signature AND cause = 'trainer_error'
  AND hostname != :hostname
  AND attempt > coalesce((SELECT max(attempt) FROM events
                          WHERE job_id = :job_id AND kind = 'requeued'), 0)
ORDER BY hostname
"""
RECORD_PEAK = """
UPDATE attempts SET peak_vram_gib = max(coalesce(peak_vram_gib, 0), ?)
WHERE job_id = ? AND attempt = ?
"""
RECORD_DIAGNOSIS = """
UPDATE attempts SET cause = :cause, signature = :signature,
       peak_vram_gib = coalesce(:peak, peak_vram_gib)
WHERE job_id = :job_id AND attempt = :attempt
"""

# Unschedulable jobs this slot can run (the hard constraints of CLAIM_CANDIDATES).
RESTORE_FOR_SLOT = """
UPDATE jobs SET status = 'pending', error = NULL, updated_at = :now
WHERE status = 'unschedulable' AND orphaned = 0
  AND (require_cuda = 0 OR :cuda = 1)
  AND gpus <= :gpus
  AND max(min_vram_gib, raised_vram_gib) <= :vram
  AND max(min_ram_gib, raised_ram_gib) <= :ram
  AND (allowed_hosts = '[]'
       OR EXISTS (SELECT 1 FROM json_each(jobs.allowed_hosts) WHERE value = :hostname))
  AND (:allow IS NULL OR model IN (SELECT value FROM json_each(:allow)))
  AND model NOT IN (SELECT value FROM json_each(:deny))
RETURNING job_id
"""

# A host's latest ended attempts since its last quarantine or release, newest first.
HOST_RECENT_ATTEMPTS = """
SELECT job_id, cause, signature FROM attempts
WHERE hostname = :hostname AND ended_at IS NOT NULL AND ended_at > :since
ORDER BY ended_at DESC, attempt DESC LIMIT :k
"""
# Whether one of these signatures failed as an ordinary trainer error on another host too.
SIGNATURE_ELSEWHERE = """
SELECT EXISTS (SELECT 1 FROM attempts
               WHERE hostname != :hostname AND cause = 'trainer_error'
                 AND signature IN (SELECT value FROM json_each(:signatures)))
"""
QUARANTINE_HOST = """
INSERT INTO hosts (hostname, quarantined_until, quarantine_reason, quarantines, counts_since)
VALUES (:hostname, :until, :reason, 1, :now)
ON CONFLICT (hostname) DO UPDATE SET
    quarantined_until = excluded.quarantined_until,
    quarantine_reason = excluded.quarantine_reason,
    quarantines = hosts.quarantines + 1, counts_since = excluded.counts_since
"""
# A job reference: the best job of that name, and up to 11 ids starting with it.
RESOLVE = """
SELECT job_id, 1 AS by_name FROM (
    SELECT job_id FROM jobs WHERE name = :name ORDER BY orphaned, manifest_index LIMIT 1)
UNION ALL
SELECT job_id, 0 FROM (
    SELECT job_id FROM jobs WHERE :low IS NOT NULL AND job_id >= :low AND job_id < :high
    LIMIT 11)
"""

# Before a claim, in one statement: is the host quarantined; is any job unschedulable (if
# none, RESTORE_FOR_SLOT has nothing to do)?
CLAIM_GATE = """
SELECT EXISTS (SELECT 1 FROM hosts WHERE hostname = :hostname AND quarantined_until > :now)
           AS quarantined,
       EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_unschedulable WHERE status = 'unschedulable')
           AS unschedulable
"""
QUARANTINED = """
SELECT * FROM hosts WHERE hostname = :hostname AND quarantined_until > :now
"""

# Waiting jobs grouped by their hard constraints: schedulability is decided per group.
NEEDS_GROUPS = """
SELECT DISTINCT model, require_cuda, min_vram_gib, min_ram_gib, raised_vram_gib,
       raised_ram_gib, allowed_hosts, gpus
FROM jobs WHERE status IN ('pending', 'unschedulable') AND orphaned = 0
"""
# Move one group's jobs from :old to :new status (a NULL :error makes them pending again).
SET_SCHEDULABILITY = """
UPDATE jobs SET status = :new, error = :error, updated_at = :now
WHERE status = :old AND orphaned = 0 AND (:old != :new OR error IS NOT :error)
  AND model = :model AND require_cuda = :require_cuda
  AND min_vram_gib = :min_vram_gib AND min_ram_gib = :min_ram_gib
  AND raised_vram_gib = :raised_vram_gib AND raised_ram_gib = :raised_ram_gib
  AND allowed_hosts = :allowed_hosts AND gpus = :gpus
RETURNING job_id
"""

# Waiting jobs whose budget a reload lowered below what they already used.
SPENT_PENDING_JOBS = """
SELECT * FROM jobs
WHERE status IN ('pending', 'unschedulable')
  AND (attempts_charged >= max_attempts OR lost_count >= max_lost)
"""

# Fields whose change on reload counts as "updated" (while the job is pending).
MUTABLE_FIELDS = (
    "name", "priority", "require_cuda", "prefer_cuda", "min_vram_gib", "min_ram_gib",
    "allowed_hosts", "max_attempts", "max_lost", "timeout_s", "prefer_wait_s", "stall_after_s",
    "checkpoint_interval_s", "gpus",
)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _spec_row(spec: JobSpec) -> dict[str, Any]:
    return {
        "job_id": spec.job_id,
        "name": spec.name,
        "model": spec.model,
        "mode": spec.mode,
        "hyper": _dumps(dict(spec.hyper)),
        "split_recipe": spec.split_recipe,
        "train_hosts": _dumps(list(spec.train_hosts)),
        "seed": spec.seed,
        "priority": spec.priority,
        "require_cuda": int(spec.require_cuda),
        "prefer_cuda": int(spec.prefer_cuda),
        "min_vram_gib": spec.min_vram_gib,
        "min_ram_gib": spec.min_ram_gib,
        "allowed_hosts": _dumps(list(spec.allowed_hosts)),
        "max_attempts": spec.max_attempts,
        "max_lost": spec.max_lost,
        "timeout_s": spec.timeout_s,
        "prefer_wait_s": spec.prefer_wait_s,
        "stall_after_s": spec.stall_after_s,
        "checkpoint_interval_s": spec.checkpoint_interval_s,
        "gpus": spec.gpus,
        "manifest_index": spec.manifest_index,
    }


def _slot_params(slot: matching.Slot) -> dict[str, Any]:
    """A slot as the parameters of the claim's hard constraints."""
    allow = slot.policy.allow
    return {
        "cuda": int(slot.cuda), "vram": slot.best_vram, "ram": slot.capability.ram_gib,
        "hostname": slot.hostname, "gpus": slot.gpus,
        "free": None if slot.free_vram is None else _dumps(list(slot.free_vram)),
        "allow": None if allow is None else _dumps(sorted(allow)),
        "deny": _dumps(sorted(slot.policy.deny)),
    }


def _class_open(slot: matching.Slot, job_class: str) -> bool:
    """Whether the slot passes a class's share of the hard constraints: exactly the
    require_cuda, host policy and allowed_hosts terms of CLAIM_CANDIDATES."""
    model, require_cuda, _, allowed_hosts = json.loads(job_class)
    if require_cuda and not slot.cuda:
        return False
    if not slot.policy.allows(model):
        return False
    return bool(allowed_hosts == "[]" or slot.hostname in json.loads(allowed_hosts))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _token(row: sqlite3.Row) -> TokenInfo:
    return TokenInfo(
        token_hash=row["token_hash"], hostname=row["hostname"], kind=TokenKind(row["kind"]),
        created_at=row["created_at"], expires_at=row["expires_at"], used_at=row["used_at"],
        last_used_at=row["last_used_at"], revoked_at=row["revoked_at"],
    )


def _job(row: sqlite3.Row) -> Job:
    # On every claim, heartbeat and completion: zip is faster than dict(row), and the
    # usual '[]' of a list column needs no JSON parser (job_from_row makes lists tuples).
    fields = dict(zip(row.keys(), row, strict=True))
    for name in JSON_COLUMNS:
        text = fields[name]
        if text is not None:
            fields[name] = () if text == "[]" and name in TUPLE_JSON else json.loads(text)
    return job_from_row(fields)


class SqliteQueue:
    """JobQueue on one SQLite file. Thread-safe: one connection behind a lock."""

    backend = "sqlite"
    database_clock = False

    def __init__(
        self, path: str | Path, *, stale_after_s: float = 600.0, synchronous: str = "FULL",
        failure_aware: bool = True,
    ) -> None:
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        #: False: a failure only uses up an attempt (no raised needs, avoided hosts, code-bug
        #: verdict or quarantine): the naive baseline bench/simulate.py compares against.
        self.failure_aware = failure_aware
        self._lock = threading.RLock()
        # Worker registrations written by this process, and when each worker's last_seen
        # was: a worker's claims and heartbeats skip rewriting an unchanged row for a moment.
        self._registered: dict[str, tuple[Capability, matching.Policy, float]] = {}
        self._seen: dict[str, float] = {}
        self._seen_every_s = seen_every_s(stale_after_s)
        self._group: group_commit.Group | None = None  #: the open group commit, if any
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=60.0
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode = WAL")
        self._synchronous = synchronous.upper()
        self._db.execute(f"PRAGMA synchronous = {self._synchronous}")
        self._db.execute("PRAGMA busy_timeout = 60000")
        self._migrate()
        self._hosts: dict[str, HostSpec] = self._load_hosts()

    # -- plumbing ---------------------------------------------------------

    def clock(self) -> float:
        """This process's clock: SQLite has none of its own."""
        return time.time()

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock up front.

        `durable=False` commits without an fsync (synchronous=NORMAL, for heartbeats): a
        power cut may lose it, a process crash may not, and the next durable commit
        syncs it anyway. Inside `grouped()` every write opens or joins the loop's group
        instead (group_commit.py), a heartbeat too: a share of the group's fsync cost less
        than a commit of its own (bench/README.md, group commit); anywhere else an open
        group is committed first.
        """
        joining = group_commit.member()
        with self._lock:
            if joining is not None:
                with self._joined(joining) as db:
                    yield db
                return
            self._commit_group()
            if not durable and self._synchronous != "NORMAL":
                self._db.execute("PRAGMA synchronous = NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:  # a full disk may have rolled it back already
                        self._db.execute("ROLLBACK")
                    self._forget()
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable and self._synchronous != "NORMAL":
                    self._db.execute(f"PRAGMA synchronous = {self._synchronous}")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads: they see an open group's writes, so a grouped request
        waits for that group's COMMIT before it answers, and any other caller commits the
        group first. No answer rests on a write that may not become durable."""
        joining = group_commit.member()
        with self._lock:
            group = self._group
            if group is not None:
                if joining is None:
                    self._commit_group()
                else:
                    joining.wait_for(group)
            yield self._db

    @contextmanager
    def _joined(self, joining: group_commit.Member) -> Iterator[sqlite3.Connection]:
        """This write as a savepoint in the open group, which commits (with an fsync, at
        synchronous=FULL) once a turn of the loop adds no write to it."""
        group = self._group
        if group is None:
            self._db.execute("BEGIN IMMEDIATE")
            group = self._group = group_commit.Group.open(joining)
            joining.loop.call_soon(self._commit_when_quiet, group, 0, 0)
        joining.wait_for(group)
        group.writes += 1
        self._db.execute("SAVEPOINT write")
        try:
            yield self._db
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK TO write")
                self._db.execute("RELEASE write")
            else:  # SQLite rolled the whole group back (a full disk, an I/O error)
                self._group = None
                group.settle(exc)
            self._forget()
            raise
        self._db.execute("RELEASE write")

    def _commit_when_quiet(self, group: group_commit.Group, seen: int, turns: int) -> None:
        """Commit `group` at the first turn of the loop in which no write joined it."""
        if group is not self._group:
            return
        if group.writes > seen and turns < group_commit.MAX_TURNS:
            group.loop.call_soon(self._commit_when_quiet, group, group.writes, turns + 1)
            return
        self._commit_group(group)

    def _commit_group(self, group: group_commit.Group | None = None) -> None:
        """Commit the open group (only `group`, when given: it may be long gone) and tell
        its members; a failed COMMIT fails them all and forgets what the group wrote."""
        with self._lock:
            if self._group is None or (group is not None and self._group is not group):
                return
            group, self._group = self._group, None
            error: BaseException | None = None
            try:
                self._db.execute("COMMIT")
            except BaseException as exc:
                error = exc
                self._forget()
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the COMMIT's error is the one to tell
            finally:
                group.settle(error)  # whatever happened, nobody is left waiting

    def _forget(self) -> None:
        """After a rollback: what the caches remember may not have been written."""
        self._registered.clear()
        self._seen.clear()

    def _migrate(self) -> None:
        schema = resources.files("trainfleet.queue").joinpath("sqlite.sql").read_text()
        with self._lock:
            self._db.executescript(schema)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row["value"]) > SCHEMA_VERSION:
                raise TrainfleetError(
                    f"{self.path}: schema version {row['value']} is newer than this release "
                    f"reads ({SCHEMA_VERSION}); upgrade trainfleet"
                )
            else:
                self._upgrade(int(row["value"]))

    def _upgrade(self, version: int) -> None:
        """Bring an older schema up to date, one step per transaction."""
        for step in range(version + 1, SCHEMA_VERSION + 1):
            self._db.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[step]} UPDATE meta SET value = '{step}' "
                "WHERE key = 'schema_version'; COMMIT;"
            )

    def _load_hosts(self) -> dict[str, HostSpec]:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'hosts'").fetchone()
        if row is None:
            return {}
        return {
            name: HostSpec(name, None if h["allow"] is None else tuple(h["allow"]),
                           tuple(h["deny"]))
            for name, h in json.loads(row["value"]).items()
        }

    def _row(self, db: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return cast(sqlite3.Row, row)

    def _event(
        self,
        db: sqlite3.Connection,
        job_id: str,
        kind: str,
        now: float,
        attempt: int | None = None,
        worker_id: str | None = None,
        **detail: Any,
    ) -> None:
        db.execute(
            "INSERT INTO events (job_id, at, kind, attempt, worker_id, detail) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, now, kind, attempt, worker_id, _dumps(detail) if detail else "{}"),
        )

    def _live_row(
        self, db: sqlite3.Connection, job_id: str, lease: str, now: float | None = None,
        row: sqlite3.Row | None = None,
    ) -> sqlite3.Row:
        """The job's row if `lease` is its current live lease; LeaseLost otherwise.

        In a write transaction (`now` given), a worker that comes back after its job was
        swept gets the job back under a new attempt, if nobody has claimed it since.
        `row`: the job's row, when the caller has just read it in this transaction.
        """
        row = self._row(db, job_id) if row is None else row
        if row["lease"] is not None and same_lease(row["lease"], lease):
            if row["status"] not in LIVE:
                raise LeaseLost(job_id, f"job is {row['status']}")
            return row
        if now is not None and self._revive(db, row, lease, now):
            return self._row(db, job_id)
        raise LeaseLost(job_id)

    def _revive(self, db: sqlite3.Connection, row: sqlite3.Row, lease: str, now: float) -> bool:
        """Hand a swept, still unclaimed job back to the worker whose lease was swept."""
        if row["status"] != Status.PENDING or row["orphaned"]:
            return False
        last = db.execute(
            "SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt DESC LIMIT 1",
            (row["job_id"],),
        ).fetchone()
        if (last is None or last["outcome"] != FailureKind.LOST_WORKER
                or not same_lease(last["lease"], lease)):
            return False
        attempt = row["attempts"] + 1
        db.execute(
            "UPDATE jobs SET status = 'running', lease = ?, attempts = ?, "
            "lost_count = max(lost_count - 1, 0), worker_id = ?, hostname = ?, error = NULL, "
            "claimed_at = ?, heartbeat_at = ?, progress_at = ?, updated_at = ? WHERE job_id = ?",
            (lease, attempt, last["worker_id"], last["hostname"], now, now, now, now,
             row["job_id"]),
        )
        db.execute(
            "INSERT INTO attempts (job_id, attempt, worker_id, hostname, lease, started_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (row["job_id"], attempt, last["worker_id"], last["hostname"], lease, now),
        )
        self._event(db, row["job_id"], "reclaimed", now, attempt, last["worker_id"],
                    note=f"worker came back after attempt {last['attempt']} was swept")
        return True

    def _fail_spent(self, db: sqlite3.Connection, row: sqlite3.Row, now: float) -> None:
        """Fail a waiting job whose lowered budget it has already used: claiming it again
        would run an attempt past max_attempts (or max_lost)."""
        error = (f"out of attempts: the manifest lowered the budget to max_attempts "
                 f"{row['max_attempts']} and max_lost {row['max_lost']}; the job had "
                 f"{row['attempts_charged']} charged and {row['lost_count']} lost")
        db.execute("UPDATE jobs SET status = 'failed', error = ?, updated_at = ? "
                   "WHERE job_id = ?", (error, now, row["job_id"]))
        self._event(db, row["job_id"], "failed", now, row["attempts"], outcome="budget",
                    error=error, retry=False)

    def _end_attempt(
        self, db: sqlite3.Connection, row: sqlite3.Row, outcome: str, error: str | None,
        now: float,
    ) -> None:
        db.execute(
            "UPDATE attempts SET ended_at = ?, outcome = ?, error = ? "
            "WHERE job_id = ? AND attempt = ? AND ended_at IS NULL",
            (now, outcome, error, row["job_id"], row["attempts"]),
        )

    # -- manifest ---------------------------------------------------------

    def sync_manifest(self, manifest: Manifest, now: float | None = None) -> SyncResult:
        """Idempotent reload: new ids are added, pending ones follow the manifest,
        others keep their state, and ids no longer listed are marked orphaned."""
        now = time.time() if now is None else now
        wanted = {spec.job_id: _spec_row(spec) for spec in manifest.jobs}
        hosts = {
            name: {"allow": None if h.allow_jobs is None else list(h.allow_jobs),
                   "deny": list(h.deny_jobs)}
            for name, h in manifest.hosts.items()
        }
        added = updated = unchanged = 0
        with self._write() as db:
            existing = {
                row["job_id"]: row
                for row in db.execute(
                    f"SELECT job_id, status, orphaned, manifest_index, {', '.join(MUTABLE_FIELDS)}"
                    " FROM jobs"
                )
            }
            inserts, pending_updates, place_updates = [], [], []
            for job_id, row in wanted.items():
                old = existing.get(job_id)
                if old is None:
                    inserts.append({**row, "now": now})
                    added += 1
                elif old["status"] in (Status.PENDING, Status.UNSCHEDULABLE) and (
                    old["orphaned"] or any(old[f] != row[f] for f in MUTABLE_FIELDS)
                ):
                    pending_updates.append({**row, "now": now})
                    updated += 1
                else:
                    place_updates.append(
                        {"job_id": job_id, "manifest_index": row["manifest_index"]}
                    )
                    if old["orphaned"]:
                        updated += 1
                    else:
                        unchanged += 1
            db.executemany(INSERT_JOB, inserts)
            db.executemany(UPDATE_PLACE, place_updates)
            db.executemany(UPDATE_PENDING_JOB, pending_updates)
            for spent in db.execute(SPENT_PENDING_JOBS).fetchall():
                self._fail_spent(db, spent, now)
            db.executemany(
                "INSERT INTO events (job_id, at, kind, detail) VALUES (?, ?, 'added', '{}')",
                [(r["job_id"], now) for r in inserts],
            )
            gone = [(job_id,) for job_id in existing if job_id not in wanted]
            db.executemany("UPDATE jobs SET orphaned = 1 WHERE job_id = ? AND orphaned = 0", gone)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('hosts', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (_dumps(hosts),),
            )
            self._reschedule(db, now)
        self._hosts = dict(manifest.hosts)
        return SyncResult(added, updated, unchanged, len(gone))

    def reschedule(self, now: float | None = None) -> Rescheduled:
        """Mark waiting jobs no worker ever seen can run unschedulable, and back again."""
        now = time.time() if now is None else now
        with self._write() as db:
            return self._reschedule(db, now)

    def _reschedule(self, db: sqlite3.Connection, now: float) -> Rescheduled:
        seen = [w.slot(quarantine=False) for w in self._workers(db, now)]
        marked: list[str] = []
        restored: list[str] = []
        for group in db.execute(NEEDS_GROUPS).fetchall():
            needs = JobNeeds(group["model"], bool(group["require_cuda"]), group["min_vram_gib"],
                             group["min_ram_gib"], group["raised_vram_gib"],
                             group["raised_ram_gib"], tuple(json.loads(group["allowed_hosts"])),
                             group["gpus"])
            reason = matching.unschedulable_reason(needs, seen)
            params = {**dict(group), "error": reason, "now": now}
            if reason is None:
                restored += self._move(db, params, Status.UNSCHEDULABLE, Status.PENDING)
            else:
                moved = self._move(db, params, Status.PENDING, Status.UNSCHEDULABLE)
                for job_id in moved:
                    self._event(db, job_id, "unschedulable", now, reason=reason)
                marked += moved
                self._move(db, params, Status.UNSCHEDULABLE, Status.UNSCHEDULABLE)  # new reason
        for job_id in restored:
            self._event(db, job_id, "schedulable", now)
        return Rescheduled(tuple(marked), tuple(restored))

    def _move(
        self, db: sqlite3.Connection, params: dict[str, Any], old: Status, new: Status
    ) -> list[str]:
        rows = db.execute(SET_SCHEDULABILITY, {**params, "old": old.value, "new": new.value})
        return [r["job_id"] for r in rows.fetchall()]

    # -- the worker's calls -----------------------------------------------

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
    ) -> Claim | None:
        """Atomically hand the best eligible pending job to this slot, or None.

        `free_vram_per_gpu` is the free memory of each GPU of its host the slot can hand one
        job now (older workers: `gpus_free` GPUs with `free_vram_gib`); see matching.offered.
        The registry keeps the slot's total, which is what the fleet's other rules go by.
        With `host_gpus` above the GPUs offered, matching.held_for may hold the claim back."""
        now = time.time() if now is None else now
        vram = capability.max_vram_gib if slot_vram_gib is None else slot_vram_gib
        policy = matching.merge_policy(self._hosts.get(capability.hostname), own_allow, own_deny)
        if free_vram_per_gpu is not None:
            gpus_free = len(free_vram_per_gpu)
        slot = matching.Slot(capability, vram, policy, gpus_free=gpus_free)
        with self._write() as db:
            self._register(db, worker_id, slot, now)
            gate = db.execute(CLAIM_GATE, {"hostname": slot.hostname, "now": now}).fetchone()
            if gate["quarantined"]:
                return None
            for restored in db.execute(RESTORE_FOR_SLOT, {**_slot_params(slot), "now": now}
                                       ).fetchall() if gate["unschedulable"] else ():
                self._event(db, restored["job_id"], "schedulable", now, worker_id=worker_id)
            free = matching.offered(slot, free_vram_gib, free_vram_per_gpu)
            job = self._pick(db, free, now)
            if job is None:
                return None
            if host_gpus is not None and matching.reserves(free, host_gpus):
                wide = self._pick(db, matching.whole_host(slot, host_gpus), now)
                if matching.held_for(job, wide, free):
                    return None
            lease = secrets.token_hex(16)
            marked = db.execute(
                MARK_CLAIMED,
                {"lease": lease, "worker_id": worker_id, "hostname": capability.hostname,
                 "now": now, "job_id": job.job_id},
            )
            if marked.rowcount != 1:  # cannot happen: the pick was read in this transaction
                raise TrainfleetError(f"{job.job_id}: no longer pending while being claimed")
            attempt = job.attempts + 1
            db.execute(
                "INSERT INTO attempts (job_id, attempt, worker_id, hostname, lease, started_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job.job_id, attempt, worker_id, capability.hostname, lease, now),
            )
            self._event(db, job.job_id, "claimed", now, attempt, worker_id,
                        hostname=capability.hostname)
        # The picked job as MARK_CLAIMED left its row (a test holds the two equal): no
        # second read and decode of the row.
        claimed = dataclasses.replace(
            job, status=Status.CLAIMED, attempts=attempt, worker_id=worker_id,
            hostname=capability.hostname, progress=None, heartbeat_at=now, progress_at=now,
            updated_at=now)
        return Claim(claimed, lease, attempt)

    def _register(
        self, db: sqlite3.Connection, worker_id: str, slot: matching.Slot, now: float
    ) -> None:
        registration = (slot.capability, slot.policy, slot.vram_gib)
        if self._registered.get(worker_id) == registration and not self._seen_due(worker_id, now):
            return  # unchanged, and seen a moment ago
        self._registered[worker_id] = registration
        self._seen[worker_id] = now
        allow = slot.policy.allow
        db.execute(
            UPSERT_WORKER,
            {"worker_id": worker_id, "hostname": slot.hostname,
             "capability": _dumps(slot.capability.to_dict()),
             "allow": None if allow is None else _dumps(sorted(allow)),
             "deny": _dumps(sorted(slot.policy.deny)), "vram": slot.vram_gib, "now": now},
        )

    def _pick(self, db: sqlite3.Connection, slot: matching.Slot, now: float) -> Job | None:
        """Walk candidates in rank order; the first that matching accepts wins."""
        params = _slot_params(slot)
        live: list[matching.Slot] | None = None
        for row in self._candidates(db, slot, params):
            job = _job(row)
            soft = (job.prefer_cuda and not slot.cuda) or slot.hostname in job.avoid_hosts
            if soft and live is None:  # only the soft rules look at the rest of the fleet
                live = self._live_slots(db, now)
            if matching.is_eligible(job, slot, live or (), now - job.pending_since):
                return job
        return None

    def _candidates(
        self, db: sqlite3.Connection, slot: matching.Slot, params: dict[str, Any]
    ) -> Iterator[sqlite3.Row]:
        """Pending jobs that pass the SQL hard constraints, in the slot's rank order.

        Jobs of a class the slot may not run (CUDA only, other hosts, a model its policy
        refuses) are never read: each open class is walked from its own index range and
        the walks are merged, so the cost follows the number of classes, not how many
        ineligible jobs rank ahead. With too many classes, the two prefer_cuda runs of the rank
        index, merged.
        """
        found = [job_class for (job_class,) in db.execute(CLASSES)]
        if len(found) > MAX_CLASSES:
            walks = [db.execute(RANK_CANDIDATES, {**params, "prefer_cuda": p})
                     for p in (1, 0)]
        else:
            classes = [job_class for job_class in found if _class_open(slot, job_class)]
            walks = [db.execute(CLASS_CANDIDATES, {**params, "job_class": c}) for c in classes]
        if len(walks) == 1:
            return iter(walks[0])
        if slot.cuda:
            return heapq.merge(*walks, key=lambda r: (-r["priority"], -r["prefer_cuda"],
                                                      r["manifest_index"]))
        return heapq.merge(*walks, key=lambda r: (-r["priority"], r["manifest_index"]))

    def _seen_due(self, worker_id: str, now: float) -> bool:
        """Whether the worker's last_seen is due a write (and noted as written): the claim
        and heartbeat hot paths rewrite it at most every `_seen_every_s`, not on every call."""
        last = self._seen.get(worker_id)
        if last is not None and 0.0 <= now - last < self._seen_every_s:
            return False
        self._seen[worker_id] = now
        return True

    def _live_slots(self, db: sqlite3.Connection, now: float) -> list[matching.Slot]:
        return [w.slot() for w in self._workers(db, now) if w.alive]

    def record_checkpoint(
        self,
        job_id: str,
        lease: str,
        artifact_id: str,
        now: float | None = None,
        *,
        progress: Mapping[str, Any] | None = None,
    ) -> Job:
        """Make `artifact_id` the job's last checkpoint, which its next attempt resumes from."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = self._live_row(db, job_id, lease, now)
            db.execute(
                "UPDATE jobs SET checkpoint_id = ?, checkpoint_at = ?, updated_at = ? "
                "WHERE job_id = ?", (artifact_id, now, now, job_id))
            self._event(db, job_id, "checkpoint", now, row["attempts"], row["worker_id"],
                        artifact_id=artifact_id, **checkpoint_detail(progress))
            return _job(self._row(db, job_id))

    def artifacts_in_use(self) -> set[str]:
        """Every job's artifact and the checkpoints of jobs not completed: never pruned."""
        with self._read():
            rows = self._db.execute(
                "SELECT artifact_id AS id FROM jobs WHERE artifact_id IS NOT NULL "
                "UNION SELECT checkpoint_id FROM jobs "
                "WHERE checkpoint_id IS NOT NULL AND status <> 'completed'").fetchall()
        return {str(row["id"]) for row in rows}

    def check_lease(self, job_id: str, lease: str, now: float | None = None) -> Job:
        """The job, if `lease` is its current live lease (or revivable); LeaseLost otherwise."""
        now = time.time() if now is None else now
        with self._write() as db:
            return _job(self._live_row(db, job_id, lease, now))

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
    ) -> str:
        """Record liveness and progress (and the attempt's peak VRAM); "cancel" when an
        operator cancelled the job. The `lent_slots` of its host are seen and lent to it."""
        now = time.time() if now is None else now
        with self._write(durable=False) as db:
            row = self._row(db, job_id)
            if row["lease"] is not None and same_lease(row["lease"], lease):
                if row["status"] == Status.CANCELLED:
                    return "cancel"
            row = self._live_row(db, job_id, lease, now, row)
            moved = progress_moved(_loads(row["progress"]), progress)
            db.execute(
                "UPDATE jobs SET status = 'running', heartbeat_at = ?, updated_at = ?, "
                "progress = coalesce(?, progress), log_tail = coalesce(?, log_tail), "
                "progress_at = CASE WHEN ? THEN ? ELSE progress_at END WHERE job_id = ?",
                (now, now, None if progress is None else _dumps(dict(progress)), log_tail,
                 moved, now, job_id),
            )
            if self._seen_due(row["worker_id"], now):
                db.execute(
                    "UPDATE workers SET last_seen = ? WHERE worker_id = ?", (now, row["worker_id"])
                )
            if lent_slots:
                db.execute(MARK_LENT, {"now": now, "job_id": job_id,
                                       "lent": _dumps(list(lent_slots)),
                                       "hostname": row["hostname"],
                                       "worker_id": row["worker_id"]})
                for worker_id in lent_slots:  # its next claim rewrites its row, lent_to_job too
                    self._seen.pop(worker_id, None)
            if peak_vram_gib is not None:
                db.execute(RECORD_PEAK, (peak_vram_gib, job_id, row["attempts"]))
            if row["status"] == Status.CLAIMED:
                self._event(db, job_id, "started", now, row["attempts"], row["worker_id"])
        return "continue"

    def complete(
        self,
        job_id: str,
        lease: str,
        artifact_id: str,
        metrics: Mapping[str, Any] | None = None,
        now: float | None = None,
        *,
        peak_vram_gib: float | None = None,
    ) -> Job:
        """Accept the job's result once; a repeat with the same lease and artifact is a no-op.
        `peak_vram_gib` is the trainer's peak, kept on the attempt like a heartbeat's."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = self._row(db, job_id)
            if (
                row["status"] == Status.COMPLETED
                and row["lease"] is not None
                and same_lease(row["lease"], lease)
                and row["artifact_id"] == artifact_id
            ):
                return _job(row)
            row = self._live_row(db, job_id, lease, now, row)
            done = db.execute(
                "UPDATE jobs SET status = 'completed', artifact_id = ?, metrics = ?, "
                # 100 %; the last heartbeat's message ("epoch 26/30") is stale now
                "progress = json_remove(json_set(coalesce(progress, '{}'), '$.fraction', 1.0),"
                " '$.message'), error = NULL,"
                " heartbeat_at = ?, updated_at = ? WHERE job_id = ? RETURNING *",
                (artifact_id, _dumps(dict(metrics or {})), now, now, job_id),
            ).fetchone()
            self._end_attempt(db, row, "completed", None, now)
            if peak_vram_gib is not None:
                db.execute(RECORD_PEAK, (peak_vram_gib, job_id, row["attempts"]))
            self._event(db, job_id, "completed", now, row["attempts"], row["worker_id"],
                        artifact_id=artifact_id)
            return _job(done)

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
    ) -> Job:
        """End this attempt; the job goes back to pending while attempts remain.

        A trainer's own failure (error or timeout) is charged, makes the next attempt avoid
        this host, raises the job's memory needs after an out-of-memory, and fails the job
        at once when another host already failed with the same error (retry.after_failure).
        """
        now = time.time() if now is None else now
        with self._write() as db:
            row = self._live_row(db, job_id, lease, now)
            self._fail_attempt(db, row, error, retryable, kind, now, cause, signature,
                               peak_vram_gib)
            return _job(self._row(db, job_id))

    def _fail_attempt(
        self, db: sqlite3.Connection, row: sqlite3.Row, error: str, retryable: bool,
        kind: FailureKind, now: float, cause: Cause | None = None,
        signature: str | None = None, peak_vram_gib: float | None = None,
    ) -> None:
        """End the live attempt of `row` as failed, and learn from it (see fail)."""
        job_id = row["job_id"]
        db.execute(RECORD_DIAGNOSIS, {
            "cause": None if cause is None else cause.value, "signature": signature,
            "peak": peak_vram_gib, "job_id": job_id, "attempt": row["attempts"]})
        charged = row["attempts_charged"]
        if kind in CHARGED:
            charged += 1  # a stopped worker is not the training's fault
        if kind in CHARGED and self.failure_aware:
            failure = self._failure(db, row, cause, signature, peak_vram_gib)
            verdict = retry_policy.after_failure(
                failure, row["raised_vram_gib"], row["raised_ram_gib"],
                tuple(json.loads(row["avoid_hosts"])), self._same_signature(db, failure, row))
            db.execute(
                "UPDATE jobs SET raised_vram_gib = ?, raised_ram_gib = ?, avoid_hosts = ? "
                "WHERE job_id = ?",
                (verdict.raised_vram_gib, verdict.raised_ram_gib,
                 _dumps(list(verdict.avoid_hosts)), job_id))
            if verdict.code_bug:
                retryable, error = False, f"{error}\n{verdict.code_bug}"  # shown: last line
        retry = retryable and charged < row["max_attempts"]
        self._finish(db, row, retry, kind.value, error, charged, row["lost_count"], now)
        if cause is not None and self.failure_aware:
            self._maybe_quarantine(db, row["hostname"], now)

    def _maybe_quarantine(self, db: sqlite3.Connection, hostname: str, now: float) -> None:
        """Quarantine the host when its latest attempts failed alike on different jobs."""
        host = db.execute("SELECT * FROM hosts WHERE hostname = ?", (hostname,)).fetchone()
        recent = [retry_policy.HostAttempt(r["job_id"], r["cause"], r["signature"])
                  for r in db.execute(HOST_RECENT_ATTEMPTS, {
                      "hostname": hostname, "since": host["counts_since"] if host else -1.0,
                      "k": retry_policy.QUARANTINE_AFTER})]
        signatures = [a.signature for a in recent if a.signature]
        elsewhere = bool(signatures) and bool(db.execute(SIGNATURE_ELSEWHERE, {
            "hostname": hostname, "signatures": _dumps(signatures)}).fetchone()[0])
        reason = retry_policy.quarantine_reason(recent, elsewhere)
        if reason is None:
            return
        until = now + retry_policy.cool_off_s(host["quarantines"] if host else 0)
        db.execute(QUARANTINE_HOST, {"hostname": hostname, "until": until, "reason": reason,
                                     "now": now})

    def release_host(self, hostname: str, now: float | None = None) -> HostRelease:
        """Lift a host's quarantine; its earlier attempts no longer count towards another."""
        now = time.time() if now is None else now
        with self._write() as db:
            host = db.execute(QUARANTINED, {"hostname": hostname, "now": now}).fetchone()
            if host is None:
                raise NotFound(f"host {hostname!r} is not quarantined",
                               detail={"hostname": hostname})
            db.execute("UPDATE hosts SET quarantined_until = NULL, counts_since = ? "
                       "WHERE hostname = ?", (now, hostname))
        return HostRelease(hostname, host["quarantined_until"], host["quarantine_reason"])

    def _failure(
        self, db: sqlite3.Connection, row: sqlite3.Row, cause: Cause | None,
        signature: str | None, peak_vram_gib: float | None,
    ) -> retry_policy.Failure:
        """The failed attempt with what its slot had, from the worker's last claim."""
        worker = db.execute("SELECT capability, slot_vram_gib FROM workers WHERE worker_id = ?",
                            (row["worker_id"],)).fetchone()
        ram = json.loads(worker["capability"]).get("ram_gib", 0.0) if worker else 0.0
        return retry_policy.Failure(cause, signature, row["hostname"],
                                    worker["slot_vram_gib"] if worker else 0.0, float(ram),
                                    peak_vram_gib)

    def _same_signature(
        self, db: sqlite3.Connection, failure: retry_policy.Failure, row: sqlite3.Row
    ) -> tuple[str, ...]:
        if not failure.signature:
            return ()
        found = db.execute(SAME_SIGNATURE_HOSTS, {
            "job_id": row["job_id"], "signature": failure.signature,
            "hostname": failure.hostname}).fetchall()
        return tuple(r["hostname"] for r in found)

    def _finish(
        self, db: sqlite3.Connection, row: sqlite3.Row, retry: bool, outcome: str,
        error: str, charged: int, lost: int, now: float,
    ) -> None:
        status = Status.PENDING if retry else Status.FAILED
        db.execute(
            "UPDATE jobs SET status = ?, lease = NULL, error = ?, attempts_charged = ?, "
            "lost_count = ?, pending_since = CASE WHEN ? THEN ? ELSE pending_since END, "
            "updated_at = ? WHERE job_id = ?",
            (status.value, error, charged, lost, retry, now, now, row["job_id"]),
        )
        self._end_attempt(db, row, outcome, error, now)
        self._event(db, row["job_id"], "failed", now, row["attempts"], row["worker_id"],
                    outcome=outcome, error=error[-2000:], retry=retry)

    def sweep_stale(self, now: float | None = None, since: float = 0.0) -> list[str]:
        """Requeue (or fail, once out of attempts) live jobs whose worker went silent.

        `since` is the sweeping receiver's start: silence before it never counts.
        """
        now = time.time() if now is None else now
        swept = []
        with self._write() as db:
            params = {"since": since, "cutoff": now - self.stale_after_s}
            for stale in db.execute(STALE_JOBS, params).fetchall():
                swept.append(self._lose(db, self._row(db, stale["job_id"]), now))
        return swept

    def fail_stalled(self, now: float | None = None, since: float = 0.0) -> list[str]:
        """Fail live jobs whose worker heartbeats but whose progress stopped moving."""
        now = time.time() if now is None else now
        with self._write() as db:
            rows = db.execute(STALLED_JOBS, {"now": now, "since": since,
                                             "stale_after_s": self.stale_after_s}).fetchall()
            for row in rows:
                idle_s = now - max(row["progress_at"] or row["claimed_at"], since)
                self._fail_attempt(db, row, stalled_error(row, idle_s), True,
                                   FailureKind.STALLED, now)
        return [row["job_id"] for row in rows]

    def _lose(self, db: sqlite3.Connection, row: sqlite3.Row, now: float, why: str = "") -> str:
        """Requeue (or fail, out of budget) a live job whose worker is gone; its id."""
        lost = row["lost_count"] + 1
        retry = lost < row["max_lost"] and row["attempts_charged"] < row["max_attempts"]
        error = f"lost worker {row['worker_id']}{why}"
        self._finish(db, row, retry, FailureKind.LOST_WORKER.value, error,
                     row["attempts_charged"], lost, now)
        return str(row["job_id"])

    def attempt_lease_matches(self, job_id: str, attempt: int, lease: str) -> bool:
        """Whether `lease` was handed out for that attempt (logs arrive after the attempt ends)."""
        with self._read():
            row = self._db.execute(
                "SELECT lease FROM attempts WHERE job_id = ? AND attempt = ?", (job_id, attempt)
            ).fetchone()
        return row is not None and same_lease(row["lease"], lease)

    def log_tail(self, job_id: str) -> str | None:
        """The log tail of the latest heartbeat."""
        with self._read():
            row = self._row(self._db, job_id)
        return cast(str | None, row["log_tail"])

    # -- the operator's calls ---------------------------------------------

    def cancel(self, job_id: str, now: float | None = None) -> Job:
        """Stop a pending or live job; its worker learns it from the next heartbeat."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = self._row(db, job_id)
            if row["status"] not in (Status.PENDING, Status.UNSCHEDULABLE, *LIVE):
                raise IllegalTransition(job_id, row["status"], "cancel")
            db.execute(
                "UPDATE jobs SET status = 'cancelled', error = 'cancelled by operator', "
                "updated_at = ? WHERE job_id = ?",
                (now, job_id),
            )
            if row["status"] in LIVE:
                self._end_attempt(db, row, "cancelled", "cancelled by operator", now)
            self._event(db, job_id, "cancelled", now, row["attempts"], row["worker_id"])
            return _job(self._row(db, job_id))

    def requeue(self, job_id: str, now: float | None = None) -> Job:
        """Give a failed or cancelled job a fresh set of attempts."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = self._row(db, job_id)
            if row["status"] not in (Status.FAILED, Status.CANCELLED):
                raise IllegalTransition(job_id, row["status"], "requeue")
            db.execute(
                "UPDATE jobs SET status = 'pending', lease = NULL, attempts_charged = 0, "
                "lost_count = 0, error = NULL, progress = NULL, avoid_hosts = '[]', "
                "pending_since = ?, updated_at = ? WHERE job_id = ?",
                (now, now, job_id),
            )
            self._event(db, job_id, "requeued", now, row["attempts"])
            return _job(self._row(db, job_id))

    # -- reads ------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        with self._read():
            return _job(self._row(self._db, job_id))

    def resolve(self, ref: str) -> str:
        """A job id from a name, a full id or a unique id prefix of at least 8 hex digits."""
        low = ref.lower()
        prefix = low if 8 <= len(low) <= 64 and set(low) <= HEX else None
        with self._read():  # names first, then id prefixes: one statement for both
            found = self._db.execute(RESOLVE, {
                "name": ref, "low": prefix, "high": None if prefix is None else prefix + "g"
            }).fetchall()
        named = [r for r in found if r["by_name"]]
        if named:
            return str(named[0]["job_id"])
        if not found:  # `found` holds only id prefix matches now
            raise JobNotFound(low)
        if len(found) > 1:
            raise AmbiguousJobId(low, [r["job_id"] for r in found])
        return str(found[0]["job_id"])

    def list_jobs(
        self, status: str | None = None, model: str | None = None, host: str | None = None
    ) -> list[Job]:
        if status is not None and status not in {s.value for s in Status}:
            raise BadRequest(
                f"status: expected one of {', '.join(s.value for s in Status)}, got {status!r}"
            )
        with self._read():
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE (:status IS NULL OR status = :status) "
                "AND (:model IS NULL OR model = :model) AND (:host IS NULL OR hostname = :host) "
                "ORDER BY orphaned, manifest_index",
                {"status": status, "model": model, "host": host},
            ).fetchall()
        return [_job(row) for row in rows]

    def history(self, job_id: str) -> list[Event]:
        with self._read():
            rows = self._db.execute(
                "SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,)
            ).fetchall()
        return [
            Event(r["job_id"], r["at"], r["kind"], r["attempt"], r["worker_id"],
                  json.loads(r["detail"]))
            for r in rows
        ]

    def attempts(self, job_id: str) -> list[Attempt]:
        with self._read():
            rows = self._db.execute(
                "SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt", (job_id,)
            ).fetchall()
        return [attempt_from_row(r) for r in rows]

    def workers(self, now: float | None = None) -> list[WorkerInfo]:
        now = time.time() if now is None else now
        with self._read():
            return self._workers(self._db, now)

    def _workers(self, db: sqlite3.Connection, now: float) -> list[WorkerInfo]:
        held: dict[str, list[tuple[str, str]]] = {}
        for r in db.execute(
            # INDEXED BY: for ORDER BY job_id the planner would rather walk every job by its id
            "SELECT worker_id, job_id, name FROM jobs INDEXED BY jobs_live "
            "WHERE status IN ('claimed', 'running') ORDER BY job_id"
        ):
            held.setdefault(r["worker_id"], []).append((r["job_id"], r["name"]))
        live = {job_id: name for jobs in held.values() for job_id, name in jobs}
        workers = []
        for r in db.execute(
            "SELECT w.*, h.quarantined_until, h.quarantine_reason FROM workers AS w "
            "LEFT JOIN hosts AS h ON h.hostname = w.hostname AND h.quarantined_until > ? "
            "ORDER BY w.hostname, w.worker_id", (now,)
        ):
            allow = _loads(r["allow_jobs"])
            policy = matching.Policy(
                None if allow is None else frozenset(allow), frozenset(json.loads(r["deny_jobs"]))
            )
            workers.append(WorkerInfo(
                worker_id=r["worker_id"], hostname=r["hostname"],
                capability=Capability.from_dict(json.loads(r["capability"])), policy=policy,
                slot_vram_gib=r["slot_vram_gib"], first_seen=r["first_seen"],
                last_seen=r["last_seen"], alive=r["last_seen"] >= now - self.stale_after_s,
                jobs=tuple(job_id for job_id, _ in held.get(r["worker_id"], ())),
                job_names=tuple(name for _, name in held.get(r["worker_id"], ())),
                quarantined_until=r["quarantined_until"],
                quarantine_reason=r["quarantine_reason"],
                lent_to=live.get(r["lent_to_job"] or ""),
            ))
        return with_host_gpus(workers)

    def counts(self) -> dict[str, int]:
        with self._read():
            rows = self._db.execute("SELECT status, count(*) AS n FROM jobs GROUP BY status")
            found = {r["status"]: r["n"] for r in rows}
        return {s.value: found.get(s.value, 0) for s in Status}

    # -- per-host tokens --------------------------------------------------

    def create_token(
        self,
        hostname: str,
        kind: TokenKind,
        token_hash: str,
        expires_at: float | None = None,
        now: float | None = None,
    ) -> TokenInfo:
        """Store a new token's hash, bound to `hostname`."""
        now = time.time() if now is None else now
        with self._write() as db:
            return self._insert_token(db, hostname, kind, token_hash, expires_at, now)

    def _insert_token(
        self, db: sqlite3.Connection, hostname: str, kind: TokenKind, token_hash: str,
        expires_at: float | None, now: float,
    ) -> TokenInfo:
        db.execute(INSERT_TOKEN, {"token_hash": token_hash, "hostname": hostname,
                                  "kind": kind.value, "now": now, "expires_at": expires_at})
        row = db.execute("SELECT * FROM tokens WHERE token_hash = ?", (token_hash,)).fetchone()
        return _token(row)

    def lookup_token(self, token_hash: str, now: float | None = None) -> TokenInfo | None:
        """The token stored under this hash, if it is active now; None otherwise."""
        now = time.time() if now is None else now
        with self._read():
            row = self._db.execute(
                "SELECT * FROM tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        info = None if row is None else _token(row)
        return info if info is not None and info.active(now) else None

    def touch_token(self, token_hash: str, now: float | None = None) -> None:
        """Record a use of the token (one statement; callers throttle it)."""
        now = time.time() if now is None else now
        with self._write(durable=False):
            self._db.execute(
                "UPDATE tokens SET last_used_at = ? WHERE token_hash = ?", (now, token_hash)
            )

    def has_worker_tokens(self) -> bool:
        """Whether a per-host worker token was ever issued (then worker calls need a token)."""
        with self._read():
            return bool(self._db.execute(ANY_WORKER_TOKEN).fetchone()[0])

    def redeem_enroll_code(
        self, code_hash: str, hostname: str, new_token_hash: str, now: float | None = None
    ) -> TokenInfo:
        """Exchange a one-time code for a worker token of its host, in one transaction."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = db.execute("SELECT * FROM tokens WHERE token_hash = ?", (code_hash,)).fetchone()
            check_enroll_code(None if row is None else _token(row), hostname, now)
            db.execute("UPDATE tokens SET used_at = ? WHERE token_hash = ?", (now, code_hash))
            return self._insert_token(db, hostname, TokenKind.WORKER, new_token_hash, None, now)

    def list_tokens(self) -> list[TokenInfo]:
        """Every token and code ever made, revoked ones included, by host then age."""
        with self._read():
            rows = self._db.execute(
                "SELECT * FROM tokens ORDER BY hostname, created_at, token_hash"
            ).fetchall()
        return [_token(row) for row in rows]

    def revoke_host(self, hostname: str, now: float | None = None) -> RevokeResult:
        """Revoke the host's tokens and codes and sweep its live jobs at once."""
        now = time.time() if now is None else now
        with self._write() as db:
            rows = db.execute("SELECT * FROM tokens WHERE hostname = ?", (hostname,)).fetchall()
            active = [info for info in map(_token, rows) if info.active(now)]
            if not active:
                raise NotFound(f"host {hostname!r} has no active token or enrollment code",
                               detail={"hostname": hostname})
            db.execute(REVOKE_HOST_TOKENS, {"now": now, "hostname": hostname})
            live = db.execute(HOST_LIVE_JOBS, {"hostname": hostname}).fetchall()
            why = f": host {hostname} revoked"
            requeued = tuple(self._lose(db, row, now, why) for row in live)
        return RevokeResult(hostname, len(active), requeued)

    def grouped(self) -> AbstractAsyncContextManager[None]:
        """Let a request's writes share one COMMIT with the others of this turn of the
        event loop; it waits for that COMMIT on the way out (group_commit.py)."""
        return group_commit.grouped()

    def close(self) -> None:
        with self._lock:
            self._commit_group()
            self._db.close()

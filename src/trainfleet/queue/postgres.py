"""The PostgreSQL job queue: several receivers may share one database.

psycopg 3 with a connection pool. The claim is one statement (`FOR UPDATE SKIP LOCKED`), the
stale sweep is one idempotent statement, and every timestamp comes from the database clock
unless a caller (a test) passes `now`. Manifest-wide settings (host policy, trainer command)
live in the database, so a reload through any receiver is seen by all.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager, nullcontext
from importlib import resources
from typing import Any, NamedTuple

import psycopg
from psycopg.abc import Buffer
from psycopg.rows import DictRow, dict_row, tuple_row
from psycopg.types.json import Jsonb, JsonbBinaryLoader
from psycopg_pool import ConnectionPool

from trainfleet import matching
from trainfleet.capability import Capability
from trainfleet.errors import (
    AmbiguousJobId,
    BadRequest,
    DatabaseUnavailable,
    IllegalTransition,
    JobNotFound,
    LeaseLost,
    NotFound,
    TrainfleetError,
)
from trainfleet.failures import Cause
from trainfleet.manifest import HostSpec, JobSpec, Manifest
from trainfleet.queue import retry as retry_policy
from trainfleet.queue.base import (
    CHARGED,
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
#: Upgrade steps: MIGRATIONS[v] is the SQL that takes schema v-1 to v. postgres.sql is
#: always the newest schema, so a fresh database never runs these.
MIGRATIONS: dict[int, str] = {
    2: """
ALTER TABLE jobs ADD COLUMN raised_vram_gib float8 NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN raised_ram_gib float8 NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN avoid_hosts jsonb NOT NULL DEFAULT '[]';
ALTER TABLE attempts ADD COLUMN cause text;
ALTER TABLE attempts ADD COLUMN signature text;
ALTER TABLE attempts ADD COLUMN peak_vram_gib float8;
ALTER TABLE jobs ADD COLUMN stall_after_s float8 NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN progress_at float8;
CREATE INDEX IF NOT EXISTS jobs_unschedulable ON jobs (job_id) WHERE status = 'unschedulable';
CREATE INDEX IF NOT EXISTS attempts_host ON attempts (hostname, ended_at);
-- Per-host scheduling state: a quarantine after repeated failures of one kind.
CREATE TABLE IF NOT EXISTS hosts (
    hostname          text COLLATE "C" PRIMARY KEY,
    quarantined_until float8,                   -- NULL: not quarantined (or released)
    quarantine_reason text,
    quarantines       integer NOT NULL DEFAULT 0,  -- so far: each cool-off doubles
    counts_since      float8 NOT NULL DEFAULT 0 -- attempts that ended earlier no longer count
);
""",
    3: """
ALTER TABLE jobs ADD COLUMN checkpoint_interval_s float8 NOT NULL DEFAULT 300;
ALTER TABLE jobs ADD COLUMN checkpoint_id text;
ALTER TABLE jobs ADD COLUMN checkpoint_at float8;
ALTER TABLE jobs ADD COLUMN gpus integer NOT NULL DEFAULT 0;
UPDATE jobs SET gpus = 1 WHERE require_cuda;
ALTER TABLE workers ADD COLUMN lent_to_job text;
""",
}
HEX = set("0123456789abcdef")
ANALYZE_AFTER_ADDED = 500  #: a reload adding this many jobs refreshes the planner's statistics
# pg_advisory_xact_lock keys: schema changes, and manifest syncs from several receivers.
SCHEMA_LOCK = 0x7472_6169_6E66_0001
SYNC_LOCK = 0x7472_6169_6E66_0002
CLOCK = "coalesce(%(now)s::float8, extract(epoch FROM now())::float8)"

class _Connection(psycopg.Connection[DictRow]):
    """A pooled connection that keeps one RawCursor for the hot statements (_run_raw): a
    cursor made for each call, and its rows made dicts by psycopg, cost 0.04 ms a call."""

    _raw: psycopg.RawCursor[tuple[Any, ...]] | None = None

    def raw(self) -> psycopg.RawCursor[tuple[Any, ...]]:
        if self._raw is None:
            self._raw = psycopg.RawCursor(self, row_factory=tuple_row)
        return self._raw


Conn = _Connection


def _db_clock(sql: str) -> str:
    """`sql` with every %(now)s read as `now` if given, else the database clock (in a
    transaction: its start, so all statements of one call agree)."""
    return sql.replace("%(now)s", f"({CLOCK})")


# A claim goes by the manifest's host policies as this receiver last read them, keyed by the
# md5 of their text. Each statement of a claim first checks that key (HOSTS_CURRENT): after a
# reload through any receiver, a claim under the old policies does nothing and is made again
# with the new ones. So a claim is one round trip, and still never uses a stale policy.
HOSTS_CURRENT = (
    "(SELECT md5(value) FROM meta WHERE key = 'hosts') IS NOT DISTINCT FROM %(hosts_md5)s::text")
CLAIM_SETTINGS = """
SELECT (SELECT md5(value) FROM meta WHERE key = 'hosts') AS hosts_md5,
       (SELECT value FROM meta WHERE key = 'hosts'
        AND md5(value) IS DISTINCT FROM %(hosts_md5)s::text) AS hosts,
       (SELECT value FROM meta WHERE key = 'trainer') AS trainer
"""
UNREAD = "unread"  #: the cache key before the policies were first read: no md5 is this

# The worker registry, as SqliteQueue keeps it: a claim rewrites the worker's row when its
# registration changed, when it was lent, or when last_seen is due (every `seen_every_s`, as
# base.SEEN_EVERY_S); otherwise the row stays as it is. The row is the worker's
# whole registration, so the test reads it, not a receiver's memory: right with several
# receivers. A row rewritten on every claim and heartbeat cost a non-HOT update (last_seen
# is indexed) and 5 WAL records per cycle.
SEEN_RECENTLY = "(%(now)s - {w}.last_seen >= 0 AND %(now)s - {w}.last_seen < %(seen_every_s)s)"
UPSERT_WORKER = _db_clock(f"""
INSERT INTO workers (worker_id, hostname, capability, allow_jobs, deny_jobs, slot_vram_gib,
                     first_seen, last_seen)
SELECT %(worker_id)s::text, %(hostname)s::text, %(capability)s::jsonb, %(allow_json)s::jsonb,
       %(deny_json)s::jsonb, %(slot_vram)s::float8, %(now)s, %(now)s
WHERE {HOSTS_CURRENT} AND NOT EXISTS (
    SELECT 1 FROM workers AS r
    WHERE r.worker_id = %(worker_id)s::text AND r.hostname = %(hostname)s::text
      AND r.capability = %(capability)s::jsonb
      AND r.allow_jobs IS NOT DISTINCT FROM %(allow_json)s::jsonb
      AND r.deny_jobs = %(deny_json)s::jsonb AND r.slot_vram_gib = %(slot_vram)s::float8
      AND r.lent_to_job IS NULL AND {SEEN_RECENTLY.format(w="r")})
ON CONFLICT (worker_id) DO UPDATE SET
    hostname = excluded.hostname, capability = excluded.capability,
    allow_jobs = excluded.allow_jobs, deny_jobs = excluded.deny_jobs,
    slot_vram_gib = excluded.slot_vram_gib, last_seen = excluded.last_seen,
    lent_to_job = NULL
""")

# The claim: one statement picks the best eligible pending job, skipping rows other claims
# hold, and marks it claimed; the status test is repeated in the UPDATE itself. The hard
# constraints (on the job's effective memory needs) and the soft rules are matching.explain's,
# in SQL: a CPU slot may take a prefer_cuda job only when it has waited prefer_wait_s, or when
# no live CUDA worker that could run it has been seen within stale_after_s; a slot on a host
# the job failed on may take it only after prefer_wait_s, or when no live worker on another
# host could run it. A quarantined host claims nothing and counts as no place to go. A
# property test holds the two together. The slot's own registry row is left out of the
# fleet it looks at: the same statement writes it (CLAIM_CALLS) and cannot see that write,
# and once written it never counts (a CPU slot is no CUDA worker; a slot on a host the job
# avoids is not elsewhere).
CLAIM = _db_clock(f"""
WITH picked AS (
    UPDATE jobs SET status = 'claimed', lease = %(lease)s, attempts = attempts + 1,
           worker_id = %(worker_id)s, hostname = %(hostname)s, claimed_at = %(now)s,
           heartbeat_at = %(now)s, progress = NULL, progress_at = %(now)s, log_tail = NULL,
           updated_at = %(now)s
    WHERE job_id = (
        SELECT j.job_id FROM jobs AS j
        WHERE j.status = 'pending' AND NOT j.orphaned AND {HOSTS_CURRENT}
          AND NOT EXISTS (SELECT 1 FROM hosts AS h WHERE h.hostname = %(hostname)s
                                                     AND h.quarantined_until > %(now)s)
          AND (NOT j.require_cuda OR %(cuda)s)
          AND j.gpus <= %(gpus)s
          AND greatest(j.min_vram_gib, j.raised_vram_gib) <= %(vram)s
          AND (j.gpus <= 1 OR %(free)s::jsonb IS NULL
               OR greatest(j.min_vram_gib, j.raised_vram_gib)
                  <= (%(free)s::jsonb ->> (j.gpus - 1))::float8)
          AND greatest(j.min_ram_gib, j.raised_ram_gib) <= %(ram)s
          AND (j.allowed_hosts = '[]' OR j.allowed_hosts ? %(hostname)s)
          AND (%(allow)s::text[] IS NULL OR j.model = ANY (%(allow)s::text[]))
          AND NOT (j.model = ANY (%(deny)s::text[]))
          AND (NOT j.prefer_cuda OR %(cuda)s OR %(now)s - j.pending_since >= j.prefer_wait_s
               OR NOT EXISTS (
                   SELECT 1 FROM workers AS w
                   WHERE w.cuda AND w.last_seen >= %(now)s - %(stale_after_s)s
                     AND w.worker_id <> %(worker_id)s::text
                     AND NOT EXISTS (SELECT 1 FROM hosts AS h WHERE h.hostname = w.hostname
                                                                AND h.quarantined_until > %(now)s)
                     AND (w.allow_jobs IS NULL OR w.allow_jobs ? j.model)
                     AND NOT (w.deny_jobs ? j.model)
                     AND greatest(j.min_vram_gib, j.raised_vram_gib) <= w.slot_vram_gib
                     AND greatest(j.min_ram_gib, j.raised_ram_gib) <= w.ram_gib
                     AND (j.allowed_hosts = '[]' OR j.allowed_hosts ? w.hostname)))
          AND (NOT (j.avoid_hosts ? %(hostname)s)
               OR %(now)s - j.pending_since >= j.prefer_wait_s
               OR NOT EXISTS (
                   SELECT 1 FROM workers AS w
                   WHERE w.last_seen >= %(now)s - %(stale_after_s)s
                     AND w.worker_id <> %(worker_id)s::text
                     AND NOT (j.avoid_hosts ? w.hostname)
                     AND NOT EXISTS (SELECT 1 FROM hosts AS h WHERE h.hostname = w.hostname
                                                                AND h.quarantined_until > %(now)s)
                     AND (NOT j.require_cuda OR w.cuda)
                     AND (j.gpus <= 1 OR j.gpus <= (
                         SELECT count(DISTINCT g ->> 'index') FROM workers AS o,
                                jsonb_array_elements(o.capability -> 'gpus') AS g
                         WHERE o.hostname = w.hostname AND o.cuda
                           AND o.worker_id <> %(worker_id)s::text))
                     AND (w.allow_jobs IS NULL OR w.allow_jobs ? j.model)
                     AND NOT (w.deny_jobs ? j.model)
                     AND greatest(j.min_vram_gib, j.raised_vram_gib) <= w.slot_vram_gib
                     AND greatest(j.min_ram_gib, j.raised_ram_gib) <= w.ram_gib
                     AND (j.allowed_hosts = '[]' OR j.allowed_hosts ? w.hostname)))
        ORDER BY {{order}}
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    ) AND status = 'pending'
    RETURNING *
), attempt AS (
    INSERT INTO attempts (job_id, attempt, worker_id, hostname, lease, started_at)
    SELECT job_id, attempts, worker_id, hostname, lease, claimed_at FROM picked
), event AS (
    INSERT INTO events (job_id, at, kind, attempt, worker_id, detail)
    SELECT job_id, claimed_at, 'claimed', attempts, worker_id,
           jsonb_build_object('hostname', hostname)
    FROM picked
)
SELECT * FROM picked
""")
def _held(claim: str) -> str:
    """CLAIM under the reservation rule (matching.held_for), for a claim whose offer is
    narrower than its host: `wide` is the best job the host could run with all its GPUs
    free (CLAIM's own pick, for %(host_gpus)s GPUs of %(wide_vram)s GiB each); a job
    ranked below it is held back when it needs more GPUs than offered."""
    start = claim.index("SELECT j.job_id FROM jobs AS j")
    end = claim.index("FOR UPDATE SKIP LOCKED", start)
    pick = claim[start:end]
    wide = (pick.replace("SELECT j.job_id", "SELECT j.gpus, j.priority, j.prefer_cuda, "
                         "j.manifest_index", 1)
            .replace("j.gpus <= %(gpus)s", "j.gpus <= %(host_gpus)s", 1)
            .replace("%(vram)s", "%(wide_vram)s").replace("%(free)s::jsonb", "NULL::jsonb"))
    assert "%(gpus)s" not in wide and "%(free)s" not in wide, "CLAIM changed: update _held"
    not_held = """AND NOT EXISTS (
              SELECT 1 FROM wide AS b WHERE b.gpus > %(gpus)s
                AND (-b.priority, -b.prefer_cuda::int, b.manifest_index)
                    < (-j.priority, -j.prefer_cuda::int, j.manifest_index))
        ORDER BY"""
    held_pick = pick.replace("ORDER BY", not_held, 1)
    body = claim.replace(pick, held_pick, 1)
    assert body.lstrip().startswith("WITH picked AS ("), "CLAIM changed: update _held"
    return body.replace("WITH picked AS (", f"WITH wide AS (\n    {wide}), picked AS (", 1)


CLAIM_HELD = _held(CLAIM)

# The unschedulable jobs a slot could run: the hard constraints of CLAIM, on the slot's
# whole memory; none while its host is quarantined (it claims nothing). Before it picks, a
# claim makes them pending again (RESTORE_FOR_SLOT): each claim looks (usually none, found
# at once), and only a claim that finds some restores them.
UNSCHEDULABLE_FOR_SLOT = _db_clock(f"""
        SELECT j.job_id FROM jobs AS j
        WHERE j.status = 'unschedulable' AND NOT j.orphaned AND {HOSTS_CURRENT}
          AND NOT EXISTS (SELECT 1 FROM hosts AS h WHERE h.hostname = %(hostname)s::text
                                                     AND h.quarantined_until > %(now)s)
          AND (NOT j.require_cuda OR %(cuda)s)
          AND j.gpus <= %(gpus)s
          AND greatest(j.min_vram_gib, j.raised_vram_gib) <= %(slot_vram)s
          AND greatest(j.min_ram_gib, j.raised_ram_gib) <= %(ram)s
          AND (j.allowed_hosts = '[]' OR j.allowed_hosts ? %(hostname)s)
          AND (%(allow)s::text[] IS NULL OR j.model = ANY (%(allow)s::text[]))
          AND NOT (j.model = ANY (%(deny)s::text[]))""")
# Rows another transaction holds are left to it.
RESTORE_FOR_SLOT = _db_clock(f"""
WITH restored AS (
    UPDATE jobs SET status = 'pending', error = NULL, updated_at = %(now)s
    WHERE job_id IN ({UNSCHEDULABLE_FOR_SLOT}
        ORDER BY j.job_id
        FOR UPDATE SKIP LOCKED
    ) AND status = 'unschedulable'
    RETURNING job_id
), schedulable AS (
    INSERT INTO events (job_id, at, kind, worker_id)
    SELECT job_id, %(now)s, 'schedulable', %(worker_id)s FROM restored
)
SELECT count(*) AS restored FROM restored
""")

# A host's latest ended attempts since its last quarantine or release, newest first.
HOST_RECENT_ATTEMPTS = """
SELECT job_id, cause, signature FROM attempts
WHERE hostname = %(hostname)s AND ended_at IS NOT NULL AND ended_at > %(since)s
ORDER BY ended_at DESC, attempt DESC LIMIT %(k)s
"""
# Whether one of these signatures failed as an ordinary trainer error on another host too.
SIGNATURE_ELSEWHERE = """
SELECT EXISTS (SELECT 1 FROM attempts
               WHERE hostname != %(hostname)s AND cause = 'trainer_error'
                 AND signature = ANY (%(signatures)s::text[])) AS found
"""
QUARANTINE_HOST = """
INSERT INTO hosts (hostname, quarantined_until, quarantine_reason, quarantines, counts_since)
VALUES (%(hostname)s, %(until)s, %(reason)s, 1, %(now)s)
ON CONFLICT (hostname) DO UPDATE SET
    quarantined_until = excluded.quarantined_until,
    quarantine_reason = excluded.quarantine_reason,
    quarantines = hosts.quarantines + 1, counts_since = excluded.counts_since
"""

# Waiting jobs grouped by their hard constraints: schedulability is decided per group.
NEEDS_GROUPS = """
SELECT DISTINCT model, require_cuda, min_vram_gib, min_ram_gib, raised_vram_gib,
       raised_ram_gib, allowed_hosts, gpus
FROM jobs WHERE status IN ('pending', 'unschedulable') AND NOT orphaned
"""
# Move one group's jobs from %(old)s to %(new)s status (a NULL error makes them pending again).
SET_SCHEDULABILITY = """
UPDATE jobs SET status = %(new)s, error = %(error)s, updated_at = %(now)s
WHERE job_id IN (
    SELECT job_id FROM jobs
    WHERE status = %(old)s AND NOT orphaned
      AND (%(old)s != %(new)s OR error IS DISTINCT FROM %(error)s)
      AND model = %(model)s AND require_cuda = %(require_cuda)s
      AND min_vram_gib = %(min_vram_gib)s AND min_ram_gib = %(min_ram_gib)s
      AND raised_vram_gib = %(raised_vram_gib)s AND raised_ram_gib = %(raised_ram_gib)s
      AND allowed_hosts = %(allowed_hosts)s AND gpus = %(gpus)s
    ORDER BY job_id
    FOR UPDATE SKIP LOCKED
) AND status = %(old)s
RETURNING job_id
"""

ORDER_CPU = "j.priority DESC, j.manifest_index"
ORDER_CUDA = "j.priority DESC, j.prefer_cuda DESC, j.manifest_index"


def _compact(sql: str) -> str:
    """The statement on one line (it has no comments): psycopg caches the parsing of
    statements up to 4 KiB only, and CLAIM is longer with its indentation."""
    return " ".join(sql.split())


#: CLAIM and CLAIM_HELD alone, by (held, order): the pick each claim makes (CLAIM_CALLS)
CLAIMS = {(held, order): _compact((CLAIM_HELD if held else CLAIM).format(order=order))
          for held in (False, True) for order in (ORDER_CPU, ORDER_CUDA)}

# What a claim hands back besides the claimed row (NULLs when none): the host policies'
# key, their text when it is not the caller's, the trainer command, and whether the slot has
# unschedulable jobs to restore.
CLAIM_RESULT = """
SELECT (SELECT md5(value) FROM meta WHERE key = 'hosts') AS hosts_md5,
       (SELECT value FROM meta WHERE key = 'hosts'
        AND md5(value) IS DISTINCT FROM %(hosts_md5)s::text) AS hosts,
       (SELECT value FROM meta WHERE key = 'trainer') AS trainer,
       EXISTS (SELECT 1 FROM restorable) AS restorable, picked.*
FROM (VALUES (1)) AS one LEFT JOIN picked ON true
"""


def _claim_call(claim: str) -> str:
    """A whole claim as one statement: register the worker (UPSERT_WORKER), pick and mark
    one job with its attempt and event (`claim`), read the settings (CLAIM_RESULT). One
    round trip, one commit, no transaction block. With %(restore_first)s, it picks nothing
    while the slot has unschedulable jobs to restore first (UNSCHEDULABLE_FOR_SLOT): then
    claim_next restores them (RESTORE_FOR_SLOT) and claims again, without the test, so a
    restored job competes by rank as if it had been pending. Restoring in this statement
    would not do: all of a statement's parts see one snapshot, so its pick could not see
    what it restored, and its setup cost every claim 0.03 ms of the server's CPU."""
    body = claim.strip()
    assert body.startswith("WITH ") and body.endswith("SELECT * FROM picked"), "CLAIM changed"
    pick = "SELECT j.job_id FROM jobs AS j\n        WHERE j.status = 'pending' AND NOT j.orphaned"
    assert body.count(pick) == 1, "CLAIM changed: update _claim_call"
    body = body.replace(pick, pick + " AND NOT (%(restore_first)s::boolean"
                        " AND EXISTS (SELECT 1 FROM restorable))")
    ctes = body[len("WITH "):-len("SELECT * FROM picked")].rstrip()
    return (f"WITH worker AS ({UPSERT_WORKER}), restorable AS ({UNSCHEDULABLE_FOR_SLOT}\n"
            f"        LIMIT 1),\n{ctes}\n{CLAIM_RESULT}")


class RawStatement(NamedTuple):
    """A statement in PostgreSQL's own `$n` placeholders, converted once: psycopg converts
    `%(name)s` on every call of one longer than 4 KiB (0.1 ms for a claim)."""

    text: bytes
    names: tuple[str, ...]  #: the parameter of each $n, in order

    @classmethod
    def of(cls, sql: str) -> RawStatement:
        names: list[str] = []

        def number(found: re.Match[str]) -> str:
            if found[1] not in names:
                names.append(found[1])
            return f"${names.index(found[1]) + 1}"

        text = PLACEHOLDER.sub(number, sql)
        if "%" in text:  # a literal % would be sent as is, and a stray %s never bound
            raise ValueError(f"only %(name)s placeholders, and no other %: {text[:200]!r}")
        return cls(text.encode(), tuple(names))


PLACEHOLDER = re.compile(r"%\((\w+)\)s")

RESTORE_CALL = RawStatement.of(RESTORE_FOR_SLOT)
#: each claim as sent, by (held, order): one statement
CLAIM_CALLS = {
    key: RawStatement.of(_compact(_claim_call((CLAIM_HELD if key[0] else CLAIM).format(
        order=key[1])))) for key in CLAIMS}

# The stale sweep: one statement, safe to run from every receiver at once. SKIP LOCKED
# leaves a job whose heartbeat is being written right now to that heartbeat, and a job
# another receiver is sweeping to that receiver.
SWEEP = f"""
WITH clock AS (
    SELECT {CLOCK} AS now
), stale AS (
    SELECT job_id FROM jobs, clock
    WHERE status IN ('claimed', 'running')
      AND greatest(heartbeat_at, %(since)s) < clock.now - %(stale_after_s)s
    FOR UPDATE OF jobs SKIP LOCKED
), swept AS (
    UPDATE jobs AS j SET
        status = CASE WHEN j.lost_count + 1 < j.max_lost AND j.attempts_charged < j.max_attempts
                      THEN 'pending' ELSE 'failed' END,
        lease = NULL,
        error = 'lost worker ' || coalesce(j.worker_id, 'None'),
        lost_count = j.lost_count + 1,
        pending_since = CASE WHEN j.lost_count + 1 < j.max_lost
                                  AND j.attempts_charged < j.max_attempts
                             THEN clock.now ELSE j.pending_since END,
        updated_at = clock.now
    FROM stale, clock
    WHERE j.job_id = stale.job_id AND j.status IN ('claimed', 'running')
    RETURNING j.job_id, j.attempts, j.worker_id, j.status, j.error, clock.now
), ended AS (
    UPDATE attempts AS a SET ended_at = s.now, outcome = 'lost_worker', error = s.error
    FROM swept AS s
    WHERE a.job_id = s.job_id AND a.attempt = s.attempts AND a.ended_at IS NULL
), logged AS (
    INSERT INTO events (job_id, at, kind, attempt, worker_id, detail)
    SELECT job_id, now, 'failed', attempts, worker_id,
           jsonb_build_object('outcome', 'lost_worker', 'error', right(error, 2000),
                              'retry', status = 'pending')
    FROM swept
)
SELECT job_id FROM swept ORDER BY job_id
"""

# Live jobs whose worker heartbeats but whose progress has not moved for stall_after_s.
STALLED_JOBS = """
SELECT * FROM jobs
WHERE status IN ('claimed', 'running') AND stall_after_s > 0
  AND heartbeat_at >= %(now)s - %(stale_after_s)s
  AND greatest(coalesce(progress_at, claimed_at), %(since)s) < %(now)s - stall_after_s
ORDER BY job_id
FOR UPDATE SKIP LOCKED
"""

LOCK_JOB = f"SELECT j.*, {CLOCK} AS clock FROM jobs AS j WHERE job_id = %(job_id)s FOR UPDATE"

# The usual heartbeat and completion, each one statement in its own transaction (one round
# trip): the job is live under this lease. Anything else (a cancelled job, a swept one the
# worker may take back, a repeated completion, a lost lease) matches no row and takes the
# general path, which locks the row and decides in Python. The lease is compared by md5, so
# the comparison's time says nothing about the lease.
LIVE_UNDER_LEASE = ("status IN ('claimed', 'running') "
                    "AND md5(lease) = md5(%(lease)s::text)")
HEARTBEAT_LIVE = _db_clock(f"""
WITH old AS (
    SELECT job_id, status, progress FROM jobs
    WHERE job_id = %(job_id)s AND {LIVE_UNDER_LEASE}
    FOR UPDATE
), beat AS (
    UPDATE jobs AS j SET status = 'running', heartbeat_at = %(now)s, updated_at = %(now)s,
           progress = coalesce(%(progress)s::jsonb, j.progress),
           log_tail = coalesce(%(log_tail)s::text, j.log_tail),
           progress_at = CASE  -- base.progress_moved: the step or the fraction moved on
               WHEN %(progress)s::jsonb IS NOT NULL
                AND (nullif(%(progress)s::jsonb -> 'step', 'null'),
                     nullif(%(progress)s::jsonb -> 'fraction', 'null'))
                    IS DISTINCT FROM (nullif(old.progress -> 'step', 'null'),
                                      nullif(old.progress -> 'fraction', 'null'))
               THEN %(now)s ELSE j.progress_at END
    FROM old  -- keyed by the parameter: by old.job_id alone, the plan walked every live job
    WHERE j.job_id = %(job_id)s AND j.job_id = old.job_id
      AND j.status IN ('claimed', 'running')
    RETURNING j.job_id, j.attempts, j.worker_id, j.hostname, j.heartbeat_at AS at,
              old.status AS was
), seen AS (  -- when due, as a claim's UPSERT_WORKER
    UPDATE workers AS w SET last_seen = b.at FROM beat AS b
    WHERE w.worker_id = b.worker_id AND NOT {SEEN_RECENTLY.format(w="w")}
), peak AS (
    UPDATE attempts AS a
    SET peak_vram_gib = greatest(coalesce(a.peak_vram_gib, 0), %(peak)s::float8)
    FROM beat AS b
    WHERE %(peak)s::float8 IS NOT NULL AND a.job_id = b.job_id AND a.attempt = b.attempts
), started AS (
    INSERT INTO events (job_id, at, kind, attempt, worker_id, detail)
    SELECT job_id, at, 'started', attempts, worker_id, '{{}}' FROM beat WHERE was = 'claimed'
)
SELECT job_id FROM beat
""")
# A heartbeat's lent_slots: the sibling slots its job borrowed are seen, and lent to the job;
# only slots of the job's own host (a worker vouches for no other host's).
MARK_LENT = """
UPDATE workers SET last_seen = %(now)s, lent_to_job = %(job_id)s
WHERE worker_id = ANY(%(lent)s::text[]) AND hostname = %(hostname)s
  AND worker_id <> %(worker_id)s
"""
# HEARTBEAT_LIVE with MARK_LENT, still one statement: only for a heartbeat that names some.
HEARTBEAT_LIVE_LENT = HEARTBEAT_LIVE.replace("), peak AS (", """), lent AS (
    UPDATE workers AS w SET last_seen = b.at, lent_to_job = b.job_id FROM beat AS b
    WHERE w.worker_id = ANY(%(lent)s::text[]) AND w.hostname = b.hostname
      AND w.worker_id <> b.worker_id
), peak AS (""", 1)
COMPLETE_LIVE = _db_clock(f"""
WITH done AS (
    UPDATE jobs SET status = 'completed', artifact_id = %(artifact_id)s::text,
           metrics = %(metrics)s::jsonb,
           progress = (coalesce(progress, '{{}}') - 'message') || '{{"fraction": 1.0}}',
           error = NULL,  -- all done: the last heartbeat's message is stale now
           heartbeat_at = %(now)s, updated_at = %(now)s
    WHERE job_id = %(job_id)s AND {LIVE_UNDER_LEASE}
    RETURNING *
), ended AS (
    UPDATE attempts AS a SET ended_at = d.updated_at, outcome = 'completed', error = NULL,
           peak_vram_gib = CASE WHEN %(peak)s::float8 IS NULL THEN a.peak_vram_gib
                                ELSE greatest(coalesce(a.peak_vram_gib, 0), %(peak)s::float8)
                           END
    FROM done AS d  -- keyed by the parameter: a join on d.job_id alone was a seq scan
    WHERE a.job_id = %(job_id)s AND a.attempt = d.attempts AND a.ended_at IS NULL
), logged AS (
    INSERT INTO events (job_id, at, kind, attempt, worker_id, detail)
    SELECT job_id, updated_at, 'completed', attempts, worker_id,
           jsonb_build_object('artifact_id', %(artifact_id)s::text)
    FROM done
)
SELECT * FROM done
""")


def _without_peak(heartbeat: str) -> str:
    """A heartbeat without its `peak` CTE, for the usual beat, which reports no peak: a CTE
    that writes is set up on every execution, even one that writes nothing."""
    start, end = heartbeat.index("), peak AS ("), heartbeat.index("), started AS (")
    return heartbeat[:start] + heartbeat[end:]


#: the usual heartbeat as sent, by (names lent slots, reports a peak); the usual completion
HEARTBEAT_CALLS = {
    (lent, peak): RawStatement.of(sql if peak else _without_peak(sql))
    for lent, sql in ((False, HEARTBEAT_LIVE), (True, HEARTBEAT_LIVE_LENT))
    for peak in (False, True)}
COMPLETE_CALL = RawStatement.of(COMPLETE_LIVE)

INSERT_JOB = """
INSERT INTO jobs (job_id, name, model, mode, hyper, split_recipe, train_hosts, seed, priority,
                  require_cuda, prefer_cuda, min_vram_gib, min_ram_gib, allowed_hosts,
                  max_attempts, max_lost, timeout_s, prefer_wait_s, stall_after_s,
                  checkpoint_interval_s, gpus,
                  manifest_index, status, pending_since, created_at, updated_at)
VALUES (%(job_id)s, %(name)s, %(model)s, %(mode)s, %(hyper)s, %(split_recipe)s,
        %(train_hosts)s, %(seed)s, %(priority)s, %(require_cuda)s, %(prefer_cuda)s,
        %(min_vram_gib)s, %(min_ram_gib)s, %(allowed_hosts)s, %(max_attempts)s, %(max_lost)s,
        %(timeout_s)s, %(prefer_wait_s)s, %(stall_after_s)s, %(checkpoint_interval_s)s,
        %(gpus)s, %(manifest_index)s, 'pending',
        %(now)s, %(now)s, %(now)s)
"""

# Constraints follow the manifest only while the job waits; its place in the manifest
# always does.
UPDATE_PENDING_JOB = """
UPDATE jobs SET name = %(name)s, priority = %(priority)s, require_cuda = %(require_cuda)s,
       prefer_cuda = %(prefer_cuda)s, min_vram_gib = %(min_vram_gib)s,
       min_ram_gib = %(min_ram_gib)s, allowed_hosts = %(allowed_hosts)s,
       max_attempts = %(max_attempts)s, max_lost = %(max_lost)s, timeout_s = %(timeout_s)s,
       stall_after_s = %(stall_after_s)s, prefer_wait_s = %(prefer_wait_s)s,
       checkpoint_interval_s = %(checkpoint_interval_s)s, gpus = %(gpus)s,
       manifest_index = %(manifest_index)s,
       orphaned = false, updated_at = %(now)s
WHERE job_id = %(job_id)s
"""
UPDATE_PLACE = """
UPDATE jobs SET manifest_index = %(manifest_index)s, orphaned = false
WHERE job_id = %(job_id)s AND (manifest_index != %(manifest_index)s OR orphaned)
"""

INSERT_EVENT = """
INSERT INTO events (job_id, at, kind, attempt, worker_id, detail)
VALUES (%s, %s, %s, %s, %s, %s)
"""
END_ATTEMPT = """
UPDATE attempts SET ended_at = %s, outcome = %s, error = %s
WHERE job_id = %s AND attempt = %s AND ended_at IS NULL
"""
# The other hosts where this job's attempts since its last requeue ended as an ordinary
# trainer error with the same signature.
SAME_SIGNATURE_HOSTS = """
SELECT DISTINCT hostname FROM attempts
WHERE job_id = %(job_id)s AND signature = %(signature)s AND cause = 'trainer_error'
  AND hostname != %(hostname)s
  AND attempt > coalesce((SELECT max(attempt) FROM events
                          WHERE job_id = %(job_id)s AND kind = 'requeued'), 0)
ORDER BY hostname
"""
RECORD_PEAK = """
UPDATE attempts SET peak_vram_gib = greatest(coalesce(peak_vram_gib, 0), %s)
WHERE job_id = %s AND attempt = %s
"""
RECORD_DIAGNOSIS = """
UPDATE attempts SET cause = %(cause)s, signature = %(signature)s,
       peak_vram_gib = coalesce(%(peak)s, peak_vram_gib)
WHERE job_id = %(job_id)s AND attempt = %(attempt)s
"""
FAILURE_SLOT = """
SELECT ram_gib, slot_vram_gib FROM workers WHERE worker_id = %s
"""
FINISH = """
UPDATE jobs SET status = %(status)s, lease = NULL, error = %(error)s,
       attempts_charged = %(charged)s, lost_count = %(lost)s,
       pending_since = CASE WHEN %(retry)s THEN %(now)s ELSE pending_since END,
       updated_at = %(now)s
WHERE job_id = %(job_id)s
RETURNING *
"""
REVIVE = """
UPDATE jobs SET status = 'running', lease = %(lease)s, attempts = %(attempt)s,
       lost_count = greatest(lost_count - 1, 0), worker_id = %(worker_id)s,
       hostname = %(hostname)s, error = NULL, claimed_at = %(now)s, heartbeat_at = %(now)s,
       progress_at = %(now)s, updated_at = %(now)s
WHERE job_id = %(job_id)s
RETURNING *
"""

RESOLVE = """
(SELECT job_id, true AS by_name FROM jobs WHERE name = %(name)s
 ORDER BY orphaned, manifest_index LIMIT 1)
UNION ALL
(SELECT job_id, false FROM jobs WHERE job_id >= %(low)s AND job_id < %(high)s
 ORDER BY job_id LIMIT 11)
"""

INSERT_TOKEN = """
INSERT INTO tokens (token_hash, hostname, kind, created_at, expires_at)
VALUES (%(token_hash)s, %(hostname)s, %(kind)s, %(now)s, %(expires_at)s)
RETURNING *
"""
HOST_LIVE_JOBS = """
SELECT * FROM jobs WHERE status IN ('claimed', 'running') AND hostname = %s
ORDER BY job_id FOR UPDATE
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
JSON_FIELDS = ("hyper", "train_hosts", "allowed_hosts")


def _spec_values(spec: JobSpec) -> dict[str, Any]:
    """A job's manifest fields as Python values, comparable with what the database returns."""
    return {
        "job_id": spec.job_id,
        "name": spec.name,
        "model": spec.model,
        "mode": spec.mode,
        "hyper": dict(spec.hyper),
        "split_recipe": spec.split_recipe,
        "train_hosts": list(spec.train_hosts),
        "seed": spec.seed,
        "priority": spec.priority,
        "require_cuda": spec.require_cuda,
        "prefer_cuda": spec.prefer_cuda,
        "min_vram_gib": float(spec.min_vram_gib),
        "min_ram_gib": float(spec.min_ram_gib),
        "allowed_hosts": list(spec.allowed_hosts),
        "max_attempts": spec.max_attempts,
        "max_lost": spec.max_lost,
        "timeout_s": float(spec.timeout_s),
        "prefer_wait_s": float(spec.prefer_wait_s),
        "stall_after_s": float(spec.stall_after_s),
        "checkpoint_interval_s": float(spec.checkpoint_interval_s),
        "gpus": spec.gpus,
        "manifest_index": spec.manifest_index,
    }


def _params(values: Mapping[str, Any], now: float) -> dict[str, Any]:
    params = {**values, "now": now}
    for key in JSON_FIELDS:
        params[key] = Jsonb(values[key])
    return params


def _token(row: Mapping[str, Any]) -> TokenInfo:
    return TokenInfo(
        token_hash=row["token_hash"], hostname=row["hostname"], kind=TokenKind(row["kind"]),
        created_at=row["created_at"], expires_at=row["expires_at"], used_at=row["used_at"],
        last_used_at=row["last_used_at"], revoked_at=row["revoked_at"],
    )


def _hosts(text: str | None) -> dict[str, HostSpec]:
    if text is None:
        return {}
    return {
        name: HostSpec(name, None if h["allow"] is None else tuple(h["allow"]), tuple(h["deny"]))
        for name, h in json.loads(text).items()
    }


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    host = info.get("host") or "localhost"
    return f"postgresql://{info.get('user') or ''}@{host}:{info.get('port') or 5432}/" \
        f"{info.get('dbname') or ''}"


class _JsonbLoader(JsonbBinaryLoader):
    """jsonb in binary, with the empty list (most list columns of a job) read without the
    JSON parser."""

    def load(self, data: Buffer) -> Any:
        if data == b"\x01[]":
            return []
        if data[:1] != b"\x01":
            return super().load(data)  # an unknown format: psycopg's error
        return _decode_json(bytes(data[1:]).decode())  # json.loads on bytes sniffs first


_decode_json = json.JSONDecoder().decode


#: the column names of each RawStatement's rows, read from its first result
_COLUMNS: dict[bytes, tuple[str, ...]] = {}


def _run_raw(conn: Conn, statement: RawStatement, params: Mapping[str, Any]
             ) -> dict[str, Any] | None:
    """Run `statement` with the named `params` in autocommit; its first row."""
    cur = conn.raw()
    row = cur.execute(statement.text, [params[n] for n in statement.names],
                      binary=True).fetchone()
    if row is None:
        return None
    names = _COLUMNS.get(statement.text)
    if names is None:
        assert cur.description is not None
        names = _COLUMNS[statement.text] = tuple(c.name for c in cur.description)
    return dict(zip(names, row, strict=True))


def _configure(conn: Conn) -> None:
    """Every pooled connection runs without JIT compilation. The claim's correlated
    subqueries make the planner's cost estimate huge, so with JIT on (PostgreSQL's default
    where LLVM is installed) each claim was compiled first: about 1 s of the server's CPU for
    a statement that runs in 0.3 ms. Nothing this queue runs is long enough to gain from it.

    They also run generic plans (planned once per prepared statement, not on every call):
    a custom plan of the claim cost 0.7 ms of the server's CPU on every claim, and under
    `auto` the server never switched to the generic one. The claim's plan does not depend on
    its values (a test checks that it walks the partial index). The calls whose plan does,
    a status as a parameter against the partial indexes, set CUSTOM_PLANS for themselves."""
    conn.execute("SET jit = off")
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.adapters.register_loader("jsonb", _JsonbLoader)


#: for a transaction whose statements are best planned with their values (see _configure)
CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"


class PostgresQueue:
    """JobQueue on PostgreSQL. Thread-safe: every call borrows a pooled connection."""

    backend = "postgresql"
    database_clock = True  #: a call without `now` is timed by the database, not the caller

    def __init__(
        self, url: str, *, stale_after_s: float = 600.0, pool_size: int = 4,
        failure_aware: bool = True,
    ) -> None:
        self.url = url
        self.stale_after_s = stale_after_s
        self.failure_aware = failure_aware  #: False: the naive baseline, as in SqliteQueue
        self._worker_tokens_seen = False
        self._seen_every_s = seen_every_s(stale_after_s)  #: as SqliteQueue's
        #: the manifest's host policies as last read, with the md5 of their text (see CLAIM)
        self._host_policies: tuple[str | None, dict[str, HostSpec]] = (UNREAD, {})
        self.schema_version = upgrade_schema(url)
        self._pool: ConnectionPool[Conn] = ConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, name="trainfleet",
            connection_class=_Connection,
            kwargs={"autocommit": True, "row_factory": dict_row}, configure=_configure,
        )
        self._pool.open(wait=True, timeout=30.0)

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Conn]:
        """One transaction on a pooled connection, pipelined: statements whose results are not
        read travel together, with the COMMIT, in one round trip."""
        with self._connection() as conn, conn.pipeline(), conn.transaction():
            yield conn

    def _run_one(self, statement: RawStatement, params: Mapping[str, Any]
                 ) -> dict[str, Any] | None:
        """_run_raw on a pooled connection, borrowed and returned without the pool's context
        manager (for the hot calls: both context managers cost 0.03 ms a call)."""
        try:
            conn = self._pool.getconn()
            try:
                return _run_raw(conn, statement, params)
            finally:
                self._pool.putconn(conn)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"{describe(self.url)}: {exc}") from exc

    @contextmanager
    def _connection(self) -> Iterator[Conn]:
        """A pooled connection in autocommit mode: each statement is its own transaction."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"{describe(self.url)}: {exc}") from exc

    def _read_host_policies(self, conn: Conn) -> None:
        row = conn.execute(CLAIM_SETTINGS, {"hosts_md5": UNREAD}).fetchone()
        assert row is not None
        self._remember_host_policies(row)

    def _remember_host_policies(self, row: Mapping[str, Any]) -> None:
        self._host_policies = (row["hosts_md5"], _hosts(row["hosts"]))

    def clock(self) -> float:
        """The database's clock, as seconds since the epoch."""
        with self._connection() as conn:
            return self._clock(conn, None)

    def _clock(self, conn: Conn, now: float | None) -> float:
        """`now` if given, else the database's clock (in a transaction: its start)."""
        row = conn.execute(f"SELECT {CLOCK} AS now", {"now": now}).fetchone()
        assert row is not None
        return float(row["now"])

    def _lock_job(self, conn: Conn, job_id: str, now: float | None) -> dict[str, Any]:
        """The job's row, locked for this transaction, with the transaction's `clock`."""
        row = conn.execute(LOCK_JOB, {"job_id": job_id, "now": now}).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return row

    def _fail_spent(self, conn: Conn, row: dict[str, Any], now: float) -> None:
        """Fail a waiting job whose lowered budget it has already used: claiming it again
        would run an attempt past max_attempts (or max_lost)."""
        error = (f"out of attempts: the manifest lowered the budget to max_attempts "
                 f"{row['max_attempts']} and max_lost {row['max_lost']}; the job had "
                 f"{row['attempts_charged']} charged and {row['lost_count']} lost")
        conn.execute("UPDATE jobs SET status = 'failed', error = %s, updated_at = %s "
                     "WHERE job_id = %s", (error, now, row["job_id"]))
        self._event(conn, row["job_id"], "failed", now, row["attempts"], outcome="budget",
                    error=error, retry=False)

    def _event(
        self, conn: Conn, job_id: str, kind: str, now: float, attempt: int | None = None,
        worker_id: str | None = None, **detail: Any,
    ) -> None:
        conn.execute(INSERT_EVENT, (job_id, now, kind, attempt, worker_id, Jsonb(detail)))

    def _live_row(
        self, conn: Conn, row: dict[str, Any], lease: str, now: float
    ) -> dict[str, Any]:
        """The locked row if `lease` is its current live lease; LeaseLost otherwise.

        A worker that comes back after its job was swept gets the job back under a new
        attempt, if nobody has claimed it since.
        """
        job_id = row["job_id"]
        if row["lease"] is not None and same_lease(row["lease"], lease):
            if row["status"] not in LIVE:
                raise LeaseLost(job_id, f"job is {row['status']}")
            return row
        revived = self._revive(conn, row, lease, now)
        if revived is None:
            raise LeaseLost(job_id)
        return revived

    def _revive(
        self, conn: Conn, row: dict[str, Any], lease: str, now: float
    ) -> dict[str, Any] | None:
        """Hand a swept, still unclaimed job back to the worker whose lease was swept."""
        if row["status"] != Status.PENDING or row["orphaned"]:
            return None
        last = conn.execute(
            "SELECT * FROM attempts WHERE job_id = %s ORDER BY attempt DESC LIMIT 1",
            (row["job_id"],),
        ).fetchone()
        if (last is None or last["outcome"] != FailureKind.LOST_WORKER
                or not same_lease(last["lease"], lease)):
            return None
        attempt = row["attempts"] + 1
        revived = conn.execute(
            REVIVE, {"lease": lease, "attempt": attempt, "worker_id": last["worker_id"],
                     "hostname": last["hostname"], "now": now, "job_id": row["job_id"]},
        ).fetchone()
        conn.execute(
            "INSERT INTO attempts (job_id, attempt, worker_id, hostname, lease, started_at) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (row["job_id"], attempt, last["worker_id"], last["hostname"], lease, now),
        )
        self._event(conn, row["job_id"], "reclaimed", now, attempt, last["worker_id"],
                    note=f"worker came back after attempt {last['attempt']} was swept")
        return revived

    def _end_attempt(
        self, conn: Conn, row: Mapping[str, Any], outcome: str, error: str | None, now: float
    ) -> None:
        conn.execute(END_ATTEMPT, (now, outcome, error, row["job_id"], row["attempts"]))

    # -- manifest ---------------------------------------------------------

    def sync_manifest(self, manifest: Manifest, now: float | None = None) -> SyncResult:
        """Idempotent reload: new ids are added, pending ones follow the manifest,
        others keep their state, and ids no longer listed are marked orphaned.

        Receivers syncing at once take turns, so each sees the other's jobs.
        """
        wanted = {spec.job_id: _spec_values(spec) for spec in manifest.jobs}
        hosts = {
            name: {"allow": None if h.allow_jobs is None else list(h.allow_jobs),
                   "deny": list(h.deny_jobs)}
            for name, h in manifest.hosts.items()
        }
        added = updated = unchanged = 0
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SYNC_LOCK,))
            now = self._clock(conn, now)
            existing = {
                row["job_id"]: row
                for row in conn.execute(
                    f"SELECT job_id, status, orphaned, manifest_index, {', '.join(MUTABLE_FIELDS)}"
                    " FROM jobs"
                )
            }
            inserts, pending_updates, place_updates = [], [], []
            for job_id, values in wanted.items():
                old = existing.get(job_id)
                if old is None:
                    inserts.append(_params(values, now))
                    added += 1
                elif old["status"] in (Status.PENDING, Status.UNSCHEDULABLE) and (
                    old["orphaned"] or any(old[f] != values[f] for f in MUTABLE_FIELDS)
                ):
                    pending_updates.append(_params(values, now))
                    updated += 1
                else:
                    place_updates.append(
                        {"job_id": job_id, "manifest_index": values["manifest_index"]}
                    )
                    if old["orphaned"]:
                        updated += 1
                    else:
                        unchanged += 1
            gone = [job_id for job_id in existing if job_id not in wanted]
            with conn.cursor() as cur:
                cur.executemany(INSERT_JOB, inserts)
                cur.executemany(UPDATE_PLACE, place_updates)
                cur.executemany(UPDATE_PENDING_JOB, pending_updates)
                for spent in conn.execute(SPENT_PENDING_JOBS).fetchall():
                    self._fail_spent(conn, spent, now)
                cur.executemany(
                    "INSERT INTO events (job_id, at, kind) VALUES (%s, %s, 'added')",
                    [(p["job_id"], now) for p in inserts],
                )
            conn.execute(
                "UPDATE jobs SET orphaned = true WHERE job_id = ANY (%s) AND NOT orphaned",
                (gone,),
            )
            for key, value in (("hosts", hosts), ("trainer", list(manifest.trainer.command))):
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, json.dumps(value, sort_keys=True)),
                )
            self._reschedule(conn, now)
        if added >= ANALYZE_AFTER_ADDED:
            # Fresh statistics, or the planner may take a bulk-loaded queue for a tiny one
            # and sort every pending job on each claim instead of walking the index.
            with self._connection() as conn:
                conn.execute("ANALYZE jobs")
        return SyncResult(added, updated, unchanged, len(gone))

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
        With `host_gpus` above the GPUs offered, CLAIM_HELD applies matching.held_for."""
        vram = capability.max_vram_gib if slot_vram_gib is None else slot_vram_gib
        offer = matching.offered(matching.Slot(capability, vram, gpus_free=gpus_free),
                                 free_vram_gib, free_vram_per_gpu)
        held = host_gpus is not None and matching.reserves(offer, host_gpus)
        order = ORDER_CUDA if capability.cuda else ORDER_CPU
        lease = secrets.token_hex(16)
        restore_first = True
        if self._host_policies[0] == UNREAD:
            with self._connection() as conn:
                self._read_host_policies(conn)
        while True:
            hosts_md5, hosts = self._host_policies
            policy = matching.merge_policy(hosts.get(capability.hostname), own_allow,
                                           own_deny)
            allow = None if policy.allow is None else sorted(policy.allow)
            deny = sorted(policy.deny)
            params = {
                "lease": lease, "worker_id": worker_id, "hostname": capability.hostname,
                "now": now, "cuda": capability.cuda, "vram": offer.best_vram,
                "ram": capability.ram_gib, "allow": allow, "deny": deny,
                "stale_after_s": self.stale_after_s, "hosts_md5": hosts_md5,
                "gpus": offer.gpus, "host_gpus": host_gpus, "wide_vram": vram,
                "free": None if offer.free_vram is None else Jsonb(list(offer.free_vram)),
                "slot_vram": vram, "restore_first": restore_first,
                "capability": Jsonb(capability.to_dict()),
                "allow_json": None if allow is None else Jsonb(allow),
                "deny_json": Jsonb(deny), "seen_every_s": self._seen_every_s,
            }
            # One statement, one round trip, one WAL flush (see _claim_call). The worker
            # is seen even when nothing fits it: the prefer_cuda rule counts it.
            row = self._run_one(CLAIM_CALLS[held, order], params)
            assert row is not None
            if row["job_id"] is not None:  # claimed, and committed: keep it
                break
            if row["hosts_md5"] != hosts_md5:  # a reload changed them: claim again
                self._remember_host_policies(row)
                restore_first = True
            elif restore_first and row["restorable"]:
                self._run_one(RESTORE_CALL, params)
                restore_first = False  # rows held elsewhere stay unschedulable
            else:
                break
        if row["job_id"] is None:
            return None
        command = tuple(json.loads(row["trainer"])) if row["trainer"] else ()
        return Claim(job_from_row(row), lease, row["attempts"], command)

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
        with self._tx() as conn:
            row = self._lock_job(conn, job_id, now)
            now = float(row["clock"])
            row = self._live_row(conn, row, lease, now)
            done = conn.execute(
                "UPDATE jobs SET checkpoint_id = %s, checkpoint_at = %s, updated_at = %s "
                "WHERE job_id = %s RETURNING *", (artifact_id, now, now, job_id)).fetchone()
            assert done is not None
            self._event(conn, job_id, "checkpoint", now, row["attempts"], row["worker_id"],
                        artifact_id=artifact_id, **checkpoint_detail(progress))
            return job_from_row(done)

    def artifacts_in_use(self) -> set[str]:
        """Every job's artifact and the checkpoints of jobs not completed: never pruned."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT artifact_id AS id FROM jobs WHERE artifact_id IS NOT NULL "
                "UNION SELECT checkpoint_id FROM jobs "
                "WHERE checkpoint_id IS NOT NULL AND status <> 'completed'").fetchall()
        return {str(row["id"]) for row in rows}

    def check_lease(self, job_id: str, lease: str, now: float | None = None) -> Job:
        """The job, if `lease` is its current live lease (or revivable); LeaseLost otherwise."""
        with self._tx() as conn:
            row = self._lock_job(conn, job_id, now)
            return job_from_row(self._live_row(conn, row, lease, row["clock"]))

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
        lent = list(lent_slots)
        beat = self._run_one(HEARTBEAT_CALLS[bool(lent), peak_vram_gib is not None], {
            "job_id": job_id, "lease": lease, "now": now, "log_tail": log_tail,
            "progress": None if progress is None else Jsonb(dict(progress)),
            "peak": peak_vram_gib, "lent": lent, "seen_every_s": self._seen_every_s,
        })
        if beat is not None:
            return "continue"
        with self._tx() as conn:
            row = self._lock_job(conn, job_id, now)
            now = float(row["clock"])
            if row["lease"] is not None and same_lease(row["lease"], lease):
                if row["status"] == Status.CANCELLED:
                    return "cancel"
            row = self._live_row(conn, row, lease, now)
            moved = progress_moved(row["progress"], progress)
            conn.execute(
                "UPDATE jobs SET status = 'running', heartbeat_at = %s, updated_at = %s, "
                "progress = coalesce(%s, progress), log_tail = coalesce(%s, log_tail), "
                "progress_at = CASE WHEN %s THEN %s ELSE progress_at END WHERE job_id = %s",
                (now, now, None if progress is None else Jsonb(dict(progress)), log_tail,
                 moved, now, job_id),
            )
            conn.execute(
                "UPDATE workers SET last_seen = %(now)s WHERE worker_id = %(worker_id)s "
                f"AND NOT {SEEN_RECENTLY.format(w='workers')}",
                {"now": now, "worker_id": row["worker_id"], "seen_every_s": self._seen_every_s})
            if lent:
                conn.execute(MARK_LENT, {"now": now, "job_id": job_id, "lent": lent,
                                         "hostname": row["hostname"],
                                         "worker_id": row["worker_id"]})
            if peak_vram_gib is not None:
                conn.execute(RECORD_PEAK, (peak_vram_gib, job_id, row["attempts"]))
            if row["status"] == Status.CLAIMED:
                self._event(conn, job_id, "started", now, row["attempts"], row["worker_id"])
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
        done = self._run_one(COMPLETE_CALL, {
            "job_id": job_id, "lease": lease, "now": now, "artifact_id": artifact_id,
            "metrics": Jsonb(dict(metrics or {})), "peak": peak_vram_gib})
        if done is not None:
            return job_from_row(done)
        with self._tx() as conn:
            row = self._lock_job(conn, job_id, now)
            now = float(row["clock"])
            if (
                row["status"] == Status.COMPLETED
                and row["lease"] is not None
                and same_lease(row["lease"], lease)
                and row["artifact_id"] == artifact_id
            ):
                return job_from_row(row)
            row = self._live_row(conn, row, lease, now)
            done = conn.execute(
                "UPDATE jobs SET status = 'completed', artifact_id = %s, metrics = %s, "
                "progress = (coalesce(progress, '{}') - 'message') || '{\"fraction\": 1.0}', "
                "error = NULL, "
                "heartbeat_at = %s, updated_at = %s WHERE job_id = %s RETURNING *",
                (artifact_id, Jsonb(dict(metrics or {})), now, now, job_id),
            ).fetchone()
            assert done is not None
            self._end_attempt(conn, row, "completed", None, now)
            if peak_vram_gib is not None:
                conn.execute(RECORD_PEAK, (peak_vram_gib, job_id, row["attempts"]))
            self._event(conn, job_id, "completed", now, row["attempts"], row["worker_id"],
                        artifact_id=artifact_id)
            return job_from_row(done)

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
        with self._tx() as conn:
            row = self._lock_job(conn, job_id, now)
            now = float(row["clock"])
            row = self._live_row(conn, row, lease, now)
            return job_from_row(self._fail_attempt(conn, row, error, retryable, kind, now, cause,
                                           signature, peak_vram_gib))

    def _fail_attempt(
        self, conn: Conn, row: Mapping[str, Any], error: str, retryable: bool,
        kind: FailureKind, now: float, cause: Cause | None = None,
        signature: str | None = None, peak_vram_gib: float | None = None,
    ) -> dict[str, Any]:
        """End the live attempt of the locked `row` as failed, and learn from it (see fail);
        the job's row after it."""
        job_id = row["job_id"]
        conn.execute(RECORD_DIAGNOSIS, {
            "cause": None if cause is None else cause.value, "signature": signature,
            "peak": peak_vram_gib, "job_id": job_id, "attempt": row["attempts"]})
        charged = row["attempts_charged"]
        if kind in CHARGED:
            charged += 1  # a stopped worker is not the training's fault
        if kind in CHARGED and self.failure_aware:
            failure = self._failure(conn, row, cause, signature, peak_vram_gib)
            verdict = retry_policy.after_failure(
                failure, row["raised_vram_gib"], row["raised_ram_gib"],
                tuple(row["avoid_hosts"]), self._same_signature(conn, failure, row))
            conn.execute(
                "UPDATE jobs SET raised_vram_gib = %s, raised_ram_gib = %s, avoid_hosts = %s"
                " WHERE job_id = %s",
                (verdict.raised_vram_gib, verdict.raised_ram_gib,
                 Jsonb(list(verdict.avoid_hosts)), job_id))
            if verdict.code_bug:
                retryable, error = False, f"{error}\n{verdict.code_bug}"  # shown: last line
        retry = retryable and charged < row["max_attempts"]
        done = self._finish(conn, row, retry, kind.value, error, charged, row["lost_count"],
                            now)
        if cause is not None and self.failure_aware:
            self._maybe_quarantine(conn, row["hostname"], now)
        return done

    def fail_stalled(self, now: float | None = None, since: float = 0.0) -> list[str]:
        """Fail live jobs whose worker heartbeats but whose progress stopped moving."""
        with self._tx() as conn:
            now = self._clock(conn, now)
            rows = conn.execute(STALLED_JOBS, {"now": now, "since": since,
                                               "stale_after_s": self.stale_after_s}).fetchall()
            for row in rows:
                idle_s = now - max(row["progress_at"] or row["claimed_at"], since)
                self._fail_attempt(conn, row, stalled_error(row, idle_s), True,
                                   FailureKind.STALLED, now)
        return [row["job_id"] for row in rows]

    def _maybe_quarantine(self, conn: Conn, hostname: str, now: float) -> None:
        """Quarantine the host when its latest attempts failed alike on different jobs."""
        host = conn.execute("SELECT * FROM hosts WHERE hostname = %s FOR UPDATE",
                            (hostname,)).fetchone()
        recent = [retry_policy.HostAttempt(r["job_id"], r["cause"], r["signature"])
                  for r in conn.execute(HOST_RECENT_ATTEMPTS, {
                      "hostname": hostname, "since": host["counts_since"] if host else -1.0,
                      "k": retry_policy.QUARANTINE_AFTER}).fetchall()]
        signatures = [a.signature for a in recent if a.signature]
        found = conn.execute(SIGNATURE_ELSEWHERE, {"hostname": hostname,
                                                   "signatures": signatures}).fetchone()
        reason = retry_policy.quarantine_reason(recent, bool(found and found["found"]))
        if reason is None:
            return
        until = now + retry_policy.cool_off_s(host["quarantines"] if host else 0)
        conn.execute(QUARANTINE_HOST, {"hostname": hostname, "until": until, "reason": reason,
                                       "now": now})

    def release_host(self, hostname: str, now: float | None = None) -> HostRelease:
        """Lift a host's quarantine; its earlier attempts no longer count towards another."""
        with self._tx() as conn:
            now = self._clock(conn, now)
            host = conn.execute(
                "SELECT * FROM hosts WHERE hostname = %s AND quarantined_until > %s FOR UPDATE",
                (hostname, now)).fetchone()
            if host is None:
                raise NotFound(f"host {hostname!r} is not quarantined",
                               detail={"hostname": hostname})
            conn.execute("UPDATE hosts SET quarantined_until = NULL, counts_since = %s "
                         "WHERE hostname = %s", (now, hostname))
        return HostRelease(hostname, host["quarantined_until"], host["quarantine_reason"])

    def _failure(
        self, conn: Conn, row: Mapping[str, Any], cause: Cause | None, signature: str | None,
        peak_vram_gib: float | None,
    ) -> retry_policy.Failure:
        """The failed attempt with what its slot had, from the worker's last claim."""
        worker = conn.execute(FAILURE_SLOT, (row["worker_id"],)).fetchone()
        return retry_policy.Failure(
            cause, signature, row["hostname"], worker["slot_vram_gib"] if worker else 0.0,
            worker["ram_gib"] if worker else 0.0, peak_vram_gib)

    def _same_signature(
        self, conn: Conn, failure: retry_policy.Failure, row: Mapping[str, Any]
    ) -> tuple[str, ...]:
        if not failure.signature:
            return ()
        found = conn.execute(SAME_SIGNATURE_HOSTS, {
            "job_id": row["job_id"], "signature": failure.signature,
            "hostname": failure.hostname}).fetchall()
        return tuple(r["hostname"] for r in found)

    def _finish(
        self, conn: Conn, row: Mapping[str, Any], retry: bool, outcome: str, error: str,
        charged: int, lost: int, now: float,
    ) -> dict[str, Any]:
        status = Status.PENDING if retry else Status.FAILED
        done = conn.execute(FINISH, {
            "status": status.value, "error": error, "charged": charged, "lost": lost,
            "retry": retry, "now": now, "job_id": row["job_id"],
        }).fetchone()
        assert done is not None
        self._end_attempt(conn, row, outcome, error, now)
        self._event(conn, row["job_id"], "failed", now, row["attempts"], row["worker_id"],
                    outcome=outcome, error=error[-2000:], retry=retry)
        return done

    def sweep_stale(self, now: float | None = None, since: float = 0.0) -> list[str]:
        """Requeue (or fail, once out of attempts) live jobs whose worker went silent.

        `since` is the sweeping receiver's start: silence before it never counts.
        """
        with self._connection() as conn:
            rows = conn.execute(SWEEP, {"now": now, "since": since,
                                        "stale_after_s": self.stale_after_s}).fetchall()
        return [row["job_id"] for row in rows]

    def reschedule(self, now: float | None = None) -> Rescheduled:
        """Mark waiting jobs no worker ever seen can run unschedulable, and back again."""
        with self._tx() as conn:
            return self._reschedule(conn, self._clock(conn, now))

    def _reschedule(self, conn: Conn, now: float) -> Rescheduled:
        conn.execute(CUSTOM_PLANS)  # SET_SCHEDULABILITY from 'unschedulable' walks its index
        seen = [w.slot(quarantine=False) for w in self._workers(conn, now)]
        marked: list[str] = []
        restored: list[str] = []
        for group in conn.execute(NEEDS_GROUPS).fetchall():
            needs = JobNeeds(group["model"], group["require_cuda"], group["min_vram_gib"],
                             group["min_ram_gib"], group["raised_vram_gib"],
                             group["raised_ram_gib"], tuple(group["allowed_hosts"]),
                             group["gpus"])
            reason = matching.unschedulable_reason(needs, seen)
            params = {**group, "allowed_hosts": Jsonb(group["allowed_hosts"]), "error": reason,
                      "now": now}
            if reason is None:
                restored += self._move(conn, params, Status.UNSCHEDULABLE, Status.PENDING)
            else:
                moved = self._move(conn, params, Status.PENDING, Status.UNSCHEDULABLE)
                for job_id in moved:
                    self._event(conn, job_id, "unschedulable", now, reason=reason)
                marked += moved
                self._move(conn, params, Status.UNSCHEDULABLE, Status.UNSCHEDULABLE)
        for job_id in restored:
            self._event(conn, job_id, "schedulable", now)
        return Rescheduled(tuple(marked), tuple(restored))

    def _move(self, conn: Conn, params: dict[str, Any], old: Status, new: Status) -> list[str]:
        rows = conn.execute(SET_SCHEDULABILITY, {**params, "old": old.value, "new": new.value})
        return [r["job_id"] for r in rows.fetchall()]

    def attempt_lease_matches(self, job_id: str, attempt: int, lease: str) -> bool:
        """Whether `lease` was handed out for that attempt (logs arrive after the attempt ends)."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT lease FROM attempts WHERE job_id = %s AND attempt = %s", (job_id, attempt)
            ).fetchone()
        return row is not None and same_lease(row["lease"], lease)

    def log_tail(self, job_id: str) -> str | None:
        """The log tail of the latest heartbeat."""
        with self._connection() as conn:
            row = conn.execute("SELECT log_tail FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        tail: str | None = row["log_tail"]
        return tail

    # -- the operator's calls ---------------------------------------------

    def cancel(self, job_id: str, now: float | None = None) -> Job:
        """Stop a pending or live job; its worker learns it from the next heartbeat."""
        with self._tx() as conn:
            row = self._lock_job(conn, job_id, now)
            now = float(row["clock"])
            if row["status"] not in (Status.PENDING, Status.UNSCHEDULABLE, *LIVE):
                raise IllegalTransition(job_id, row["status"], "cancel")
            done = conn.execute(
                "UPDATE jobs SET status = 'cancelled', error = 'cancelled by operator', "
                "updated_at = %s WHERE job_id = %s RETURNING *",
                (now, job_id),
            ).fetchone()
            assert done is not None
            if row["status"] in LIVE:
                self._end_attempt(conn, row, "cancelled", "cancelled by operator", now)
            self._event(conn, job_id, "cancelled", now, row["attempts"], row["worker_id"])
            return job_from_row(done)

    def requeue(self, job_id: str, now: float | None = None) -> Job:
        """Give a failed or cancelled job a fresh set of attempts."""
        with self._tx() as conn:
            row = self._lock_job(conn, job_id, now)
            now = float(row["clock"])
            if row["status"] not in (Status.FAILED, Status.CANCELLED):
                raise IllegalTransition(job_id, row["status"], "requeue")
            done = conn.execute(
                "UPDATE jobs SET status = 'pending', lease = NULL, attempts_charged = 0, "
                "lost_count = 0, error = NULL, progress = NULL, avoid_hosts = '[]', "
                "pending_since = %s, updated_at = %s WHERE job_id = %s RETURNING *",
                (now, now, job_id),
            ).fetchone()
            assert done is not None
            self._event(conn, job_id, "requeued", now, row["attempts"])
            return job_from_row(done)

    # -- reads ------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        with self._connection() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return job_from_row(row)

    def resolve(self, ref: str) -> str:
        """A job id from a name, a full id or a unique id prefix of at least 8 hex digits."""
        prefix = ref.lower()
        if len(prefix) < 8 or len(prefix) > 64 or not set(prefix) <= HEX:
            prefix = ""  # cannot be an id: the empty range below finds nothing
        with self._connection() as conn:  # a name wins over an id prefix; one round trip
            found = conn.execute(RESOLVE, {"name": ref, "low": prefix or "g",
                                           "high": prefix + "g"}).fetchall()
        named = [r for r in found if r["by_name"]]
        if named:
            return str(named[0]["job_id"])
        ids = [str(r["job_id"]) for r in found if not r["by_name"]]
        if not ids:
            raise JobNotFound(ref.lower())
        if len(ids) > 1:
            raise AmbiguousJobId(prefix, ids)
        return ids[0]

    def list_jobs(
        self, status: str | None = None, model: str | None = None, host: str | None = None
    ) -> list[Job]:
        if status is not None and status not in {s.value for s in Status}:
            raise BadRequest(
                f"status: expected one of {', '.join(s.value for s in Status)}, got {status!r}"
            )
        with self._tx() as conn:
            conn.execute(CUSTOM_PLANS)  # a live status walks jobs_live
            rows = conn.execute(
                "SELECT * FROM jobs WHERE (%(status)s::text IS NULL OR status = %(status)s) "
                "AND (%(model)s::text IS NULL OR model = %(model)s) "
                "AND (%(host)s::text IS NULL OR hostname = %(host)s) "
                "ORDER BY orphaned, manifest_index, created_at, job_id",
                {"status": status, "model": model, "host": host},
            ).fetchall()
        return [job_from_row(row) for row in rows]

    def history(self, job_id: str) -> list[Event]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT * FROM events WHERE job_id = %s ORDER BY id", (job_id,)
            ).fetchall()
        return [
            Event(r["job_id"], r["at"], r["kind"], r["attempt"], r["worker_id"], r["detail"])
            for r in rows
        ]

    def attempts(self, job_id: str) -> list[Attempt]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT * FROM attempts WHERE job_id = %s ORDER BY attempt", (job_id,)
            ).fetchall()
        return [attempt_from_row(r) for r in rows]

    def workers(self, now: float | None = None) -> list[WorkerInfo]:
        with self._connection() as conn:
            return self._workers(conn, now)

    def _workers(self, conn: Conn, now: float | None) -> list[WorkerInfo]:
        held: dict[str, list[tuple[str, str]]] = {}
        for r in conn.execute(
            "SELECT worker_id, job_id, name FROM jobs WHERE status IN ('claimed', 'running') "
            "ORDER BY job_id"
        ):
            held.setdefault(r["worker_id"], []).append((r["job_id"], r["name"]))
        live = {job_id: name for jobs in held.values() for job_id, name in jobs}
        rows = conn.execute(
            f"SELECT w.*, w.last_seen >= {CLOCK} - %(stale_after_s)s AS alive, "
            "h.quarantined_until, h.quarantine_reason FROM workers AS w "
            f"LEFT JOIN hosts AS h ON h.hostname = w.hostname AND h.quarantined_until > {CLOCK} "
            "ORDER BY w.hostname, w.worker_id",
            {"now": now, "stale_after_s": self.stale_after_s},
        ).fetchall()
        return with_host_gpus([
            WorkerInfo(
                worker_id=r["worker_id"], hostname=r["hostname"],
                capability=Capability.from_dict(r["capability"]),
                policy=matching.Policy(
                    None if r["allow_jobs"] is None else frozenset(r["allow_jobs"]),
                    frozenset(r["deny_jobs"]),
                ),
                slot_vram_gib=r["slot_vram_gib"], first_seen=r["first_seen"],
                last_seen=r["last_seen"], alive=r["alive"],
                jobs=tuple(job_id for job_id, _ in held.get(r["worker_id"], ())),
                job_names=tuple(name for _, name in held.get(r["worker_id"], ())),
                quarantined_until=r["quarantined_until"],
                quarantine_reason=r["quarantine_reason"],
                lent_to=live.get(r["lent_to_job"] or ""),
            )
            for r in rows
        ])

    def counts(self) -> dict[str, int]:
        with self._connection() as conn:
            rows = conn.execute("SELECT status, count(*) AS n FROM jobs GROUP BY status")
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
        with self._connection() as conn:
            return self._insert_token(conn, hostname, kind, token_hash, expires_at,
                                      self._clock(conn, now))

    def _insert_token(
        self, conn: Conn, hostname: str, kind: TokenKind, token_hash: str,
        expires_at: float | None, now: float,
    ) -> TokenInfo:
        row = conn.execute(INSERT_TOKEN, {"token_hash": token_hash, "hostname": hostname,
                                          "kind": kind.value, "now": now,
                                          "expires_at": expires_at}).fetchone()
        assert row is not None
        return _token(row)

    def lookup_token(self, token_hash: str, now: float | None = None) -> TokenInfo | None:
        """The token stored under this hash, if it is active now; None otherwise."""
        with self._connection() as conn:
            row = conn.execute(
                f"SELECT t.*, {CLOCK} AS clock FROM tokens AS t WHERE token_hash = %(hash)s",
                {"now": now, "hash": token_hash},
            ).fetchone()
        info = None if row is None else _token(row)
        return info if info is not None and row is not None and info.active(row["clock"]) \
            else None

    def touch_token(self, token_hash: str, now: float | None = None) -> None:
        """Record a use of the token (one statement; callers throttle it)."""
        with self._connection() as conn:
            conn.execute(f"UPDATE tokens SET last_used_at = {CLOCK} WHERE token_hash = %(hash)s",
                         {"now": now, "hash": token_hash})

    def has_worker_tokens(self) -> bool:
        """Whether a per-host worker token was ever issued (then worker calls need a token)."""
        if self._worker_tokens_seen:  # tokens are never deleted: once true, always true
            return True
        with self._connection() as conn:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM tokens WHERE kind = 'worker') AS any"
            ).fetchone()
        self._worker_tokens_seen = bool(row and row["any"])
        return self._worker_tokens_seen

    def redeem_enroll_code(
        self, code_hash: str, hostname: str, new_token_hash: str, now: float | None = None
    ) -> TokenInfo:
        """Exchange a one-time code for a worker token of its host, in one transaction."""
        with self._tx() as conn:
            now = self._clock(conn, now)
            row = conn.execute(
                "SELECT * FROM tokens WHERE token_hash = %s FOR UPDATE", (code_hash,)
            ).fetchone()
            check_enroll_code(None if row is None else _token(row), hostname, now)
            conn.execute("UPDATE tokens SET used_at = %s WHERE token_hash = %s", (now, code_hash))
            return self._insert_token(conn, hostname, TokenKind.WORKER, new_token_hash, None, now)

    def list_tokens(self) -> list[TokenInfo]:
        """Every token and code ever made, revoked ones included, by host then age."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT * FROM tokens ORDER BY hostname, created_at, token_hash"
            ).fetchall()
        return [_token(row) for row in rows]

    def revoke_host(self, hostname: str, now: float | None = None) -> RevokeResult:
        """Revoke the host's tokens and codes and sweep its live jobs at once."""
        with self._tx() as conn:
            now = self._clock(conn, now)
            rows = conn.execute(
                "SELECT * FROM tokens WHERE hostname = %s FOR UPDATE", (hostname,)
            ).fetchall()
            active = [info for info in map(_token, rows) if info.active(now)]
            if not active:
                raise NotFound(f"host {hostname!r} has no active token or enrollment code",
                               detail={"hostname": hostname})
            conn.execute(
                "UPDATE tokens SET revoked_at = %s WHERE hostname = %s AND revoked_at IS NULL",
                (now, hostname),
            )
            live = conn.execute(HOST_LIVE_JOBS, (hostname,)).fetchall()
            why = f": host {hostname} revoked"
            requeued = tuple(self._lose(conn, row, now, why) for row in live)
        return RevokeResult(hostname, len(active), requeued)

    def _lose(self, conn: Conn, row: Mapping[str, Any], now: float, why: str = "") -> str:
        """Requeue (or fail, out of budget) a live job whose worker is gone; its id.

        The stale sweep does the same in one statement (SWEEP).
        """
        lost = row["lost_count"] + 1
        retry = lost < row["max_lost"] and row["attempts_charged"] < row["max_attempts"]
        error = f"lost worker {row['worker_id']}{why}"
        self._finish(conn, row, retry, FailureKind.LOST_WORKER.value, error,
                     row["attempts_charged"], lost, now)
        return str(row["job_id"])

    def grouped(self) -> AbstractAsyncContextManager[None]:
        """Nothing to group: each call commits on a pooled connection of its own."""
        return nullcontext()

    def close(self) -> None:
        self._pool.close()


# -- schema ------------------------------------------------------------------


def read_schema_version(conn: psycopg.Connection[Any]) -> int | None:
    """The database's schema version, or None when it has no trainfleet schema yet."""
    found = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
    if not found or not found[0]:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return None if row is None else int(row[0])


def upgrade_schema(url: str) -> int:
    """Create the schema, or bring an older one up to date; the version it is now.

    Refuses a schema newer than this release knows. Receivers opening at once take turns.
    """
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"{describe(url)}: cannot connect: {exc}") from exc
    with conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        version = read_schema_version(conn)
        if version is not None and version > SCHEMA_VERSION:
            raise TrainfleetError(
                f"{describe(url)}: schema version {version} is newer than this release "
                f"reads ({SCHEMA_VERSION}); upgrade trainfleet"
            )
        if version is None:
            schema = resources.files("trainfleet.queue").joinpath("postgres.sql").read_text()
            conn.execute(schema.encode())
        else:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                conn.execute(MIGRATIONS[step].encode())
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
    return SCHEMA_VERSION

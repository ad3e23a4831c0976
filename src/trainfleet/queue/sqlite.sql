-- trainfleet's SQLite schema (schema_version 3). Timestamps are unix seconds (REAL).
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS jobs (
    job_id           TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    model            TEXT NOT NULL,
    mode             TEXT NOT NULL,
    hyper            TEXT NOT NULL,            -- JSON object
    split_recipe     TEXT,
    train_hosts      TEXT NOT NULL,            -- JSON array
    seed             INTEGER NOT NULL,
    priority         INTEGER NOT NULL,
    require_cuda     INTEGER NOT NULL,
    prefer_cuda      INTEGER NOT NULL,
    min_vram_gib     REAL NOT NULL,
    min_ram_gib      REAL NOT NULL,
    allowed_hosts    TEXT NOT NULL,            -- JSON array; '[]' = any host
    max_attempts     INTEGER NOT NULL,
    max_lost         INTEGER NOT NULL DEFAULT 5,
    timeout_s        REAL NOT NULL,
    prefer_wait_s    REAL NOT NULL,
    manifest_index   INTEGER NOT NULL,
    orphaned         INTEGER NOT NULL DEFAULT 0,
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    attempts_charged INTEGER NOT NULL DEFAULT 0,  -- trainer errors + timeouts, vs max_attempts
    lost_count       INTEGER NOT NULL DEFAULT 0,  -- attempts lost with their worker, vs max_lost
    lease            TEXT,
    worker_id        TEXT,
    hostname         TEXT,
    progress         TEXT,                     -- JSON object
    log_tail         TEXT,
    error            TEXT,
    metrics          TEXT,                     -- JSON object
    artifact_id      TEXT,
    pending_since    REAL NOT NULL,
    claimed_at       REAL,
    heartbeat_at     REAL,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    raised_vram_gib  REAL NOT NULL DEFAULT 0,    -- after a CUDA OOM; effective = max(min, raised)
    raised_ram_gib   REAL NOT NULL DEFAULT 0,    -- after a RAM OOM or a kill
    avoid_hosts      TEXT NOT NULL DEFAULT '[]', -- JSON array: hosts it failed on
    stall_after_s    REAL NOT NULL DEFAULT 0,    -- 0: never failed as stalled
    progress_at      REAL,                       -- when this attempt's progress last moved
    checkpoint_interval_s REAL NOT NULL DEFAULT 300,  -- 0: no checkpoint uploads
    checkpoint_id    TEXT,                       -- the last checkpoint's artifact id
    checkpoint_at    REAL,                       -- when it was recorded
    gpus             INTEGER NOT NULL DEFAULT 0  -- GPUs of one host at once (0: CPU)
);

-- With more job classes than it seeks one by one, the claim walks both prefer_cuda runs of
-- this in rank order and merges them, so its cost does not grow with depth.
CREATE INDEX IF NOT EXISTS jobs_pending_rank
    ON jobs (prefer_cuda, priority DESC, manifest_index)
    WHERE status = 'pending' AND orphaned = 0;
-- Jobs by class (the hard constraints a slot can rule out wholesale), each class in rank
-- order: a claim skips every class its slot may not run, however many jobs it holds.
CREATE INDEX IF NOT EXISTS jobs_pending_class
    ON jobs (json_array(model, require_cuda, prefer_cuda, allowed_hosts), priority DESC,
             manifest_index)
    WHERE status = 'pending' AND orphaned = 0;
CREATE INDEX IF NOT EXISTS jobs_live
    ON jobs (heartbeat_at)
    WHERE status IN ('claimed', 'running');
CREATE INDEX IF NOT EXISTS jobs_name ON jobs (name);
-- Each claim looks for unschedulable jobs its slot could run: usually none, found at once.
CREATE INDEX IF NOT EXISTS jobs_unschedulable ON jobs (manifest_index)
    WHERE status = 'unschedulable';

CREATE TABLE IF NOT EXISTS attempts (
    job_id     TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    worker_id  TEXT NOT NULL,
    hostname   TEXT NOT NULL,
    lease      TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at   REAL,
    outcome    TEXT,
    error      TEXT,
    cause      TEXT,                           -- failures.Cause of a failed attempt
    signature  TEXT,                           -- its normalised error line
    peak_vram_gib REAL,
    PRIMARY KEY (job_id, attempt)
);

CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY,
    job_id    TEXT NOT NULL,
    at        REAL NOT NULL,
    kind      TEXT NOT NULL,
    attempt   INTEGER,
    worker_id TEXT,
    detail    TEXT NOT NULL DEFAULT '{}'       -- JSON object
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id);
-- Ended attempts only: a claim's new attempt (ended_at NULL) writes no entry, one page fewer
-- to fsync per claim; the quarantine's look at a host's ended attempts is all it serves.
CREATE INDEX IF NOT EXISTS attempts_host ON attempts (hostname, ended_at)
    WHERE ended_at IS NOT NULL;

-- Per-host scheduling state: a quarantine after repeated failures of one kind.
CREATE TABLE IF NOT EXISTS hosts (
    hostname          TEXT PRIMARY KEY,
    quarantined_until REAL,                    -- NULL: not quarantined (or released)
    quarantine_reason TEXT,
    quarantines       INTEGER NOT NULL DEFAULT 0,  -- so far: each cool-off doubles
    counts_since      REAL NOT NULL DEFAULT 0  -- attempts that ended earlier no longer count
);

CREATE TABLE IF NOT EXISTS workers (
    worker_id     TEXT PRIMARY KEY,
    hostname      TEXT NOT NULL,
    capability    TEXT NOT NULL,               -- JSON object
    allow_jobs    TEXT,                        -- JSON array or NULL (= any)
    deny_jobs     TEXT NOT NULL,               -- JSON array
    slot_vram_gib REAL NOT NULL,
    first_seen    REAL NOT NULL,
    last_seen     REAL NOT NULL,
    lent_to_job   TEXT                         -- the job a sibling slot borrowed it for
);

-- Per-host worker tokens and one-time enrollment codes. Only sha256 hashes are stored.
CREATE TABLE IF NOT EXISTS tokens (
    token_hash   TEXT PRIMARY KEY,             -- sha256 hex of the token
    hostname     TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('worker', 'enroll')),
    created_at   REAL NOT NULL,
    expires_at   REAL,                         -- NULL: never
    used_at      REAL,                         -- an enrollment code's redemption
    last_used_at REAL,
    revoked_at   REAL
);
CREATE INDEX IF NOT EXISTS tokens_host ON tokens (hostname);

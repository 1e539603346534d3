-- quern's queue on SQLite: the same tables as migrations/postgres, with
-- timestamps as integer microseconds since the Unix epoch, UUIDs as text and
-- JSON as text.

CREATE TABLE quern_jobs (
    id                 TEXT PRIMARY KEY,
    user_id            TEXT NOT NULL,
    type               TEXT NOT NULL,
    input              TEXT NOT NULL,
    result             TEXT,
    error              TEXT,
    status             TEXT NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    priority           INTEGER NOT NULL DEFAULT 5 CHECK (priority BETWEEN 1 AND 10),
    attempts           INTEGER NOT NULL DEFAULT 0,
    max_attempts       INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    run_at             INTEGER NOT NULL,
    lease_expires_at   INTEGER,
    worker_id          TEXT,
    handler_version    TEXT,
    progress_percent   INTEGER NOT NULL DEFAULT 0,
    progress_message   TEXT,
    processing_time_ms INTEGER,
    parent_id          TEXT REFERENCES quern_jobs (id) ON DELETE SET NULL,
    root_id            TEXT,
    next_steps         TEXT NOT NULL DEFAULT '[]',
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    started_at         INTEGER,
    completed_at       INTEGER
);

CREATE INDEX quern_jobs_claim ON quern_jobs (priority, run_at, created_at) WHERE status = 'pending';
CREATE INDEX quern_jobs_user ON quern_jobs (user_id, created_at DESC, id DESC);
CREATE INDEX quern_jobs_user_unfinished ON quern_jobs (user_id) WHERE status IN ('pending', 'processing');
CREATE INDEX quern_jobs_lease ON quern_jobs (lease_expires_at) WHERE status = 'processing';
CREATE INDEX quern_jobs_type_status ON quern_jobs (type, status);

CREATE TABLE quern_job_attempts (
    job_id          TEXT NOT NULL REFERENCES quern_jobs (id) ON DELETE CASCADE,
    attempt         INTEGER NOT NULL,
    worker_id       TEXT NOT NULL,
    handler_version TEXT,
    started_at      INTEGER NOT NULL,
    ended_at        INTEGER NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('completed', 'retry', 'failed', 'cancelled', 'lease_expired', 'released')),
    error           TEXT,
    PRIMARY KEY (job_id, attempt)
);

CREATE TABLE quern_cache (
    cache_key   TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    response    TEXT NOT NULL,
    hit_count   INTEGER NOT NULL DEFAULT 0,
    last_hit_at INTEGER,
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX quern_cache_expires ON quern_cache (expires_at);

CREATE TABLE quern_workers (
    id                TEXT PRIMARY KEY,
    host              TEXT NOT NULL,
    started_at        INTEGER NOT NULL,
    last_heartbeat_at INTEGER NOT NULL,
    active_jobs       INTEGER NOT NULL DEFAULT 0,
    concurrency       INTEGER NOT NULL,
    version           TEXT NOT NULL
);

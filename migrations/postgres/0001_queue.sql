-- quern's queue: jobs, their attempts, the result cache and the workers.
-- The seed's analysis_jobs / analysis_cache, extended: leases, attempts,
-- handler versions, progress and pipelines.

CREATE TABLE quern_jobs (
    id                 UUID PRIMARY KEY,
    user_id            TEXT NOT NULL,
    type               TEXT NOT NULL,
    input              JSONB NOT NULL,
    result             JSONB,
    error              TEXT,
    status             TEXT NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    priority           SMALLINT NOT NULL DEFAULT 5 CHECK (priority BETWEEN 1 AND 10),
    attempts           INTEGER NOT NULL DEFAULT 0,
    max_attempts       INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    run_at             TIMESTAMPTZ NOT NULL,
    lease_expires_at   TIMESTAMPTZ,
    worker_id          TEXT,
    handler_version    TEXT,
    progress_percent   SMALLINT NOT NULL DEFAULT 0,
    progress_message   TEXT,
    processing_time_ms INTEGER,
    parent_id          UUID REFERENCES quern_jobs (id) ON DELETE SET NULL,
    root_id            UUID,
    next_steps         JSONB NOT NULL DEFAULT '[]',
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL,
    started_at         TIMESTAMPTZ,
    completed_at       TIMESTAMPTZ
);

-- The claim reads pending jobs in priority order; partial, so finished jobs cost nothing.
CREATE INDEX quern_jobs_claim ON quern_jobs (priority, run_at, created_at) WHERE status = 'pending';
CREATE INDEX quern_jobs_user ON quern_jobs (user_id, created_at DESC, id DESC);
CREATE INDEX quern_jobs_user_unfinished ON quern_jobs (user_id) WHERE status IN ('pending', 'processing');
CREATE INDEX quern_jobs_lease ON quern_jobs (lease_expires_at) WHERE status = 'processing';
CREATE INDEX quern_jobs_type_status ON quern_jobs (type, status);

-- One row per attempt, so a user can see why each one failed.
CREATE TABLE quern_job_attempts (
    job_id          UUID NOT NULL REFERENCES quern_jobs (id) ON DELETE CASCADE,
    attempt         INTEGER NOT NULL,
    worker_id       TEXT NOT NULL,
    handler_version TEXT,
    started_at      TIMESTAMPTZ NOT NULL,
    ended_at        TIMESTAMPTZ NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('completed', 'retry', 'failed', 'cancelled', 'lease_expired', 'released')),
    error           TEXT,
    PRIMARY KEY (job_id, attempt)
);

CREATE TABLE quern_cache (
    cache_key   TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    response    JSONB NOT NULL,
    hit_count   BIGINT NOT NULL DEFAULT 0,
    last_hit_at TIMESTAMPTZ,
    expires_at  TIMESTAMPTZ NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX quern_cache_expires ON quern_cache (expires_at);

CREATE TABLE quern_workers (
    id                TEXT PRIMARY KEY,
    host              TEXT NOT NULL,
    started_at        TIMESTAMPTZ NOT NULL,
    last_heartbeat_at TIMESTAMPTZ NOT NULL,
    active_jobs       INTEGER NOT NULL DEFAULT 0,
    concurrency       INTEGER NOT NULL,
    version           TEXT NOT NULL
);

-- The job types some worker has served, and when one last said so (see the
-- PostgreSQL migration of the same name).
CREATE TABLE IF NOT EXISTS quern_job_types (
    type         TEXT PRIMARY KEY,
    last_seen_at INTEGER NOT NULL
);

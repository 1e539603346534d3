-- The job types some worker has served, and when one last said so: what an
-- insert that does not go through quern's API (the Supabase `analysis_jobs`
-- view) is checked against, as the seed's CHECK on `type` did.
CREATE TABLE IF NOT EXISTS quern_job_types (
    type         TEXT PRIMARY KEY,
    last_seen_at TIMESTAMPTZ NOT NULL
);

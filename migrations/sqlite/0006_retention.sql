-- Retention deletes finished jobs by status and age, a bounded batch at a
-- time: this index finds them without reading the table. It replaces the
-- failed-only index, which served the dashboard's latest failures; those
-- are the ('failed', …) part of this one. Unfinished jobs have no
-- completed_at, so they cost it nothing.
DROP INDEX IF EXISTS quern_jobs_failed;
CREATE INDEX IF NOT EXISTS quern_jobs_finished ON quern_jobs (status, completed_at) WHERE completed_at IS NOT NULL;

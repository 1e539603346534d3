-- What the dashboard and the alerts read: attempts by when they ended, and
-- the latest failed jobs.
CREATE INDEX quern_job_attempts_ended ON quern_job_attempts (ended_at);
CREATE INDEX quern_jobs_failed ON quern_jobs (completed_at DESC) WHERE status = 'failed';

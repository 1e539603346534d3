-- Seed 004's job-system views over quern's jobs (`quern migrate --supabase`),
-- so its monitoring queries run as written:
--   SELECT * FROM job_stats ORDER BY count DESC;
--   SELECT type, status, COUNT(*) FROM jobs GROUP BY type, status;
--   SELECT * FROM jobs WHERE status = 'processing' AND started_at < NOW() - INTERVAL '10 minutes';
-- Read through the caller's own rights (security_invoker): a user sees only
-- their jobs in them, the service role all. Safe to apply again.

-- Jobs by type and status: how many, and how long they ran and waited.
CREATE OR REPLACE VIEW job_stats WITH (security_invoker = true) AS
    SELECT type, status, count(*) AS count,
           round(avg(processing_time_ms))::bigint AS avg_processing_time_ms,
           max(processing_time_ms) AS max_processing_time_ms,
           round(avg(extract(epoch FROM (started_at - created_at)) * 1000))::bigint AS avg_wait_ms,
           min(created_at) AS oldest_created_at,
           max(updated_at) AS last_updated_at
    FROM quern_jobs
    GROUP BY type, status;

-- Jobs running now, longest-running first, with the worker holding each.
CREATE OR REPLACE VIEW active_jobs WITH (security_invoker = true) AS
    SELECT id, user_id, type, status, priority, attempts, max_attempts, worker_id, handler_version,
           progress_percent, progress_message, lease_expires_at, root_id, created_at, started_at,
           now() - started_at AS running_for
    FROM quern_jobs
    WHERE status = 'processing'
    ORDER BY started_at;

-- Pending jobs in the order workers claim them (priority, then run time,
-- then age), with their place in the queue.
CREATE OR REPLACE VIEW pending_jobs_queue WITH (security_invoker = true) AS
    SELECT row_number() OVER (ORDER BY priority, run_at, created_at) AS position,
           id, user_id, type, priority, attempts, max_attempts, run_at, root_id, created_at,
           now() - created_at AS waiting_for
    FROM quern_jobs
    WHERE status = 'pending'
    ORDER BY priority, run_at, created_at;

-- The seed's `jobs` table, read-only, where the project has no `jobs` of its own.
DO $$
BEGIN
    IF to_regclass(format('%I.jobs', current_schema())) IS NULL
       OR EXISTS (SELECT 1 FROM pg_views WHERE schemaname = current_schema() AND viewname = 'jobs'
                  AND definition LIKE '%quern_jobs%') THEN
        CREATE OR REPLACE VIEW jobs WITH (security_invoker = true) AS
            SELECT id, user_id, type, status, input, result, error, priority, attempts, max_attempts, worker_id,
                   processing_time_ms, parent_id, root_id, run_at, created_at, updated_at, started_at, completed_at
            FROM quern_jobs;
        GRANT SELECT ON jobs TO authenticated, service_role;
    ELSE
        RAISE NOTICE 'a relation named jobs exists and is not quern''s: the seed''s `jobs` view was not created';
    END IF;
END $$;

GRANT SELECT ON job_stats, active_jobs, pending_jobs_queue TO authenticated, service_role;

-- Moves the seed's own tables aside and into quern (`quern migrate --supabase
-- --apply` on a database where seed 000's migration
-- 20260117_create_async_jobs_system.sql made `analysis_jobs` and
-- `analysis_cache` tables). Run in one transaction with analysis_jobs.sql
-- after it, which puts the views in their place; seed_revert.sql undoes it.
--
-- - The tables are renamed, not dropped: `analysis_jobs_seed` and
--   `analysis_cache_seed` keep every row, index, policy, trigger and the
--   foreign key to auth.users, for the way back.
-- - Every job is imported with its id: finished ones as history; pending ones
--   as jobs that run; processing ones, whose old worker is gone, as pending
--   again with their attempts kept and one more allowed.
-- - Every cache entry is imported (its key is the seed's, which quern's
--   lookups never compute, so it is history and hit counts, not hits).
-- Stop the seed's worker first: a job it finishes after the move stays
-- finished only in analysis_jobs_seed.

ALTER TABLE analysis_jobs RENAME TO analysis_jobs_seed;

INSERT INTO quern_jobs (id, user_id, type, input, result, error, status, priority, attempts, max_attempts, run_at,
                        worker_id, processing_time_ms, created_at, updated_at, started_at, completed_at)
SELECT id, user_id::text, type, input, result, error,
       CASE WHEN status = 'processing' THEN 'pending' ELSE status END,
       priority, attempts,
       CASE WHEN status IN ('pending', 'processing') THEN greatest(max_attempts, attempts + 1) ELSE max_attempts END,
       CASE WHEN status IN ('pending', 'processing') THEN now() ELSE created_at END,
       CASE WHEN status = 'processing' THEN NULL ELSE worker_id END,
       processing_time_ms, created_at, updated_at,
       CASE WHEN status = 'processing' THEN NULL ELSE started_at END,
       completed_at
FROM analysis_jobs_seed
ON CONFLICT (id) DO NOTHING;

DO $$
BEGIN
    IF to_regclass(format('%I.analysis_cache', current_schema())) IS NOT NULL
       AND (SELECT relkind FROM pg_class WHERE oid = to_regclass(format('%I.analysis_cache', current_schema()))) = 'r' THEN
        ALTER TABLE analysis_cache RENAME TO analysis_cache_seed;
        INSERT INTO quern_cache (cache_key, type, response, hit_count, last_hit_at, expires_at, created_at)
        SELECT cache_key, type, response, hit_count, last_hit_at, expires_at, created_at FROM analysis_cache_seed
        ON CONFLICT (cache_key) DO NOTHING;
    END IF;
END $$;

-- The imported pending jobs wake the workers at commit.
SELECT pg_notify('quern_jobs', '');

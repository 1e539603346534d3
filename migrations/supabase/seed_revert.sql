-- The way back from seed_move.sql (`quern migrate --supabase --revert
-- --apply`): the seed's tables return under their names, with what quern
-- did meanwhile, so the seed's worker and functions take over again.
--
-- - Every job quern holds that the seed's table can hold (its six types, a
--   user that exists in auth.users) is written into it: imported ones with
--   their outcome in quern, new ones as they are; a running one goes back
--   as pending. Jobs the seed's table cannot hold stay in quern_jobs only.
-- - Those of them not finished are cancelled in quern, so nothing runs in
--   both: stop quern's workers or not, no job runs twice.
-- - The views go; `cleanup_expired_cache()` is the seed's again.

INSERT INTO analysis_jobs_seed (id, user_id, type, input, result, error, status, priority, attempts, max_attempts,
                                processing_time_ms, worker_id, created_at, updated_at, started_at, completed_at)
SELECT q.id, q.user_id::uuid, q.type, q.input, q.result, q.error,
       CASE WHEN q.status = 'processing' THEN 'pending' ELSE q.status END,
       q.priority, q.attempts, q.max_attempts, q.processing_time_ms, q.worker_id, q.created_at, q.updated_at,
       q.started_at, q.completed_at
FROM quern_jobs q
WHERE q.type IN ('sofia_image', 'sofia_text', 'medical_exam', 'unified_assistant', 'meal_plan', 'whatsapp_message')
  AND q.user_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
  AND EXISTS (SELECT 1 FROM auth.users u WHERE u.id::text = lower(q.user_id))
ON CONFLICT (id) DO UPDATE SET
    status = EXCLUDED.status, result = EXCLUDED.result, error = EXCLUDED.error, attempts = EXCLUDED.attempts,
    max_attempts = EXCLUDED.max_attempts, processing_time_ms = EXCLUDED.processing_time_ms,
    worker_id = EXCLUDED.worker_id, started_at = EXCLUDED.started_at, completed_at = EXCLUDED.completed_at;

UPDATE quern_jobs q SET status = 'cancelled', completed_at = now(), updated_at = now(), lease_expires_at = NULL,
       error = 'moved back to the seed''s analysis_jobs by quern migrate --supabase --revert'
WHERE q.status IN ('pending', 'processing')
  AND EXISTS (SELECT 1 FROM analysis_jobs_seed s WHERE s.id = q.id);

DROP VIEW IF EXISTS analysis_jobs;
DROP VIEW IF EXISTS analysis_cache;
ALTER TABLE analysis_jobs_seed RENAME TO analysis_jobs;

DO $$
BEGIN
    IF to_regclass(format('%I.analysis_cache_seed', current_schema())) IS NOT NULL THEN
        ALTER TABLE analysis_cache_seed RENAME TO analysis_cache;
    END IF;
END $$;

-- The seed's own definition, as its migration wrote it.
CREATE OR REPLACE FUNCTION cleanup_expired_cache()
RETURNS void AS $$
BEGIN
  DELETE FROM analysis_cache WHERE expires_at < NOW();
END;
$$ LANGUAGE plpgsql;

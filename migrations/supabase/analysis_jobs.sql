-- Supabase compatibility (`quern migrate --supabase`): the seed's
-- `analysis_jobs` as a view of quern's jobs, with the seed's row-level
-- security, so the frontend's direct reads and its direct cancel
-- (`supabase.from('analysis_jobs').update({status: 'cancelled'})`) keep
-- working through PostgREST. Needs Supabase's `auth.uid()` and its roles
-- `authenticated` and `service_role`. Safe to apply again.

-- Owners read their own jobs; the service role reads and writes all.
-- (quern itself connects as the tables' owner, which RLS does not restrict.)
ALTER TABLE quern_jobs ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS quern_jobs_owner_reads ON quern_jobs;
CREATE POLICY quern_jobs_owner_reads ON quern_jobs FOR SELECT TO authenticated
    USING (user_id = auth.uid()::text);

-- Owners may cancel their own unfinished jobs, and change nothing else
-- (the column grant below allows `status` only; the check allows only
-- `cancelled`). Workers notice within 250 ms and stop the instance.
DROP POLICY IF EXISTS quern_jobs_owner_cancels ON quern_jobs;
CREATE POLICY quern_jobs_owner_cancels ON quern_jobs FOR UPDATE TO authenticated
    USING (user_id = auth.uid()::text AND status IN ('pending', 'processing'))
    WITH CHECK (user_id = auth.uid()::text AND status = 'cancelled');

DROP POLICY IF EXISTS quern_jobs_service_role ON quern_jobs;
CREATE POLICY quern_jobs_service_role ON quern_jobs FOR ALL TO service_role
    USING (true) WITH CHECK (true);

-- A cancel made by a plain UPDATE gets what quern's own cancel writes.
CREATE OR REPLACE FUNCTION quern_stamp_cancel() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'cancelled' AND OLD.status <> 'cancelled' THEN
        NEW.completed_at := coalesce(NEW.completed_at, now());
        NEW.updated_at := now();
        NEW.error := coalesce(NEW.error, 'cancelled');
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS quern_stamp_cancel ON quern_jobs;
CREATE TRIGGER quern_stamp_cancel BEFORE UPDATE OF status ON quern_jobs
    FOR EACH ROW EXECUTE FUNCTION quern_stamp_cancel();

-- The seed's columns, read through the caller's own rights (RLS applies).
CREATE OR REPLACE VIEW analysis_jobs WITH (security_invoker = true) AS
    SELECT id, user_id, type, input, result, error, status, priority, attempts, max_attempts,
           processing_time_ms, worker_id, created_at, updated_at, started_at, completed_at
    FROM quern_jobs;

DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO authenticated, service_role', current_schema());
END $$;
GRANT SELECT, UPDATE (status) ON quern_jobs TO authenticated;
GRANT SELECT, UPDATE (status) ON analysis_jobs TO authenticated;
GRANT ALL ON quern_jobs, analysis_jobs TO service_role;

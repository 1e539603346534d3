-- Supabase compatibility (`quern migrate --supabase`): the seed's
-- `analysis_jobs` as a view of quern's jobs, with the seed's row-level
-- security, so the frontend's direct reads and its direct cancel
-- (`supabase.from('analysis_jobs').update({status: 'cancelled'})`) keep
-- working through PostgREST; a service-role `insert` into it enqueues (the
-- seed's defaults filled, workers woken); `analysis_cache` and
-- `cleanup_expired_cache()` as the seed has them; deleting a user from
-- `auth.users` deletes their jobs, as the seed's `ON DELETE CASCADE` did.
-- Needs Supabase's `auth.uid()`, `auth.users` and its roles `authenticated`
-- and `service_role`. Safe to apply again.

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

-- An update made through Supabase's roles (PostgREST: the app, the seed's
-- worker) moves `updated_at`, as the seed's `update_analysis_jobs_updated_at`
-- trigger did; quern's own writes set it themselves, so the trigger never
-- runs on the queue's hot path.
CREATE OR REPLACE FUNCTION quern_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS quern_touch_updated_at ON quern_jobs;
CREATE TRIGGER quern_touch_updated_at BEFORE UPDATE ON quern_jobs
    FOR EACH ROW WHEN (current_user IN ('anon', 'authenticated', 'service_role'))
    EXECUTE FUNCTION quern_touch_updated_at();

-- Views whose columns changed type since an earlier version of this file
-- (`user_id` uuid, `hit_count` bigint) are made anew; a table of the same
-- name (the seed's own) is never touched here.
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['analysis_jobs', 'analysis_cache'] LOOP
        IF (SELECT relkind FROM pg_class WHERE oid = to_regclass(format('%I.%I', current_schema(), name))) = 'v' THEN
            EXECUTE format('DROP VIEW %I.%I', current_schema(), name);
        END IF;
    END LOOP;
END $$;

-- The seed's columns, read through the caller's own rights (RLS applies).
-- `user_id` is a uuid as in the seed's table (its foreign key to
-- auth.users); a job of no user (a service caller's, a webhook's) reads null.
CREATE VIEW analysis_jobs WITH (security_invoker = true) AS
    SELECT id,
           CASE WHEN user_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                THEN user_id::uuid END AS user_id,
           type, input, result, error, status, priority, attempts, max_attempts,
           processing_time_ms, worker_id, created_at, updated_at, started_at, completed_at
    FROM quern_jobs;

DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO authenticated, service_role', current_schema());
END $$;
GRANT SELECT, UPDATE (status) ON quern_jobs TO authenticated;
GRANT SELECT, UPDATE (status) ON analysis_jobs TO authenticated;
GRANT ALL ON quern_jobs, analysis_jobs TO service_role;

-- The seed's `insert({type, input, priority, user_id}).select().single()`
-- as the service role: the seed's defaults, a run time of now, and the
-- workers' wake-up, as quern's own enqueue sends it.
CREATE OR REPLACE FUNCTION quern_insert_analysis_job() RETURNS trigger LANGUAGE plpgsql
    SET search_path FROM CURRENT AS $$
DECLARE
    at timestamptz := now();
BEGIN
    NEW.id := coalesce(NEW.id, gen_random_uuid());
    NEW.status := coalesce(NEW.status, 'pending');
    NEW.priority := coalesce(NEW.priority, 5);
    NEW.attempts := coalesce(NEW.attempts, 0);
    NEW.max_attempts := coalesce(NEW.max_attempts, 3);
    NEW.created_at := coalesce(NEW.created_at, at);
    NEW.updated_at := coalesce(NEW.updated_at, at);
    IF NEW.user_id IS NULL THEN
        RAISE EXCEPTION 'analysis_jobs.user_id is required: the user the job is for (a uuid of auth.users)'
            USING ERRCODE = 'not_null_violation';
    END IF;
    -- The seed's CHECK listed its six types; here, the types a worker serves.
    IF NOT EXISTS (SELECT 1 FROM quern_job_types t WHERE t.type = NEW.type) THEN
        RAISE EXCEPTION 'analysis_jobs.type % is not a job type any worker serves (GET /v1/types lists them)',
            coalesce(quote_literal(NEW.type), 'null')
            USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO quern_jobs (id, user_id, type, input, result, error, status, priority, attempts, max_attempts,
                            processing_time_ms, worker_id, run_at, created_at, updated_at, started_at, completed_at)
    VALUES (NEW.id, NEW.user_id::text, NEW.type, NEW.input, NEW.result, NEW.error, NEW.status, NEW.priority, NEW.attempts,
            NEW.max_attempts, NEW.processing_time_ms, NEW.worker_id, at, NEW.created_at, NEW.updated_at,
            NEW.started_at, NEW.completed_at);
    PERFORM pg_notify('quern_jobs', '');
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS quern_insert_analysis_job ON analysis_jobs;
CREATE TRIGGER quern_insert_analysis_job INSTEAD OF INSERT ON analysis_jobs
    FOR EACH ROW EXECUTE FUNCTION quern_insert_analysis_job();
GRANT INSERT ON analysis_jobs TO service_role;
GRANT SELECT ON quern_job_types TO service_role;

-- The seed's cache table, as a view of quern's (quern keys entries by type,
-- handler version, scope and input, so its keys are not the seed's). Simple
-- enough to write through: the seed's worker, still running as a canary,
-- upserts entries (`ON CONFLICT (cache_key)`) and counts hits through it.
ALTER TABLE quern_cache ALTER COLUMN created_at SET DEFAULT now();
CREATE VIEW analysis_cache WITH (security_invoker = true) AS
    SELECT md5(cache_key)::uuid AS id, cache_key, type, response, hit_count, last_hit_at, expires_at, created_at
    FROM quern_cache;
GRANT SELECT, INSERT, UPDATE, DELETE ON quern_cache, analysis_cache TO service_role;

CREATE OR REPLACE FUNCTION cleanup_expired_cache() RETURNS void LANGUAGE plpgsql
    SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM quern_cache WHERE expires_at < now();
END $$;
REVOKE ALL ON FUNCTION cleanup_expired_cache() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cleanup_expired_cache() TO service_role;

-- A user deleted from auth.users takes their jobs along. The function runs
-- with its owner's rights (Supabase's auth service deletes users, not quern).
CREATE OR REPLACE FUNCTION quern_delete_user_jobs() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
    SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM quern_jobs WHERE user_id = OLD.id::text;
    RETURN OLD;
END $$;
REVOKE ALL ON FUNCTION quern_delete_user_jobs() FROM PUBLIC;
-- One trigger per schema quern lives in (named after it), so two quern
-- databases in one project, or a test schema beside `public`, each clean up their own.
DO $$
BEGIN
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER %I AFTER DELETE ON auth.users FOR EACH ROW EXECUTE FUNCTION %I.quern_delete_user_jobs()',
        'quern_delete_jobs_' || current_schema(), current_schema());
END $$;

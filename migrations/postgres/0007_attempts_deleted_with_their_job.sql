-- An attempt row is only ever written by the statement that ends the
-- attempt, joined to its job's guarded update, so it cannot name a missing
-- job; the foreign key checked that again for every row written (a lookup
-- of the job per attempt: about 6 µs of database time per job, a tenth of
-- what ending an attempt costs). What the key also did, deleting a job's
-- attempts with it, is kept: a trigger does it once per deleting statement,
-- whoever deletes (retention, the Supabase user-deletion trigger, an operator,
-- Supabase's service role). Like the key's cascade, it runs with the table
-- owner's rights: a role allowed to delete jobs needs none on the attempts.
ALTER TABLE quern_job_attempts DROP CONSTRAINT IF EXISTS quern_job_attempts_job_id_fkey;

CREATE OR REPLACE FUNCTION quern_delete_attempts_of_deleted_jobs() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM quern_job_attempts AS a USING deleted_jobs AS d WHERE a.job_id = d.id;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION quern_delete_attempts_of_deleted_jobs() FROM PUBLIC;

CREATE TRIGGER quern_jobs_delete_attempts AFTER DELETE ON quern_jobs
    REFERENCING OLD TABLE AS deleted_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION quern_delete_attempts_of_deleted_jobs();

-- A pipeline's jobs are found by their first job (`root_id`): a cancel stops
-- the chain's unfinished step. `parent_id` is a foreign key to the same
-- table: without an index, deleting a job scans the whole table for jobs
-- naming it. Both are empty for jobs outside a pipeline, so the indexes are
-- partial and cost those jobs nothing.
CREATE INDEX IF NOT EXISTS quern_jobs_root ON quern_jobs (root_id) WHERE root_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS quern_jobs_parent ON quern_jobs (parent_id) WHERE parent_id IS NOT NULL;

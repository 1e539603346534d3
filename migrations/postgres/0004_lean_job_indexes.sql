-- Every change of a job's status writes a new row version into every index
-- of quern_jobs. The (type, status) index had a handful of distinct keys, so
-- each of those writes landed in the same few leaf pages of long duplicate
-- lists: it cost more per claim and per completion than any other index.
-- The counts by type read the unfinished jobs through the partial indexes
-- instead.
DROP INDEX IF EXISTS quern_jobs_type_status;

-- A worker claims only the types it has handlers for. Ordered by priority
-- alone, the claim index made it step over every pending job of the other
-- types (a paused type's backlog, another pool's work) on each claim. With
-- the type first, each type is read from the top of its own part.
DROP INDEX IF EXISTS quern_jobs_claim;
CREATE INDEX quern_jobs_claim ON quern_jobs (type, priority, run_at, created_at) WHERE status = 'pending';

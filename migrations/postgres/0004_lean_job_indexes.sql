-- Every change of a job's status writes a new row version into every index
-- of quern_jobs. The (type, status) index had a handful of distinct keys, so
-- each of those writes landed in the same few leaf pages of long duplicate
-- lists: it cost more per claim and per completion than any other index.
-- The counts by type read the unfinished jobs through the partial indexes
-- instead.
DROP INDEX IF EXISTS quern_jobs_type_status;


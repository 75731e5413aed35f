-- Fewer index writes per job.
--
-- Every claim writes a new version of the job row, and every index on
-- pgcoord.jobs whose predicate the new version meets gets an entry; every
-- logged run writes an entry into each index of pgcoord.job_runs.  Two of
-- those indexes cost more than they served:
--  * jobs_running (locked_by WHERE state = 'running') served only the
--    reclaim of dead workers' jobs.  That now runs when a worker is found
--    dead and, to catch jobs of workers that vanished, once per
--    reclaim_after; a scan of the table then is cheaper than an index entry
--    for every claim.
--  * job_runs_job, a btree on job_id: job ids grow with time and runs are
--    logged in roughly id order, so a BRIN index finds a job's runs nearly
--    as well at a fraction of the write cost.
DROP INDEX IF EXISTS pgcoord.jobs_running;
DROP INDEX IF EXISTS pgcoord.job_runs_job;
CREATE INDEX IF NOT EXISTS job_runs_job ON pgcoord.job_runs USING brin (job_id)
  WITH (autosummarize = on);

-- What the dashboard (lua/pgcoord/dashboard/) reads, by index.
--
-- Every page counts and lists jobs of one group and state through a
-- partial index with a LIMIT, never a scan of pgcoord.jobs: ready, scheduled
-- and failed jobs have theirs (004); these two add running and cancelled.
--  * jobs_cancelled: a cancel is rare and the row is kept, so its entry
--    costs next to nothing; prunes of cancelled jobs read it too.
--  * jobs_running_group: one entry per claimed job (005 dropped
--    jobs_running, on locked_by, to save it).  Without one, counting a
--    group's running jobs, or finding that it has none, reads the whole
--    table; the entry is the price of a dashboard that answers as fast with
--    a million waiting jobs as with none.
-- Runs per minute and durations over the last hour read job_runs by the
-- BRIN index on finished_at (004): recent pages only.
CREATE INDEX IF NOT EXISTS jobs_cancelled ON pgcoord.jobs (group_name, id)
  WHERE state = 'cancelled';
CREATE INDEX IF NOT EXISTS jobs_running_group ON pgcoord.jobs (group_name, id)
  WHERE state = 'running';

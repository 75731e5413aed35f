-- The job runner's tables.
--
-- pgcoord.jobs is a high-churn table: every job is inserted, claimed
-- (updated) and, once done, deleted.  Choices:
--  * One table, with `state` separating jobs ready now from jobs scheduled
--    for later.  The claim reads the partial index jobs_ready, which holds
--    only ready jobs of a group in claim order, so it is a short index scan
--    from the front however many jobs wait for a later run_at; due jobs are
--    promoted from jobs_scheduled by run_at.
--  * params is json, not jsonb: stored as given, no parsing on the hot
--    path; handlers decode it anyway.
--  * No foreign keys: a claim or a delete checks no other table.
--  * Completed jobs are deleted (history lives in job_runs); failed jobs
--    whose retries are exhausted stay, state 'failed', to be listed and
--    rescheduled.
--  * Autovacuum is told to visit often and without throttling: dead tuples
--    from claims and deletes otherwise bloat the hot index between runs.
CREATE TABLE IF NOT EXISTS pgcoord.jobs (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  group_name text NOT NULL,
  type text NOT NULL,
  state text NOT NULL CHECK (state IN ('ready', 'scheduled', 'running', 'failed')),
  priority integer NOT NULL DEFAULT 0,
  run_at timestamptz NOT NULL DEFAULT now(),
  params json,
  key text,
  error_count integer NOT NULL DEFAULT 0,
  last_error text,
  inserted_at timestamptz NOT NULL DEFAULT now(),
  locked_by bigint,
  locked_at timestamptz
) WITH (
  autovacuum_vacuum_scale_factor = 0.0,
  autovacuum_vacuum_threshold = 5000,
  autovacuum_vacuum_insert_scale_factor = 0.0,
  autovacuum_vacuum_insert_threshold = 5000,
  autovacuum_analyze_scale_factor = 0.05,
  autovacuum_vacuum_cost_delay = 0
);

-- Lower priority numbers run first, then older jobs.
CREATE INDEX IF NOT EXISTS jobs_ready ON pgcoord.jobs (group_name, priority, id)
  WHERE state = 'ready';
CREATE INDEX IF NOT EXISTS jobs_scheduled ON pgcoord.jobs (group_name, run_at)
  WHERE state = 'scheduled';
CREATE INDEX IF NOT EXISTS jobs_running ON pgcoord.jobs (locked_by)
  WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_failed ON pgcoord.jobs (group_name, id)
  WHERE state = 'failed';
-- A key makes a job unique until it has finished: while it waits and while
-- it runs.  (Freeing the key when the job starts would let a second job take
-- it, and the first one's retry could then not go back to waiting.)
CREATE UNIQUE INDEX IF NOT EXISTS jobs_pending_key ON pgcoord.jobs (key)
  WHERE key IS NOT NULL AND state IN ('ready', 'scheduled', 'running');

-- Workers heartbeat here; jobs held by a worker that went quiet are
-- handed back to the others.
CREATE TABLE IF NOT EXISTS pgcoord.job_workers (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  group_name text NOT NULL,
  name text NOT NULL,
  started_at timestamptz NOT NULL DEFAULT now(),
  heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Run history, written in batches with the results.  Insert-only: a BRIN
-- index on finished_at serves time-range reads and pruning at almost no
-- write cost.
CREATE TABLE IF NOT EXISTS pgcoord.job_runs (
  job_id bigint NOT NULL,
  group_name text NOT NULL,
  type text NOT NULL,
  attempt integer NOT NULL,
  ok boolean NOT NULL,
  error text,
  started_at timestamptz NOT NULL,
  finished_at timestamptz NOT NULL,
  worker_id bigint
);
CREATE INDEX IF NOT EXISTS job_runs_finished ON pgcoord.job_runs USING brin (finished_at);
CREATE INDEX IF NOT EXISTS job_runs_job ON pgcoord.job_runs (job_id);

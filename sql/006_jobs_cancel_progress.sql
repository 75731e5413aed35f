-- Cancelled jobs, snoozes and progress.
--
--  * state 'cancelled': a cancelled job is kept (to be looked at, and
--    pruned later), like a failed one.  It leaves every partial index of
--    the claim path (jobs_ready, jobs_scheduled) and frees its key.
--  * cancelled_at: when it was cancelled, for pruning.
--  * snoozes: how many runs ended in pgcoord.snooze (not attempts:
--    error_count is unchanged by them).
--  * progress: the last value a handler saved with job:progress (json, as
--    given).
-- New columns are nullable or have a constant default, so adding them
-- rewrites nothing, and no index is added: the claim writes what it wrote.
ALTER TABLE pgcoord.jobs DROP CONSTRAINT IF EXISTS jobs_state_check;
ALTER TABLE pgcoord.jobs ADD CONSTRAINT jobs_state_check
  CHECK (state IN ('ready', 'scheduled', 'running', 'failed', 'cancelled'));
ALTER TABLE pgcoord.jobs ADD COLUMN IF NOT EXISTS cancelled_at timestamptz;
ALTER TABLE pgcoord.jobs ADD COLUMN IF NOT EXISTS snoozes integer NOT NULL DEFAULT 0;
ALTER TABLE pgcoord.jobs ADD COLUMN IF NOT EXISTS progress json;

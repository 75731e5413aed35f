-- Per-group settings of the job runner: pause, and fleet-wide limits.
--
-- A group with no row here (or a row with nothing set) is claimed exactly
-- as before: workers read their group's row at start and on change (a
-- NOTIFY on pgcoord_job_groups, and each poll), and only a paused or
-- limited group switches them to the limited claim.
--  * concurrency: at most that many of the group's jobs in hand at once
--    across every worker.  Each worker's share is job_workers.slots, set
--    by its own limited claims; a dead worker's slots stop counting once
--    its heartbeat is reclaim_after old, and go with its row.
--  * rate: at most that many starts per second, a token bucket of burst
--    `rate` kept here (tokens as of refilled_at, the database's clock).
-- The limited claim locks the group's row, which serialises the claims of
-- a limited group across the fleet.
CREATE TABLE IF NOT EXISTS pgcoord.job_groups (
  name text PRIMARY KEY,
  paused boolean NOT NULL DEFAULT false,
  concurrency integer CHECK (concurrency > 0),
  rate float8 CHECK (rate > 0 AND rate < 'Infinity'),
  tokens float8 NOT NULL DEFAULT 0,
  refilled_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

-- (a new column with a constant default rewrites nothing)
ALTER TABLE pgcoord.job_workers ADD COLUMN IF NOT EXISTS slots integer NOT NULL DEFAULT 0;

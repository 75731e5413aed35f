-- Periodic jobs: one row per declared name.
--   last_slot   the last slot enqueued as a job; a slot is enqueued only
--               in the transaction that moves last_slot past it, so none is
--               enqueued twice, even by two schedulers at once
--   next_slot   the next slot the scheduler expects (for lists, metrics)
--   created_at  first seen: a new name starts with the slots after it
--   spec, group_name, type, timezone: as last declared by the scheduler
CREATE TABLE IF NOT EXISTS pgcoord.job_periodic (
  name text PRIMARY KEY,
  spec text NOT NULL,
  group_name text NOT NULL,
  type text NOT NULL,
  timezone text NOT NULL DEFAULT 'UTC',
  last_slot timestamptz,
  next_slot timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

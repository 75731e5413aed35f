-- Job locks: leader election through one row per lock.
--   holder       who holds it (host:pid:nonce), NULL once released
--   token        fencing token, bumped on every acquisition, so work done
--                under an old token can be told apart and refused
--   renewed_at   the database's clock at the last renewal; staleness is
--                judged against now() on the server, never a host clock
CREATE TABLE IF NOT EXISTS pgcoord.job_locks (
  name text PRIMARY KEY,
  holder text,
  token bigint NOT NULL DEFAULT 0,
  acquired_at timestamptz,
  renewed_at timestamptz,
  released_at timestamptz
);

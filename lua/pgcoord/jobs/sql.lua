-- Every statement and channel name of the job runner.  (scripts/bench/jobs
-- reads CLAIM and FLUSH from this file's text: keep each a "local NAME =
-- [[...]]" of its own.)
local sql = {}

sql.CHANNEL = "pgcoord_jobs"

local SCHEDULE = [[
WITH ins AS (
  INSERT INTO pgcoord.jobs (group_name, type, state, priority, run_at, params, key)
  SELECT $1::text, $2::text, CASE WHEN t <= now() THEN 'ready' ELSE 'scheduled' END,
         $3::int, t, $4::json, $5::text
    FROM (SELECT COALESCE(to_timestamp($6::float8), now()) AS t) s
  ON CONFLICT (key) WHERE key IS NOT NULL AND state IN ('ready', 'scheduled', 'running')
    DO NOTHING
  RETURNING id, state, run_at)
SELECT id, pg_notify('pgcoord_jobs', json_build_object('group', $1::text, 'due_in',
         CASE WHEN state = 'ready' THEN NULL
              ELSE extract(epoch FROM run_at - now()) END)::text) AS notified
  FROM ins]]
sql.SCHEDULE = SCHEDULE

local SCHEDULE_MANY = [[
WITH r AS (
  SELECT * FROM json_to_recordset($1::json)
    AS r(g text, type text, priority int, params json, key text, at float8)),
ins AS (
  INSERT INTO pgcoord.jobs (group_name, type, state, priority, run_at, params, key)
  SELECT g, type, CASE WHEN COALESCE(to_timestamp(at), now()) <= now()
                       THEN 'ready' ELSE 'scheduled' END,
         priority, COALESCE(to_timestamp(at), now()), params, key
    FROM r
  ON CONFLICT (key) WHERE key IS NOT NULL AND state IN ('ready', 'scheduled', 'running')
    DO NOTHING
  RETURNING id, group_name, state, run_at),
n AS (
  SELECT pg_notify('pgcoord_jobs', json_build_object('group', group_name, 'due_in',
           CASE WHEN bool_or(state = 'ready') THEN NULL
                ELSE extract(epoch FROM min(run_at) - now()) END)::text)
    FROM ins GROUP BY group_name)
SELECT ins.id FROM ins, (SELECT count(*) FROM n) notified]]
sql.SCHEDULE_MANY = SCHEDULE_MANY

local REGISTER = [[
INSERT INTO pgcoord.job_workers (group_name, name) VALUES ($1, $2) RETURNING id]]
sql.REGISTER = REGISTER

-- CLAIM, PROMOTE and FLUSH pick rows with = ANY(ARRAY(...)), not a join or
-- IN: the planner hash-joins those against a sequential scan of the whole
-- table, which costs as much as the backlog is long (50 ms a claim with
-- 200,000 ready jobs, against 10 ms for these lookups).  CLAIM names the
-- rows it locked by ctid, a direct fetch where an id costs an index descent
-- each (the ctid of a row locked in this statement cannot change under it).
-- params come back as text, decoded per job: a row whose params cannot be
-- decoded (nested too deep, say) fails its own run rather than the claim,
-- which would leave every row it took 'running' and in no worker's hands.
-- $4 tags the claim: locked_at is the worker's clock (epoch microseconds,
-- as the runs it logs), distinct for each of its claims, so that a claim
-- whose outcome the worker could not read can be handed back (UNCLAIM).
-- The xmax test passes over the rows that a transaction running beside
-- this claim has locked or updated (another claim's, in this process or
-- another), before FOR UPDATE tries them.  FOR UPDATE alone skips a row
-- whose claim is still in progress, but one whose claim committed after
-- this statement's snapshot it follows to its newest version (read
-- committed), and locks that, the other worker's 'running' row, before it
-- finds the state no longer 'ready': that worker's FLUSH then waited on
-- this claim to delete its own job (Lock:transactionid, "while deleting
-- tuple"), and each such lock cost a write.  A row whose xmax is older
-- than the snapshot (a locker that rolled back, or committed and left it
-- ready) is claimed as before, so no row is passed over for good.
-- (xmax is the row's raw header: 0 for a row no one has touched; age()
-- orders xids across wraparound; the snapshot's xids in progress and its
-- xmax bound the transactions beside it.  Two share-lockers leave a
-- MultiXactId there, another counter: one that reads as an xid not yet
-- given out has a negative age and is never passed over, and one that
-- reads as a recent xid is passed over only while that xid would be.)
local CLAIM = [[
WITH c AS (
  UPDATE pgcoord.jobs j
     SET state = 'running', locked_by = $2, locked_at = to_timestamp($4 / 1e6::float8)
   WHERE j.ctid = ANY(ARRAY(
           SELECT ctid FROM pgcoord.jobs
            WHERE state = 'ready' AND group_name = $1
              AND (xmax = '0' OR NOT (
                     xmax = ANY(ARRAY(SELECT xid(pg_snapshot_xip(pg_current_snapshot()))))
                     OR age(xmax) BETWEEN 0
                          AND (SELECT age(xid(pg_snapshot_xmax(pg_current_snapshot()))))))
            ORDER BY priority, id
            LIMIT $3
              FOR UPDATE SKIP LOCKED))
  RETURNING j.id, j.type, j.group_name AS "group", j.priority, j.params::text AS params,
            j.inserted_at,
            j.run_at, j.error_count, j.last_error)
SELECT * FROM c ORDER BY priority, id]]
sql.CLAIM = CLAIM

-- The rows of worker $1's claim tagged $2 back to ready, when the worker
-- could not read the claim's rows (out of memory, a lost link): it may
-- have committed.  No index finds them; it runs only after such a failure.
local UNCLAIM = [[
WITH back AS (
  UPDATE pgcoord.jobs SET state = 'ready', locked_by = NULL, locked_at = NULL
   WHERE locked_by = $1 AND state = 'running' AND locked_at = to_timestamp($2 / 1e6::float8)
  RETURNING group_name)
SELECT pg_notify('pgcoord_jobs', json_build_object('group', group_name, 'due_in', NULL)::text)
  FROM (SELECT DISTINCT group_name FROM back) g]]
sql.UNCLAIM = UNCLAIM

local PROMOTE = [[
WITH p AS (
  UPDATE pgcoord.jobs SET state = 'ready'
   WHERE id = ANY(ARRAY(SELECT id FROM pgcoord.jobs
                         WHERE state = 'scheduled' AND group_name = $1 AND run_at <= now()
                         ORDER BY run_at LIMIT 10000
                           FOR UPDATE SKIP LOCKED))
  RETURNING 1)
SELECT (SELECT count(*) FROM p) AS promoted,
       (SELECT extract(epoch FROM min(run_at) - now()) FROM pgcoord.jobs
         WHERE state = 'scheduled' AND group_name = $1 AND run_at > now()) AS next_in]]
sql.PROMOTE = PROMOTE

-- ($2: the handlers in progress, for --status: see sql/010)
local HEARTBEAT = [[
UPDATE pgcoord.job_workers SET heartbeat_at = now(), running = $2 WHERE id = $1]]
sql.HEARTBEAT = HEARTBEAT

-- Hands back the jobs of workers that stopped heartbeating ($1 seconds
-- ago).  No index finds running jobs (one would cost a write per claim), so
-- the table is scanned only when a worker was found dead or when $2 asks
-- for a sweep, which also catches jobs of workers whose row is gone.  A
-- worker never takes itself for dead ($3): back from an outage longer than
-- reclaim_after, its jobs are still in its hands.
local RECLAIM = [[
WITH dead AS (
  DELETE FROM pgcoord.job_workers
   WHERE heartbeat_at < now() - make_interval(secs => $1) AND id <> $3 RETURNING id),
back AS (
  UPDATE pgcoord.jobs j SET state = 'ready', locked_by = NULL, locked_at = NULL
   WHERE ($2 OR EXISTS (SELECT 1 FROM dead))
     AND j.state = 'running'
     AND (j.locked_by IN (SELECT id FROM dead)
          OR NOT EXISTS (SELECT 1 FROM pgcoord.job_workers w WHERE w.id = j.locked_by))
  RETURNING j.group_name),
n AS (
  SELECT pg_notify('pgcoord_jobs', json_build_object('group', group_name, 'due_in', NULL)::text)
    FROM (SELECT DISTINCT group_name FROM back) g)
SELECT (SELECT count(*) FROM back) AS reclaimed, (SELECT count(*) FROM n) AS notified]]
sql.RECLAIM = RECLAIM

-- A batch of results: $1 the ids of the jobs that succeeded (deleted),
-- $2 the failed runs as JSON (rare; their jobs go back to waiting, or stay
-- as failed; a snoozed one waits without counting an error), $3..$8 the
-- runs to log, as parallel arrays (times in epoch microseconds).  Only
-- rows still locked by this worker ($9) take their result, and only their
-- runs are logged: a job handed back meanwhile (its worker taken for dead,
-- or the job cancelled) runs again elsewhere or not at all, and that is
-- its run.
local FLUSH = [[
WITH f AS (
  SELECT * FROM json_to_recordset($2::json)
    AS f(id bigint, error text, delay float8, at float8, final boolean,
         snooze boolean)),
done AS (
  DELETE FROM pgcoord.jobs WHERE id = ANY($1::bigint[]) AND locked_by = $9 RETURNING id),
failed AS (
  UPDATE pgcoord.jobs j
     SET state = CASE WHEN f.final THEN 'failed' ELSE 'scheduled' END,
         run_at = CASE WHEN f.final THEN j.run_at
                       WHEN f.at IS NOT NULL THEN to_timestamp(f.at)
                       ELSE now() + make_interval(secs => f.delay) END,
         error_count = j.error_count + CASE WHEN f.snooze THEN 0 ELSE 1 END,
         snoozes = j.snoozes + CASE WHEN f.snooze THEN 1 ELSE 0 END,
         last_error = CASE WHEN f.snooze THEN j.last_error ELSE f.error END,
         locked_by = NULL, locked_at = NULL
    FROM f
   WHERE j.id = ANY(ARRAY(SELECT id FROM f)) AND j.id = f.id AND j.locked_by = $9
  RETURNING j.id),
logged AS (
  INSERT INTO pgcoord.job_runs (job_id, group_name, type, attempt, ok, error,
                                started_at, finished_at, worker_id)
  SELECT r.id, $10, r.type, r.attempt, r.ok, f.error,
         to_timestamp(r.started / 1e6::float8), to_timestamp(r.finished / 1e6::float8), $9
    FROM unnest($3::bigint[], $4::text[], $5::int[], $6::boolean[], $7::bigint[], $8::bigint[])
      AS r(id, type, attempt, ok, started, finished)
    LEFT JOIN f ON f.id = r.id AND NOT r.ok
   WHERE r.id IN (SELECT id FROM done UNION ALL SELECT id FROM failed)
  RETURNING 1)
SELECT (SELECT count(*) FROM done) AS done, (SELECT count(*) FROM failed) AS failed,
       (SELECT count(*) FROM logged) AS logged]]
sql.FLUSH = FLUSH

local HAND_BACK = [[
WITH back AS (
  UPDATE pgcoord.jobs SET state = 'ready', locked_by = NULL, locked_at = NULL
   WHERE id IN (SELECT value::bigint FROM json_array_elements_text($1::json))
     AND locked_by = $2 AND state = 'running'
  RETURNING group_name)
SELECT pg_notify('pgcoord_jobs', json_build_object('group', group_name, 'due_in', NULL)::text)
  FROM (SELECT DISTINCT group_name FROM back) g]]
sql.HAND_BACK = HAND_BACK

-- A worker's own vacuum of the table (jobs/vacuum.lua): SKIP_LOCKED, so
-- that it never waits behind another's or autovacuum's; no truncation of
-- the table's empty end, whose ACCESS EXCLUSIVE lock stops every claim
-- while it waits (seen as Timeout:VacuumTruncate beside the claims), and
-- no parallel index workers taking the cores the workers' statements use.
sql.VACUUM = "VACUUM (SKIP_LOCKED, TRUNCATE false, PARALLEL 0) pgcoord.jobs"

-- Jobs whose retries ran out ($1 a group or NULL, $2 at most).
local FAILED = [[
SELECT id, group_name AS "group", type, params::text AS params, error_count, last_error,
       inserted_at, run_at
  FROM pgcoord.jobs
 WHERE state = 'failed' AND ($1::text IS NULL OR group_name = $1)
 ORDER BY id LIMIT $2]]
sql.FAILED = FAILED

-- Failed jobs ($1, a JSON list of ids) to run again now.
local RETRY = [[
WITH r AS (
  UPDATE pgcoord.jobs SET state = 'ready', run_at = now(), locked_by = NULL
   WHERE state = 'failed' AND id IN (SELECT value::bigint FROM json_array_elements_text($1))
  RETURNING group_name),
n AS (
  SELECT pg_notify('pgcoord_jobs', json_build_object('group', group_name, 'due_in', NULL)::text)
    FROM (SELECT DISTINCT group_name FROM r) g)
SELECT (SELECT count(*) FROM r) AS retried, (SELECT count(*) FROM n) AS notified]]
sql.RETRY = RETRY

-- The failed jobs of group $1 (at most $2, oldest first) to run again now.
local RETRY_GROUP = [[
WITH r AS (
  UPDATE pgcoord.jobs SET state = 'ready', run_at = now(), locked_by = NULL
   WHERE id = ANY(ARRAY(SELECT id FROM pgcoord.jobs WHERE state = 'failed' AND group_name = $1
                         ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED))
     AND state = 'failed'
  RETURNING 1)
SELECT count(*) AS retried,
       CASE WHEN count(*) > 0 THEN pg_notify('pgcoord_jobs',
         json_build_object('group', $1::text, 'due_in', NULL)::text) END AS notified
  FROM r]]
sql.RETRY_GROUP = RETRY_GROUP

-- Failed or cancelled jobs among $1 deleted (their runs stay in job_runs).
local DELETE_FINISHED = [[
DELETE FROM pgcoord.jobs WHERE id = ANY($1::bigint[]) AND state IN ('failed', 'cancelled')]]
sql.DELETE_FINISHED = DELETE_FINISHED

-- Jobs for a look from the shell ($1 a group, $2 a state, $3 an id, each
-- or NULL; $4 at most), oldest first.
local LIST = [[
SELECT id, group_name AS "group", type, state, priority, params::text AS params, error_count,
       last_error, inserted_at, run_at, locked_by
  FROM pgcoord.jobs
 WHERE ($1::text IS NULL OR group_name = $1) AND ($2::text IS NULL OR state = $2)
   AND ($3::bigint IS NULL OR id = $3)
 ORDER BY id LIMIT $4]]
sql.LIST = LIST

-- The logged runs of job $1 (at most $2), in the order they ran (the BRIN
-- index on job_id finds them).
local RUNS = [[
SELECT attempt, ok, error, started_at, finished_at, worker_id, type, group_name AS "group"
  FROM pgcoord.job_runs WHERE job_id = $1 ORDER BY started_at, attempt LIMIT $2]]
sql.RUNS = RUNS

-- Retention (retention.lua): each deletes at most $4 rows older than the
-- time $1 (epoch seconds) or, when $1 is NULL, than $2 seconds by the
-- server's clock, of group $3 or of every group.  Rows another pruner
-- holds are skipped.  A failed or cancelled job's age is its run_at: the
-- time its last attempt was due.  ('cancelled' may not be a state yet: the
-- statement then finds nothing.)  The state is spelt out in each, so that
-- the planner can read the partial index of failed jobs.
local PRUNE_RUNS = [[
DELETE FROM pgcoord.job_runs
 WHERE ctid = ANY(ARRAY(
         SELECT ctid FROM pgcoord.job_runs
          WHERE finished_at < COALESCE(to_timestamp($1::float8),
                                       now() - make_interval(secs => $2::float8))
            AND ($3::text IS NULL OR group_name = $3)
          LIMIT $4 FOR UPDATE SKIP LOCKED))]]
sql.PRUNE_RUNS = PRUNE_RUNS

local PRUNE_FAILED = [[
DELETE FROM pgcoord.jobs
 WHERE id = ANY(ARRAY(
         SELECT id FROM pgcoord.jobs
          WHERE state = 'failed'
            AND run_at < COALESCE(to_timestamp($1::float8),
                                  now() - make_interval(secs => $2::float8))
            AND ($3::text IS NULL OR group_name = $3)
          LIMIT $4 FOR UPDATE SKIP LOCKED))
   AND state = 'failed']]
sql.PRUNE_FAILED = PRUNE_FAILED

local PRUNE_CANCELLED = [[
DELETE FROM pgcoord.jobs
 WHERE id = ANY(ARRAY(
         SELECT id FROM pgcoord.jobs
          WHERE state = 'cancelled'
            AND run_at < COALESCE(to_timestamp($1::float8),
                                  now() - make_interval(secs => $2::float8))
            AND ($3::text IS NULL OR group_name = $3)
          LIMIT $4 FOR UPDATE SKIP LOCKED))
   AND state = 'cancelled']]
sql.PRUNE_CANCELLED = PRUNE_CANCELLED

-- The retention of a group runs in one process at a time: each batch takes
-- this transaction-scoped advisory lock (PRUNE_LOCK, hashtext(group)), and
-- a pass that finds it taken ends.
sql.PRUNE_LOCK = 0x70676a72 -- "pgjr"
local PRUNE_TRY_LOCK = [[
SELECT pg_try_advisory_xact_lock($1, hashtext($2)) AS ok]]
sql.PRUNE_TRY_LOCK = PRUNE_TRY_LOCK

-- Cancels the jobs among $1 not finished yet (see control.lua): each
-- becomes 'cancelled' and leaves its worker's hands; a running one's run
-- is logged as cancelled and its worker told, one NOTIFY per worker and
-- per 500 jobs (a payload holds 8000 bytes).
local CANCEL = [[
WITH old AS (
  SELECT id, state, locked_by, locked_at FROM pgcoord.jobs
   WHERE id = ANY($1::bigint[]) AND state IN ('ready', 'scheduled', 'failed', 'running')
     FOR UPDATE),
c AS (
  UPDATE pgcoord.jobs j
     SET state = 'cancelled', cancelled_at = now(), locked_by = NULL, locked_at = NULL
    FROM old
   WHERE j.id = old.id
  RETURNING j.id, j.group_name, j.type, j.error_count, old.state AS was, old.locked_by,
            old.locked_at),
logged AS (
  INSERT INTO pgcoord.job_runs (job_id, group_name, type, attempt, ok, error,
                                started_at, finished_at, worker_id)
  SELECT id, group_name, type, error_count + 1, false, 'cancelled', locked_at, now(), locked_by
    FROM c WHERE was = 'running'
  RETURNING 1),
told AS (
  SELECT pg_notify('pgcoord_jobs',
           json_build_object('worker', locked_by, 'cancel', json_agg(id))::text)
    FROM (SELECT id, locked_by,
                 (row_number() OVER (PARTITION BY locked_by ORDER BY id) - 1) / 500 AS chunk
            FROM c WHERE was = 'running' AND locked_by IS NOT NULL) r
   GROUP BY locked_by, chunk)
SELECT group_name AS "group", was, count(*)::int AS n,
       (SELECT count(*) FROM logged) AS logged, (SELECT count(*) FROM told) AS told
  FROM c GROUP BY group_name, was]]
sql.CANCEL = CANCEL

-- Which of the jobs a worker has in hand ($1) were cancelled.
local CANCELLED_AMONG = [[
SELECT id FROM pgcoord.jobs WHERE id = ANY($1::bigint[]) AND state = 'cancelled']]
sql.CANCELLED_AMONG = CANCELLED_AMONG

-- Saves a running job's progress ($2, JSON text or NULL) while worker $3
-- holds it.
local PROGRESS = [[
UPDATE pgcoord.jobs SET progress = $2::json
 WHERE id = $1 AND state = 'running' AND locked_by = $3]]
sql.PROGRESS = PROGRESS

local GET = [[
SELECT id, group_name AS "group", type, state, priority, params::text AS params,
       progress::text AS progress, key, error_count, snoozes, last_error, run_at, inserted_at,
       locked_by AS worker, locked_at, cancelled_at
  FROM pgcoord.jobs WHERE id = $1]]
sql.GET = GET

local DEREGISTER = [[
DELETE FROM pgcoord.job_workers WHERE id = $1]]
sql.DEREGISTER = DEREGISTER

return sql

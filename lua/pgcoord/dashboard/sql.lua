-- Every statement the dashboard sends itself (its actions go through the
-- primitives' public calls).  Each reads an index with a LIMIT, so a page
-- costs the same with a million jobs as with none:
--  * counts are capped (at most CAP rows read per group and state on a
--    group's page, 1000 on the overview; shown as "10000+"), each through
--    the partial index of its state;
--  * lists page by keyset on the index's own order, never OFFSET;
--  * the states are spelt out in each statement, never a parameter, so
--    that the planner matches the partial index even in a generic plan.
-- scripts/bench/dashboard EXPLAINs each of these on a million jobs.
local status = require "pgcoord.status"

local sql = {}

sql.CAP = 10000

-- Each state has a partial index on (group_name, ...): sql/004, sql/009.
local STATES = { "ready", "scheduled", "running", "failed", "cancelled" }
sql.STATES = STATES

-- Each state's partial index order after group_name: ordering by it
-- keeps the planner on the index when most rows are in that state (a
-- sequential scan "until LIMIT matches" is cheaper on paper, and reads the
-- whole table when the group has fewer than LIMIT).
local INDEX_ORDER = { ready = "priority, id", scheduled = "run_at" }

-- The capped count of a group's jobs in one state, for a group named by
-- the column expression `g`.
local function capped_count(state, g)
  return ([[(SELECT count(*) FROM (SELECT 1 FROM pgcoord.jobs j
            WHERE j.state = '%s' AND j.group_name = %s ORDER BY %s LIMIT $2) x)::int AS %s]])
    :format(state, g, INDEX_ORDER[state] or "id", state)
end

local function counts(g)
  local cols = {}
  for i, state in ipairs(STATES) do cols[i] = capped_count(state, g) end
  return table.concat(cols, ",\n       ")
end

-- The names of a state's groups, by a skip scan of its partial index: one
-- index descent per group, however many jobs each holds.
local function skip_scan(state)
  return ([[
%s AS (
  (SELECT group_name AS name, 1 AS n FROM pgcoord.jobs WHERE state = '%s'
    ORDER BY group_name LIMIT 1)
  UNION ALL
  SELECT (SELECT j.group_name FROM pgcoord.jobs j WHERE j.state = '%s' AND j.group_name > s.name
           ORDER BY j.group_name LIMIT 1), s.n + 1
    FROM %s s WHERE s.name IS NOT NULL AND s.n < $1)]]):format(state, state, state, state)
end

local scans, unions = {}, {}
for i, state in ipairs(STATES) do
  scans[i] = skip_scan(state)
  unions[i] = ("SELECT name FROM %s"):format(state)
end

-- The capped counts' plans are priced as if every group held CAP jobs in
-- every state, past jit_above_cost: PostgreSQL's JIT then compiles them,
-- which costs 0.5 s for a statement that runs in 20 ms.  GROUPS and GROUP
-- run after this, in a transaction of their own.
sql.NO_JIT = [[SET LOCAL jit = off]]

-- Groups ($1 at most): those with jobs in any state, settings, workers or
-- periodic jobs; each with its capped counts ($2) and settings.
sql.GROUPS = ([[
WITH RECURSIVE %s,
names AS (
  %s
  UNION (SELECT name FROM pgcoord.job_groups ORDER BY name LIMIT $1)
  UNION (SELECT group_name FROM pgcoord.job_workers LIMIT $1)
  UNION (SELECT group_name FROM pgcoord.job_periodic ORDER BY name LIMIT $1)),
g AS (SELECT name FROM names WHERE name IS NOT NULL ORDER BY name LIMIT $1)
SELECT g.name AS "group",
       %s,
       COALESCE(s.paused, false) AS paused, s.concurrency, s.rate,
       (SELECT count(*) FROM pgcoord.job_workers w WHERE w.group_name = g.name)::int AS workers
  FROM g LEFT JOIN pgcoord.job_groups s ON s.name = g.name
 ORDER BY g.name]]):format(table.concat(scans, ","), table.concat(unions, "\n  UNION "),
  counts("g.name"))

-- One group ($1) with its capped counts ($2), settings and workers;
-- known: whether anything names it (runs of the last hour too: a group
-- whose jobs are all done still has its charts).
sql.GROUP = ([[
SELECT $1::text AS "group",
       %s,
       COALESCE(s.paused, false) AS paused, s.concurrency, s.rate,
       (SELECT count(*) FROM pgcoord.job_workers w WHERE w.group_name = $1)::int AS workers,
       s.name IS NOT NULL
         OR EXISTS (SELECT 1 FROM pgcoord.job_workers w WHERE w.group_name = $1)
         OR EXISTS (SELECT 1 FROM pgcoord.job_periodic p WHERE p.group_name = $1)
         OR EXISTS (SELECT 1 FROM pgcoord.job_runs r
                     WHERE r.group_name = $1 AND r.finished_at > now() - interval '1 hour')
         AS known
  FROM (SELECT 1) one LEFT JOIN pgcoord.job_groups s ON s.name = $1]]):format(counts("$1"))

-- Runs of group $1 finished in the last hour, per minute: completed,
-- failed and the duration's p50 and p99 (seconds).  The BRIN index on
-- finished_at reads the recent pages only.
sql.CHART = [[
SELECT extract(epoch FROM date_trunc('minute', finished_at))::float8 AS minute,
       count(*) FILTER (WHERE ok)::int AS completed,
       count(*) FILTER (WHERE NOT ok)::int AS failed,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))
         AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))
         AS p99
  FROM pgcoord.job_runs
 WHERE finished_at > now() - interval '1 hour' AND group_name = $1
 GROUP BY 1 ORDER BY 1 LIMIT 61]]

sql.NOW = [[SELECT extract(epoch FROM now())::float8 AS now]]

-- A page of a group's jobs in one state: $1 group, $2 type or NULL, $3 and
-- $4 the cursor (the last row's key and id, NULL for the first page), $5
-- at most.  Ready jobs page in claim order (priority, id), scheduled ones
-- by run_at (key: epoch microseconds), the others newest first (by id).
local LIST_COLUMNS = [[
SELECT id, type, state, priority, error_count, last_error, run_at, inserted_at, %s AS key
  FROM pgcoord.jobs
 WHERE state = '%s' AND group_name = $1 AND ($2::text IS NULL OR type = $2)]]

local ORDERS = {
  ready = { "priority::bigint",
    "AND (priority, id) > (COALESCE($3::bigint, -2147483649), COALESCE($4::bigint, 0))",
    "ORDER BY priority, id" },
  scheduled = { "(extract(epoch FROM run_at) * 1000000)::bigint",
    "AND (run_at, id) > (COALESCE(to_timestamp(0) + $3::bigint * interval '1 microsecond',"
      .. " '-infinity'), COALESCE($4::bigint, 0))",
    "ORDER BY run_at, id" },
}

sql.LIST = {}
for _, state in ipairs(STATES) do
  -- (for these the key is the id itself)
  local o = ORDERS[state] or { "id",
    "AND id < LEAST(COALESCE($3::bigint, 9223372036854775807), COALESCE($4::bigint,"
      .. " 9223372036854775807))",
    "ORDER BY id DESC" }
  sql.LIST[state] = LIST_COLUMNS:format(o[1], state) .. "\n   " .. o[2] .. "\n " .. o[3]
    .. " LIMIT $5"
end

-- Queue subscriptions ($1 at most) with capped ($2) pending and dead
-- counts, each from its partial index.
sql.SUBSCRIPTIONS = [[
SELECT q.name AS queue, s.name AS subscription, s.ordered,
       (SELECT count(*) FROM (SELECT 1 FROM pgcoord.queue_deliveries d
         WHERE d.subscription_id = s.id AND d.state = 'pending' LIMIT $2) x)::int AS pending,
       (SELECT count(*) FROM (SELECT 1 FROM pgcoord.queue_deliveries d
         WHERE d.subscription_id = s.id AND d.state = 'dead' LIMIT $2) x)::int AS dead
  FROM (SELECT * FROM pgcoord.queue_subscriptions ORDER BY id LIMIT $1) s
  JOIN pgcoord.queues q ON q.id = s.queue_id
 ORDER BY q.name, s.name]]

-- The lock holders as `--status` reads them, $1 at most.
sql.LOCKS = status.LOCKS .. " LIMIT $1"

sql.PERIODIC = [[
SELECT name, spec, group_name AS "group", type, timezone,
       extract(epoch FROM last_slot)::float8 AS last_run,
       extract(epoch FROM next_slot)::float8 AS next_run
  FROM pgcoord.job_periodic ORDER BY name LIMIT $1]]

-- Which tables exist: the schema's, and of the outbox tables $1 (a JSON
-- list) those that do.
sql.PRESENT = status.PRESENT

-- Capped ($1) pending and failed counts of an outbox table (quoted name
-- q), each through its partial index (ob:migrate adds the failed one to a
-- table made before it).
function sql.outbox_counts(q)
  return ([[
SELECT (SELECT count(*) FROM (SELECT 1 FROM %s WHERE status = 'pending' LIMIT $1) x)::int
         AS pending,
       (SELECT count(*) FROM (SELECT 1 FROM %s WHERE status = 'failed' LIMIT $1) x)::int
         AS failed]]):format(q, q)
end

return sql

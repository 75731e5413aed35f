-- The job runner: typed jobs in groups, scheduled in the caller's
-- transaction, worked by workers that claim batches, run handlers with a
-- concurrency limit and write results back in batches.
--
-- A job is at least once: a worker claims jobs (state 'running',
-- locked_by = its id) and deletes each when its handler returned.  A worker
-- that dies stops heartbeating, and the others hand its jobs back.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local json = require "pgcoord.json"
local log = require "pgcoord.log"
local db = require "pgcoord.db"

local jobs = {}
setmetatable(jobs, { __call = function(_, pool, opts) return jobs.new(pool, opts) end })

local Jobs = {}
Jobs.__index = Jobs
local Worker = {}
Worker.__index = Worker

local metrics = require "pgcoord.metrics"
local completed = metrics.counter("pgcoord_jobs_completed_total",
  "Job runs that succeeded.", { "group", "type" })
local failed_total = metrics.counter("pgcoord_jobs_failed_total",
  "Jobs that failed their last attempt and were kept as failed.", { "group", "type" })
local retried = metrics.counter("pgcoord_jobs_retried_total",
  "Job runs that failed and were scheduled again.", { "group", "type" })
local duration = metrics.histogram("pgcoord_job_duration_seconds",
  "Job run duration.", { "group", "type" })

local CHANNEL = "pgcoord_jobs"

-- Results wait for their write in a batch of columns, not a table each:
-- the ids of jobs done, the failures, and the runs to log.
local LOG_COLUMNS = { "ids", "types", "attempts", "oks", "started", "finished" }

local function new_batch()
  return { n = 0, done = {}, failures = {}, logged = 0, ids = {}, types = {}, attempts = {},
           oks = {}, started = {}, finished = {} }
end

-- Appends b's results to a's; returns a.
local function merge(a, b)
  a.n = a.n + b.n
  table.move(b.done, 1, #b.done, #a.done + 1, a.done)
  table.move(b.failures, 1, #b.failures, #a.failures + 1, a.failures)
  for _, column in ipairs(LOG_COLUMNS) do
    table.move(b[column], 1, b.logged, a.logged + 1, a[column])
  end
  a.logged = a.logged + b.logged
  return a
end
local DEFAULT_RETRY = { max = 3, base_delay = 10 }

-- Times accepted for run_at and retry_at (epoch seconds): years 1 to 9999,
-- far inside PostgreSQL's timestamptz range (4713 BC to 294276 AD), so that
-- no time given can make a job's row unwritable.
local MIN_TIME, MAX_TIME = -62135596800, 253402300799
local TIME_RANGE = ("epoch seconds from %d to %d (years 1 to 9999)"):format(MIN_TIME, MAX_TIME)
-- The longest retry delay (about 31 years), base_delay x attempt included.
local MAX_DELAY = 1000000000
-- The longest error text kept with a run (bytes).
local MAX_ERROR = 65536

local function is_time(t)
  return type(t) == "number" and t >= MIN_TIME and t <= MAX_TIME -- (false for NaN)
end

-- ---- errors that steer retries -----------------------------------------------

local RetryAt = {}
RetryAt.__index = RetryAt
RetryAt.__tostring = function(e) return ("retry at %.3f: %s"):format(e.at, e.message) end

-- error(pgcoord.retry_at(t, "reason")) retries the job at time t (epoch s).
function jobs.retry_at(t, reason)
  if not is_time(t) then
    error(("pgcoord.retry_at: time must be %s, got %s"):format(TIME_RANGE, tostring(t)), 2)
  end
  return setmetatable({ at = t, message = tostring(reason or "retry requested") }, RetryAt)
end

-- A ready should_log_run: keeps a job's final run only.
function jobs.log_final_runs(_, run)
  return run.ok or run.final
end

-- ---- definitions and scheduling ----------------------------------------------

function jobs.new(pool, opts)
  if type(pool) ~= "table" or type(pool.query) ~= "function" then
    error("pgcoord.jobs: expected a pool from pgcoord.connect", 2)
  end
  opts = opts or {}
  return setmetatable({ pool = pool, types = {}, groups = {},
                        subscriber = opts.subscriber }, Jobs)
end

local function check_retry(jtype, retry)
  if retry == nil then return DEFAULT_RETRY end
  if type(retry) ~= "table" then
    error(("jobs:define %q: retry must be a table { max =, base_delay = }"):format(jtype), 3)
  end
  local max, delay = retry.max or DEFAULT_RETRY.max, retry.base_delay or DEFAULT_RETRY.base_delay
  if math.type(max) ~= "integer" or max < 0 then
    error(("jobs:define %q: retry.max must be an integer >= 0, got %s")
      :format(jtype, tostring(max)), 3)
  end
  if type(delay) ~= "number" or not (delay >= 0 and delay <= MAX_DELAY) then
    error(("jobs:define %q: retry.base_delay must be a number >= 0 and <= %d (seconds), got %s")
      :format(jtype, MAX_DELAY, tostring(delay)), 3)
  end
  return { max = max, base_delay = delay }
end

function Jobs:define(jtype, fn, opts)
  if type(jtype) ~= "string" or jtype == "" then
    error(("jobs:define: type must be a non-empty string, got %s"):format(tostring(jtype)), 2)
  end
  json.check_text("jobs:define", "type", jtype)
  if type(fn) ~= "function" then
    error(("jobs:define %q: handler must be a function, got %s"):format(jtype, type(fn)), 2)
  end
  opts = opts or {}
  local group = opts.group or "default"
  if type(group) ~= "string" or group == "" then
    error(("jobs:define %q: group must be a non-empty string"):format(jtype), 2)
  end
  json.check_text(("jobs:define %q"):format(jtype), "group", group)
  self.types[jtype] = { fn = fn, group = group, retry = check_retry(jtype, opts.retry) }
  self.groups[group] = true
  return self
end

-- Checks one job to schedule; returns the row for SQL or raises at level,
-- naming `where` (the function, and the item of a batch).
function Jobs:_job_row(jtype, params, opts, level, where)
  local def = self.types[jtype]
  if not def then
    error(("%s: unknown job type %q (define it first)"):format(where, tostring(jtype)), level)
  end
  opts = opts or {}
  local group = opts.group or def.group
  if not self.groups[group] then
    error(("%s: unknown group %q"):format(where, tostring(group)), level)
  end
  local ok, encoded = true, nil
  if params ~= nil then ok, encoded = pcall(json.encode, params) end
  if not ok then
    error(("%s %q: params cannot be encoded as JSON: %s"):format(where, jtype, encoded), level)
  end
  local run_at = opts.run_at
  if run_at ~= nil and not is_time(run_at) then
    error(("%s %q: run_at must be a time in %s, got %s")
      :format(where, jtype, TIME_RANGE, tostring(run_at)), level)
  end
  local priority = opts.priority or 0
  if math.type(priority) ~= "integer" or priority < -0x80000000 or priority > 0x7fffffff then
    error(("%s %q: priority must be an integer from -2147483648 to 2147483647, got %s")
      :format(where, jtype, tostring(priority)), level)
  end
  local key = opts.key
  if key ~= nil and (type(key) ~= "string" or key == "") then
    error(("%s %q: key must be a non-empty string"):format(where, jtype), level)
  end
  local problem = key and json.text_problem(key)
  if problem then error(("%s %q: key %s"):format(where, jtype, problem), level) end
  return { g = group, type = jtype, priority = priority, params = encoded, key = opts.key,
           at = run_at }
end

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

-- Schedules one job in db_or_tx's transaction; returns its id, or nil and
-- a message when a pending job already has opts.key.
function Jobs:schedule(db_or_tx, jtype, params, opts)
  local r = self:_job_row(jtype, params, opts, 3, "jobs:schedule")
  local row = db_or_tx:one(SCHEDULE, r.g, r.type, r.priority, r.params, r.key, r.at)
  if not row then
    return nil, ("an unfinished job already has key %q"):format(r.key)
  end
  return row.id
end

function Jobs:schedule_now(db_or_tx, jtype, params)
  return self:schedule(db_or_tx, jtype, params, nil)
end

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

-- Schedules many jobs in one statement: list of { type =, params =,
-- run_at =, group =, priority =, key = }.  Returns the ids inserted.
function Jobs:schedule_many(db_or_tx, list)
  if type(list) ~= "table" then
    error("jobs:schedule_many: expected a list of jobs", 2)
  end
  if #list == 0 then return {} end
  -- params are JSON already: splice them in rather than encode twice
  local parts = {}
  for i, item in ipairs(list) do
    if type(item) ~= "table" then
      error(("jobs:schedule_many: item %d is not a table"):format(i), 2)
    end
    local r = self:_job_row(item.type, item.params, item, 3,
      ("jobs:schedule_many (item %d)"):format(i))
    local params = r.params
    r.params = nil
    local head = json.encode(r):sub(1, -2)
    parts[i] = params and (head .. ',"params":' .. params .. "}") or (head .. "}")
  end
  local result = db_or_tx:query(SCHEDULE_MANY, "[" .. table.concat(parts, ",") .. "]")
  local ids = {}
  for i, row in ipairs(result) do ids[i] = row.id end
  return ids
end

-- Jobs whose retries ran out, kept for a look and a retry.  (params are
-- decoded per job: one that cannot be, params_error says why.)
function Jobs:failed(opts)
  opts = opts or {}
  local rows = self.pool:query([[
    SELECT id, group_name AS "group", type, params::text AS params, error_count, last_error,
           inserted_at, run_at
      FROM pgcoord.jobs
     WHERE state = 'failed' AND ($1::text IS NULL OR group_name = $1)
     ORDER BY id LIMIT $2]], opts.group, opts.limit or 100)
  for _, row in ipairs(rows) do
    if row.params then row.params, row.params_error = json.try_decode(row.params) end
  end
  return rows
end

-- Schedules failed jobs (one id or a list) to run again now; returns how
-- many it rescheduled.
function Jobs:retry(ids)
  if type(ids) ~= "table" then ids = { ids } end
  return self.pool:one([[
    WITH r AS (
      UPDATE pgcoord.jobs SET state = 'ready', run_at = now(), locked_by = NULL
       WHERE state = 'failed' AND id IN (SELECT value::bigint FROM json_array_elements_text($1))
      RETURNING group_name),
    n AS (
      SELECT pg_notify('pgcoord_jobs', json_build_object('group', group_name, 'due_in', NULL)::text)
        FROM (SELECT DISTINCT group_name FROM r) g)
    SELECT (SELECT count(*) FROM r) AS retried, (SELECT count(*) FROM n) AS notified]], ids).retried
end

-- ---- the worker ----------------------------------------------------------------

local WORKER_OPTIONS = {
  group = "string", concurrency = "integer", prefetch = "integer", poll_interval = "number",
  flush_count = "integer", flush_age = "number", should_log_run = "function",
  handle_error = "function", heartbeat_interval = "number", reclaim_after = "number",
  subscriber = "table",
}

-- Bounds of the numeric options.  An interval shorter than 0.01 s makes
-- its loop spin; a task per unit of concurrency makes a huge concurrency
-- stall the loop while they start; batches and intervals past the top
-- make statements the server refuses or memory no worker needs.
local WORKER_LIMITS = {
  concurrency = { 1, 10000 }, prefetch = { 1, 100000 }, flush_count = { 1, 100000 },
  poll_interval = { 0.01, 1000000 }, flush_age = { 0.01, 1000000 },
  heartbeat_interval = { 0.01, 1000000 }, reclaim_after = { 0.01, 1000000 },
}

local function check_worker_options(self, opts)
  if opts ~= nil and type(opts) ~= "table" then error("jobs:worker: options must be a table", 3) end
  opts = opts or {}
  for k, v in pairs(opts) do
    local want = WORKER_OPTIONS[k]
    if not want then error(("jobs:worker: unknown option %q"):format(tostring(k)), 3) end
    local got = (want == "integer") and math.type(v) or type(v)
    local limits = WORKER_LIMITS[k]
    if got ~= want or (limits and not (v >= limits[1] and v <= limits[2])) then
      local range = limits and (" from %s to %s%s"):format(limits[1], limits[2],
        want == "number" and " (seconds)" or "") or ""
      error(("jobs:worker: option %s must be a positive %s%s, got %s")
        :format(k, want, range, tostring(v)), 3)
    end
  end
  local o = {
    group = opts.group or "default",
    concurrency = opts.concurrency or 10,
    prefetch = opts.prefetch or 1000,
    poll_interval = opts.poll_interval or 10,
    flush_count = opts.flush_count or 100,
    flush_age = opts.flush_age or 1,
    should_log_run = opts.should_log_run,
    handle_error = opts.handle_error,
    heartbeat_interval = opts.heartbeat_interval or 10,
    subscriber = opts.subscriber or self.subscriber,
  }
  o.reclaim_after = opts.reclaim_after or 6 * o.heartbeat_interval
  if o.reclaim_after <= o.heartbeat_interval then
    error(("jobs:worker: reclaim_after (%s) must exceed heartbeat_interval (%s)")
      :format(o.reclaim_after, o.heartbeat_interval), 3)
  end
  if not self.groups[o.group] then
    error(("jobs:worker: unknown group %q (no job type is defined in it)"):format(o.group), 3)
  end
  if o.prefetch < o.concurrency then o.prefetch = o.concurrency end
  -- claim again once a quarter of prefetch has been taken: a claim is on
  -- its way while the runners work through the rest
  o.refill_at = o.prefetch - math.max(1, o.prefetch // 4)
  o.claim_max = math.max(1, o.prefetch // 2)
  return o
end

function Jobs:worker(opts)
  local w = setmetatable(check_worker_options(self, opts), Worker)
  w.jobs, w.pool = self, self.pool
  w.queue, w.qhead, w.qtail = {}, 1, 0   -- claimed, not started
  w.results = new_batch()                -- finished, not written
  w.writers = 0                          -- result batches being written
  w.series = {}                          -- job type -> metric series
  w.running = 0                          -- handlers in progress
  w.in_flight = {}                       -- runner number -> the job it runs
  w.wake = task.cond()                   -- the fetcher waits here
  w.work = task.cond()                   -- runners wait here
  w.flushed = task.cond()                -- results written
  w.state = "starting"
  w.next_due = nil
  w.claims = {}                          -- claim tasks on their way
  w.claiming = 0                         -- jobs they ask for
  w.wakes, w.drained = 0, false          -- wake-ups so far; group found empty
  w.alive_until = -math.huge             -- the lease (see _beat)
  w.alive = task.cond()                  -- a heartbeat renewed it
  w.beat_now = task.cond()               -- runners past the lease ask for a beat
  w.started = task.cond()
  w.main = task.spawn(w._main, w)
  return w
end

local REGISTER = [[
INSERT INTO pgcoord.job_workers (group_name, name) VALUES ($1, $2) RETURNING id]]

-- CLAIM, PROMOTE and FLUSH pick rows with = ANY(ARRAY(...)), not a join or
-- IN: the planner hash-joins those against a sequential scan of the whole
-- table, which costs as much as the backlog is long (50 ms a claim with
-- 200,000 ready jobs, against 10 ms for these lookups).  CLAIM names the
-- rows it locked by ctid, a direct fetch where an id costs an index descent
-- each (the ctid of a row locked in this statement cannot change under it).
-- params come back as text, decoded per job: a row whose params cannot be
-- decoded (nested too deep, say) fails its own run rather than the claim,
-- which would leave every row it took 'running' and in no worker's hands.
local CLAIM = [[
WITH c AS (
  UPDATE pgcoord.jobs j SET state = 'running', locked_by = $2, locked_at = now()
   WHERE j.ctid = ANY(ARRAY(
           SELECT ctid FROM pgcoord.jobs
            WHERE state = 'ready' AND group_name = $1
            ORDER BY priority, id
            LIMIT $3
              FOR UPDATE SKIP LOCKED))
  RETURNING j.id, j.type, j.group_name AS "group", j.priority, j.params::text AS params,
            j.inserted_at,
            j.run_at, j.error_count, j.last_error)
SELECT * FROM c ORDER BY priority, id]]

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

local HEARTBEAT = [[
UPDATE pgcoord.job_workers SET heartbeat_at = now() WHERE id = $1]]

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

-- A batch of results: $1 the ids of the jobs that succeeded (deleted),
-- $2 the failed runs as JSON (rare; their jobs go back to waiting, or stay
-- as failed), $3..$8 the runs to log, as parallel arrays (times in epoch
-- microseconds).  Only rows still locked by this worker ($9) take their
-- result, and only their runs are logged: a job handed back meanwhile (its
-- worker taken for dead) runs again elsewhere, and that run is its run.
local FLUSH = [[
WITH f AS (
  SELECT * FROM json_to_recordset($2::json)
    AS f(id bigint, error text, delay float8, at float8, final boolean)),
done AS (
  DELETE FROM pgcoord.jobs WHERE id = ANY($1::bigint[]) AND locked_by = $9 RETURNING id),
failed AS (
  UPDATE pgcoord.jobs j
     SET state = CASE WHEN f.final THEN 'failed' ELSE 'scheduled' END,
         run_at = CASE WHEN f.final THEN j.run_at
                       WHEN f.at IS NOT NULL THEN to_timestamp(f.at)
                       ELSE now() + make_interval(secs => f.delay) END,
         error_count = j.error_count + 1, last_error = f.error,
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

local HAND_BACK = [[
WITH back AS (
  UPDATE pgcoord.jobs SET state = 'ready', locked_by = NULL, locked_at = NULL
   WHERE id IN (SELECT value::bigint FROM json_array_elements_text($1::json))
     AND locked_by = $2 AND state = 'running'
  RETURNING group_name)
SELECT pg_notify('pgcoord_jobs', json_build_object('group', group_name, 'due_in', NULL)::text)
  FROM (SELECT DISTINCT group_name FROM back) g]]

function Worker:_infra_error(what, err)
  if self.handle_error then
    local ok, herr = pcall(self.handle_error, err, what)
    if ok then return end
    log.error("handle_error failed", { error = tostring(herr) })
  end
  log.error("job worker: " .. what, { group = self.group, error = tostring(err) })
end

-- Wakes the fetch loop; a wake-up that comes while it is busy is kept.
-- Returns whether the loop was waiting.
function Worker:_nudge()
  self.woken = true
  return self.wake:signal()
end

-- Wakes the fetch loop because ready jobs may have appeared (a NOTIFY,
-- signal(), a reconnect): a group found empty is worth a claim again.
function Worker:_wake()
  self.wakes = self.wakes + 1
  self.drained = false
  return self:_nudge()
end

function Worker:_sleep(timeout)
  if self.woken then
    self.woken = false
    return
  end
  self.wake:wait(timeout)
  self.woken = false
  self.handoff = false
end

-- Runs fn until it succeeds, backing off while the database is away.
function Worker:_persist(what, fn, ...)
  local delay = 0.1
  while true do
    local ok, a, b = pcall(fn, ...)
    if ok then return a, b end
    self:_infra_error(what, a)
    if self.state == "stopped" then return nil end
    self.wake:wait(delay)
    delay = math.min(delay * 2, 10)
  end
end

-- ---- the local queue ----

function Worker:_queued()
  return self.qtail - self.qhead + 1
end

function Worker:_push(job)
  self.qtail = self.qtail + 1
  self.queue[self.qtail] = job
end

local function pop(self)
  local h, t = self.qhead, self.qtail
  if h > t then return nil end
  local queue = self.queue
  local job = queue[h]
  queue[h] = nil
  if h == t then
    self.qhead, self.qtail = 1, 0
  else
    self.qhead = h + 1
  end
  return job
end

-- ---- fetching ----

local result -- (below: records the outcome of a run)

-- A claimed job whose params cannot be decoded fails its run (retries
-- apply, then it stays as failed) without holding up the others.
function Worker:_undecodable(job, err)
  local message = "job params cannot be decoded: " .. tostring(err)
  log.error("job failed", { job = job.id, type = job.type, error = message })
  job.params = nil
  result(self, job, false, message, core.time(), nil, self.jobs.types[job.type])
end

local function claim_rows(tx, group, id, want)
  return tx:query(CLAIM, group, id, want)
end

function Worker:_claim(want)
  local id = self.id
  -- In a transaction: a claim whose rows cannot be read (out of memory)
  -- rolls back, where one that committed would leave them 'running' under
  -- this worker's id and in no runner's hands.
  local rows = self.pool:tx(claim_rows, self.group, id, want)
  local n = #rows
  if n == 0 then return 0 end
  if self.state ~= "running" or self.id ~= id then
    -- shutdown began while the claim was on its way (its hand-back is
    -- over, and the runners may be gone), or the worker was taken for dead
    -- and starts over under a new id: hand these back too
    local ids = {}
    for i = 1, n do ids[i] = rows[i].id end
    self:_persist("handing back jobs failed", self.pool.query, self.pool, HAND_BACK, ids, id)
    return n
  end
  local decode = json.decode
  for i = 1, n do
    local job = rows[i]
    local params = job.params
    local ok, value = true, nil
    if params then ok, value = pcall(decode, params) end
    if ok then
      job.params = value
      self:_push(job)
    else
      self:_undecodable(job, value)
    end
  end
  self.work:signal()
  return n
end

-- One claim, in a task of its own.  A claim that comes back short found
-- the group empty: no more claims until something wakes the worker.
function Worker:_claim_task(want)
  local wakes = self.wakes
  local n = self:_persist("claim failed", self._claim, self, want) or 0
  self.claims[task.current()] = nil
  self.claiming = self.claiming - want
  if n < want and self.wakes == wakes then self.drained = true end
  self:_nudge()
end

-- Starts claims while what is in hand or on its way is at refill_at or
-- below: up to MAX_CLAIMS at once, so that one is on its way while the
-- server works on another and the runners on what came back before.
local MAX_CLAIMS = 2

function Worker:_start_claims()
  local on_way = 0
  for _ in pairs(self.claims) do on_way = on_way + 1 end
  while not self.drained and self.state == "running" and on_way < MAX_CLAIMS do
    local held = self:_queued() + self.claiming
    if held > self.refill_at then return end
    local want = math.min(self.prefetch - held, self.claim_max)
    self.claiming = self.claiming + want
    self.claims[task.spawn(self._claim_task, self, want)] = true
    on_way = on_way + 1
  end
end

function Worker:_promote()
  local row = self.pool:one(PROMOTE, self.group)
  self.next_due = row.next_in and (core.now() + math.max(0, row.next_in)) or nil
  return row.promoted
end

function Worker:_reclaim()
  local now = core.now()
  local sweep = not self.swept_at or now - self.swept_at >= self.reclaim_after
  local row = self.pool:one(RECLAIM, self.reclaim_after, sweep, self.id)
  if sweep then self.swept_at = now end
  if row.reclaimed > 0 then
    log.warn("reclaimed jobs of workers that stopped heartbeating",
      { group = self.group, jobs = row.reclaimed })
  end
end

-- The fetch loop: claims while there is room, promotes due jobs on each
-- poll and when the earliest comes due, else waits for a wake-up.  What a
-- promotion readies is claimed on the next round.  (Reclaiming the jobs of
-- dead workers is the heartbeat loop's.)
function Worker:_fetch_loop()
  -- the first round polls: jobs may have come due while no worker ran
  local last_poll = core.now() - self.poll_interval
  while self.state == "running" do
    local now = core.now()
    local polling = now - last_poll >= self.poll_interval
    if polling then
      last_poll = now
      self.drained = false
    end
    self:_start_claims()
    local promoted = 0
    if polling or (self.next_due and now >= self.next_due) then
      promoted = self:_persist("promote failed", self._promote, self) or 0
      if promoted > 0 then self.drained = false end
    end
    if promoted == 0 then
      local timeout = self.poll_interval - (core.now() - last_poll)
      if self.next_due then timeout = math.min(timeout, self.next_due - core.now()) end
      if timeout > 0 then self:_sleep(timeout) end
    end
  end
end

-- ---- running ----

local now_time, is_cancelled = core.time, task.is_cancelled

local function micros(t)
  return math.floor(t * 1e6 + 0.5)
end

-- Records the outcome of a run (def: the job type's definition, if any).
function result(self, job, ok, err, started, retryable, def)
  local finished = now_time()
  local jtype = job.type
  local attempt = job.error_count + 1
  local failure
  if not ok then
    local retry = def and def.retry or DEFAULT_RETRY
    failure = { id = job.id, error = tostring(err),
                delay = math.min(retry.base_delay * attempt, MAX_DELAY),
                final = not retryable and attempt > retry.max }
    if getmetatable(err) == RetryAt then
      failure.at, failure.error = err.at, err.message
    end
    -- (a NUL byte or broken UTF-8 in the text would make the server refuse it)
    failure.error = json.clean_text(failure.error, MAX_ERROR)
  end
  local log_run = true
  local should_log = self.should_log_run
  if should_log then
    local lok, keep = pcall(should_log, job, { ok = ok, error = failure and failure.error,
      final = failure and failure.final, attempt = attempt, started_at = started,
      finished_at = finished })
    log_run = not lok or keep ~= false
  end
  local series = self.series[jtype]
  if not series then
    local group = self.group
    series = { duration = duration:with(group, jtype), completed = completed:with(group, jtype),
               failed = failed_total:with(group, jtype), retried = retried:with(group, jtype) }
    self.series[jtype] = series
  end
  series.duration:observe(finished - started)
  -- (the batch is looked up only now: should_log_run may have waited, and
  -- the flush loop taken the batch that was current before)
  local batch = self.results
  if ok then
    series.completed:inc()
    local done = batch.done
    done[#done + 1] = job.id
  else
    if failure.final then series.failed:inc() else series.retried:inc() end
    local failures = batch.failures
    failures[#failures + 1] = failure
  end
  if log_run then
    local m = batch.logged + 1
    batch.logged = m
    batch.ids[m], batch.types[m], batch.attempts[m], batch.oks[m] = job.id, jtype, attempt, ok
    batch.started[m], batch.finished[m] = micros(started), micros(finished)
  end
  local n = batch.n + 1
  batch.n = n
  if n == self.flush_count and self.flush_now:signal() then self.handoff = true end
end

local function handler_error(err)
  if getmetatable(err) == RetryAt or is_cancelled(err) then return err end
  -- (debug.traceback would cut the message at a NUL byte)
  local message = tostring(err):gsub("%z", "\\0")
  return debug.traceback(message, 2)
end

local function run_one(self, job, types, started)
  local def = types[job.type]
  if not def then
    result(self, job, false, ("no handler for job type %q in this worker"):format(job.type),
      started)
    return
  end
  local ok, err = xpcall(def.fn, handler_error, job)
  if not ok and not is_cancelled(err) and getmetatable(err) ~= RetryAt then
    log.error("job failed", { job = job.id, type = job.type, error = err })
  end
  result(self, job, ok, ok and nil or err, started, nil, def)
end

-- Handlers that never wait would keep the fetch and flush loops from
-- running until the local queue is empty.  So a runner passes after
-- PASS_EVERY jobs in a row, and every runner passes while a fetch or flush
-- it asked for (self.handoff) has not started: with many runners ready, a
-- loop that waited behind all of them would start too late.
local PASS_EVERY = 32

function Worker:_runner(slot)
  local streak = 0
  local in_flight, types, refill_at = self.in_flight, self.jobs.types, self.refill_at
  while true do
    if self.handoff or streak >= PASS_EVERY then
      streak = 0
      task.pass()
    end
    local started = now_time()
    if started >= self.alive_until and self.qhead <= self.qtail then
      if not self:_renew_lease() then return end
      started = now_time()
    end
    local job = pop(self)
    if job then
      self.running = self.running + 1
      if self.qtail - self.qhead + 1 <= refill_at and not self.woken and not self.drained
         and self:_nudge() then
        self.handoff = true
      end
      in_flight[slot] = job
      run_one(self, job, types, started)
      in_flight[slot] = nil
      local running = self.running - 1
      self.running = running
      streak = streak + 1
      if running == 0 and self.qhead > self.qtail then
        -- nothing left in hand: no reason to hold results back
        self.flush_now:signal()
      end
    elseif self.state ~= "running" then
      return
    else
      self.work:wait()
    end
  end
end

-- ---- writing results ----

-- FLUSH's parameters for a batch of results.
local function flush_params(batch)
  local int_array, m = db.int_array, batch.logged
  return int_array(batch.done), #batch.failures > 0 and json.encode(batch.failures) or "[]",
    int_array(batch.ids, m), db.text_array(batch.types, m), int_array(batch.attempts, m),
    int_array(batch.oks, m), int_array(batch.started, m), int_array(batch.finished, m)
end

-- Splits a batch in two halves of its results; a run to log goes with
-- its job's result.
local function split(batch)
  local halves, side = { new_batch(), new_batch() }, {}
  local half = batch.n // 2
  local function put(k, id)
    local h = halves[k <= half and 1 or 2]
    side[id] = h
    h.n = h.n + 1
    return h
  end
  for k, id in ipairs(batch.done) do
    local h = put(k, id)
    h.done[#h.done + 1] = id
  end
  for k, f in ipairs(batch.failures) do
    local h = put(#batch.done + k, f.id)
    h.failures[#h.failures + 1] = f
  end
  for m = 1, batch.logged do
    local h = side[batch.ids[m]] or halves[2]
    local i = h.logged + 1
    h.logged = i
    for _, column in ipairs(LOG_COLUMNS) do h[column][i] = batch[column][m] end
  end
  return halves[1], halves[2]
end

-- The one result of a batch the server refused, made writable: its job
-- fails for good with the server's reason (a retry would be refused
-- again), and its run is logged as failed.
local function refused_result(batch, err)
  local b = new_batch()
  local id = batch.done[1] or batch.failures[1].id
  b.n = 1
  b.failures[1] = { id = id, delay = 0, final = true,
    error = json.clean_text("the server refused this run's result: " .. tostring(err), MAX_ERROR) }
  if batch.logged == 1 then
    for _, column in ipairs(LOG_COLUMNS) do b[column][1] = batch[column][1] end
    b.oks[1], b.logged = false, 1
  end
  return b
end

-- Whether err says the server refused what the statement holds (a data
-- exception, an integrity violation, a limit exceeded) or the values
-- could not be encoded (22000, from _flush): writing the same results
-- again would fail again.  Anything else (a lost link, a busy or
-- restarting server) is worth another try.
local function refused(err)
  if not db.is_error(err) then return false end
  local class = tostring(err.sqlstate):sub(1, 2)
  return class == "22" or class == "23" or class == "54"
end

function Worker:_flush(batch)
  local ok, done, failures, ids, types, attempts, oks, started, finished =
    pcall(flush_params, batch)
  if not ok then
    error(core.error("22000", "results cannot be encoded: " .. tostring(done)), 0)
  end
  return self.pool:one(FLUSH, done, failures, ids, types, attempts, oks, started, finished,
    self.id, self.group)
end

-- Writes a batch; returns nothing when it is written, else what is left
-- unwritten and why.  A batch the server refuses is halved until the
-- result it refuses is alone, and that result's job fails for good: the
-- other results are written, and no batch is retried for ever.
function Worker:_write_all(batch)
  local ok, err = pcall(self._flush, self, batch)
  if ok then
    self:_arm_retries(batch)
    return
  end
  if not refused(err) then return batch, err end
  if batch.n > 1 then
    local a, b = split(batch)
    local left, lerr = self:_write_all(a)
    if left then return merge(left, b), lerr end
    return self:_write_all(b)
  end
  local last = refused_result(batch, err)
  log.error("job worker: the server refused a result; its job fails for good",
    { group = self.group, job = last.failures[1].id, error = tostring(err) })
  local lok, lerr = pcall(self._flush, self, last)
  if lok then return end
  if not refused(lerr) then return batch, lerr end
  -- nothing about this job can be written: it stays running until the
  -- worker is taken for dead
  log.error("job worker: the server refused a result twice; it is dropped",
    { group = self.group, job = last.failures[1].id, error = tostring(lerr) })
end

-- Writes one batch of results; what it could not write goes back for the
-- next try.
function Worker:_write(batch)
  local left, err = self:_write_all(batch)
  self.writers = self.writers - 1
  if left then
    self.results = merge(left, self.results)
    self.write_failed = true
    self:_infra_error("writing results failed", err)
  end
  self.flushed:signal()
end

-- Failed runs just written went back to 'scheduled': wake up in time to
-- promote the earliest (no NOTIFY announces them).
function Worker:_arm_retries(batch)
  local due
  local now, wall = core.now(), core.time()
  for _, f in ipairs(batch.failures) do
    if not f.final then
      local at = f.at and (now + (f.at - wall)) or (now + f.delay)
      if not due or at < due then due = at end
    end
  end
  if due then
    if not self.next_due or due < self.next_due then self.next_due = due end
    self:_wake()
  end
end

-- Hands results to writer tasks: a batch at flush_count results or
-- flush_age seconds, up to MAX_WRITERS batches on their way at once (the
-- server works on two while the worker runs handlers).
local MAX_WRITERS = 2

function Worker:_flush_loop()
  local backoff = 0.1
  while true do
    if self.results.n < self.flush_count and self.state ~= "stopped" then
      self.flush_now:wait(self.flush_age)
      self.handoff = false
    end
    while self.writers >= MAX_WRITERS do self.flushed:wait() end
    if self.write_failed then
      -- the database is away: keep what we have and try again later
      self.write_failed = false
      task.sleep(backoff)
      backoff = math.min(backoff * 2, 10)
    else
      backoff = 0.1
    end
    local batch = self.results
    if batch.n > 0 then
      self.results = new_batch()
      self.writers = self.writers + 1
      task.spawn(self._write, self, batch).cleanup = true -- see lifecycle.lua
    elseif self.state == "stopped" and self.writers == 0 then
      return
    elseif self.state == "stopped" then
      self.flushed:wait()
    end
  end
end

-- ---- the lease ----
--
-- Others take the worker for dead once its heartbeat is reclaim_after
-- old, and run its jobs.  The lease, alive_until, is when that can
-- first happen by this process's clock: reclaim_after past the sending of
-- the last heartbeat that found the worker's row.  (Wall-clock time, which
-- runners read anyway for each run's start; a clock jump forward costs an
-- early heartbeat.)  Past it (the process was stopped, paused or cut off
-- from the server) no runner starts a job until a heartbeat tells whether
-- the jobs in hand are still the worker's.

-- Beats; when the worker's row is gone (taken for dead, its jobs handed
-- back), drops the jobs not started and registers again.
function Worker:_beat()
  local sent = now_time()
  local ok, beat = pcall(self.pool.exec, self.pool, HEARTBEAT, self.id)
  if not ok then
    self:_infra_error("heartbeat failed", beat)
    return
  end
  if beat == 0 and not self:_register_again() then return end
  self.alive_until = sent + self.reclaim_after
  self.past_lease = false
  self.alive:signal()
end

-- Others took us for dead and handed our jobs back: they run the claimed
-- jobs not started, and results of the others will be refused.  So drop
-- the claimed ones and start over under a new id.
function Worker:_register_again()
  local old, dropped = self.id, {}
  for job in pop, self do dropped[#dropped + 1] = job.id end
  if #dropped > 0 then
    -- (rows a claim under the old id took after the hand-back are
    -- nobody's: give them back; any others are not ours and stay)
    local ok, err = pcall(self.pool.query, self.pool, HAND_BACK, dropped, old)
    if not ok then self:_infra_error("handing back jobs failed", err) end
  end
  local ok, row = pcall(self.pool.one, self.pool, REGISTER, self.group, self.name)
  if not ok then
    self:_infra_error("registering the worker again failed", row)
    return false
  end
  self.id = row.id
  log.warn("job worker was taken for dead, registered again",
    { group = self.group, old = old, worker = row.id, dropped = #dropped })
  self:_wake()
  return true
end

-- A runner about to start a job past the lease: asks for a heartbeat now
-- and waits for it.  Returns false when the worker stops meanwhile.
function Worker:_renew_lease()
  if not self.past_lease then
    self.past_lease = true
    log.warn("job worker is past its lease: no job starts until a heartbeat",
      { group = self.group, worker = self.id, late = now_time() - self.alive_until })
  end
  while now_time() >= self.alive_until do
    if self.state ~= "running" then return false end
    self.beat_now:signal()
    self.alive:wait(self.heartbeat_interval)
  end
  return true
end

-- Beats, and hands back the jobs of workers that stopped beating: at
-- start-up (they may have died while no worker ran) and after each beat.
function Worker:_heartbeat_loop()
  while self.state == "running" do
    local ok, err = pcall(self._reclaim, self)
    if not ok then self:_infra_error("reclaim failed", err) end
    self.beat_now:wait(self.heartbeat_interval)
    if self.state ~= "running" then break end
    self:_beat()
  end
end

-- ---- life cycle ----

function Worker:_listen()
  local sub = self.subscriber
  if not sub then
    sub = require("pgcoord").subscriber(self.pool)
    self.own_subscriber = sub
  end
  -- (re)connected: notifications may have been missed, so claim and
  -- promote at once (next_due = now)
  self.unhook = sub:hook_reconnect(function()
    self.next_due = core.now()
    self:_wake()
  end)
  local fan = sub:channel(CHANNEL)
  local group = self.group
  self.listener = fan:on(function(msg)
    local due = msg.due_in
    if type(due) == "number" and due > 0 then
      local at = core.now() + due
      if not self.next_due or at < self.next_due then self.next_due = at end
    end
    self:_wake()
  end, { filter = function(msg) return type(msg) == "table" and msg.group == group end })
  if self.own_subscriber then sub:start() end
end

function Worker:_main()
  local pgcoord = require "pgcoord"
  self.flush_now = task.cond()
  self.name = ("%s:%d"):format(os.getenv("HOSTNAME") or "localhost", core.getpid())
  local sent = now_time()
  local row = self:_persist("registering the worker failed",
    self.pool.one, self.pool, REGISTER, self.group, self.name)
  if not row then return end
  self.id = row.id
  self.alive_until = sent + self.reclaim_after
  self:_listen()
  self.state = "running"
  pgcoord.on_stop(function() self:shutdown() end)
  self.flusher = task.spawn(self._flush_loop, self)
  self.flusher.cleanup = true -- the stop's writes go through it
  self.heartbeater = task.spawn(self._heartbeat_loop, self)
  self.runners = {}
  for i = 1, self.concurrency do self.runners[i] = task.spawn(self._runner, self, i) end
  log.info("job worker started", { group = self.group, worker = self.id,
    concurrency = self.concurrency })
  self.started:signal()
  self:_fetch_loop()
end

-- Waits until the worker is registered and listening.
function Worker:ready()
  while self.state == "starting" do self.started:wait() end
  return self.state == "running"
end

-- Wakes the worker to look for jobs at once.
function Worker:signal()
  self:_wake()
end

local FETCH_GRACE = 1

-- Stops fetching, hands back claimed jobs not yet started, waits for
-- running handlers (up to timeout, then cancels them as failed and
-- retryable), writes every result, and deregisters.
function Worker:shutdown(timeout)
  if self.state == "stopping" or self.state == "stopped" then
    -- another call is at it, or it is over (done is signalled once)
    while self.state ~= "stopped" do self.done:wait() end
    return
  end
  self.done = task.cond()
  self:ready()
  self.state = "stopping"
  self:_wake()
  self.work:signal()
  self.alive:signal() -- (runners waiting for a heartbeat: none comes now)
  -- nothing of the heartbeat loop's needs finishing, and a reclaim of its
  -- may wait on a lock: stop it where it is
  self.heartbeater:cancel()
  if self.listener then self.listener:close() end
  if self.unhook then self.unhook() end
  if self.own_subscriber then self.own_subscriber:stop() end
  -- A claim or promotion on its way gets a moment to land (a claim that
  -- lands then hands its jobs back itself); one held up longer, by a lock
  -- say, is cancelled and its transaction rolls back.
  local grace = core.now() + math.min(timeout or FETCH_GRACE, FETCH_GRACE)
  local function left(deadline) return deadline and math.max(0, deadline - core.now()) end
  for t in pairs(self.claims) do
    if not t:wait(left(grace)) then t:cancel() end
  end
  if not self.main:wait(left(grace)) then self.main:cancel() end
  local back = {}
  for job in pop, self do back[#back + 1] = job.id end
  if #back > 0 then
    self:_persist("handing back jobs failed", self.pool.query, self.pool, HAND_BACK, back, self.id)
  end
  local deadline = timeout and core.now() + timeout
  for _, r in ipairs(self.runners) do
    if not r:wait(left(deadline)) then
      r:cancel()
    end
  end
  self:_cancelled_results()
  self.state = "stopped"
  self.flush_now:signal()
  self.flusher:wait()
  pcall(self.pool.exec, self.pool, "DELETE FROM pgcoord.job_workers WHERE id = $1", self.id)
  log.info("job worker stopped", { group = self.group, worker = self.id })
  self.done:signal()
end

-- Runners cancelled mid-job leave no result: record them as retryable.
function Worker:_cancelled_results()
  for slot, job in pairs(self.in_flight) do
    self.in_flight[slot] = nil
    result(self, job, false, "cancelled at shutdown", core.time(), true,
      self.jobs.types[job.type])
  end
end

function Worker:stats()
  return { group = self.group, id = self.id, state = self.state, queued = self:_queued(),
           running = self.running, unflushed = self.results.n }
end

return jobs

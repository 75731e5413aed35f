-- The job runner: typed jobs in groups, scheduled in the caller's
-- transaction, worked by workers (worker.lua) that claim batches, run
-- handlers with a concurrency limit and write results back in batches
-- (completer.lua), keeping their lease and their group's due jobs
-- (maintenance.lua).  Every statement is in sql.lua.
--
-- This file is the public object: definitions, scheduling, failed jobs,
-- and jobs:worker(), which checks the worker's options.
local json = require "pgcoord.json"
local options = require "pgcoord.options"
local db = require "pgcoord.db"
local sql = require "pgcoord.jobs.sql"
local worker = require "pgcoord.jobs.worker"
local retention = require "pgcoord.jobs.retention"
local limits = require "pgcoord.jobs.limits"
local control = require "pgcoord.jobs.control"
local periodic = require "pgcoord.jobs.periodic"

local jobs = {}
setmetatable(jobs, { __call = function(_, pool, opts) return jobs.new(pool, opts) end })

local Jobs = {}
Jobs.__index = Jobs

local raise = options.raise
local DEFAULT_RETRY, MAX_DELAY = worker.DEFAULT_RETRY, worker.MAX_DELAY

-- Times accepted for run_at and retry_at (epoch seconds): years 1 to 9999,
-- far inside PostgreSQL's timestamptz range (4713 BC to 294276 AD), so that
-- no time given can make a job's row unwritable.
local MIN_TIME, MAX_TIME = -62135596800, 253402300799
local TIME_RANGE = ("epoch seconds from %d to %d (years 1 to 9999)"):format(MIN_TIME, MAX_TIME)

local function is_time(t)
  return type(t) == "number" and t >= MIN_TIME and t <= MAX_TIME -- (false for NaN)
end

local text_problem, check_text = json.text_problem, json.check_text

-- Raises naming the first key of opts that known lacks.
local function refuse_unknown(where, opts, known)
  for k in pairs(opts) do
    if not known[k] then raise("unknown option %s for %s", options.show(k), where) end
  end
end

-- ---- errors that steer retries -----------------------------------------------

-- error(pgcoord.retry_at(t, "reason")) retries the job at time t (epoch s).
function jobs.retry_at(t, reason)
  if not is_time(t) then
    raise("pgcoord.retry_at: time must be %s, got %s", TIME_RANGE, tostring(t))
  end
  return worker.retry_at(t, reason)
end

-- error(pgcoord.snooze(seconds, "why")) runs the job again after seconds,
-- without counting an attempt.
function jobs.snooze(seconds, why)
  if type(seconds) ~= "number" or not (seconds >= 0 and seconds <= MAX_DELAY) then
    raise("pgcoord.snooze: seconds must be a number from 0 to %d, got %s", MAX_DELAY,
      options.show(seconds))
  end
  return control.snooze(seconds, why)
end

-- A ready should_log_run: keeps a job's final run only.
function jobs.log_final_runs(_, run)
  return run.ok or run.final
end

-- ---- definitions and scheduling ----------------------------------------------

local check_new = options.spec("pgcoord.jobs", { subscriber = { "table" } })

function jobs.new(pool, opts)
  if type(pool) ~= "table" or type(pool.query) ~= "function" then
    raise("pgcoord.jobs: expected a pool from pgcoord.connect, got %s", type(pool))
  end
  local o = check_new(opts)
  return setmetatable({ pool = pool, types = {}, groups = {}, subscriber = o.subscriber,
                        periodics = {} }, Jobs)
end

local check_define = options.spec("jobs:define", {
  group = { "string", default = "default" },
  retry = { "table" },
  timeout = { "number", above = 0, max = MAX_DELAY },
})

local RETRY_RULES = {
  max = { "integer", min = 0, default = DEFAULT_RETRY.max },
  base_delay = { "number", min = 0, max = MAX_DELAY, default = DEFAULT_RETRY.base_delay },
}

-- (an unknown key names the function only, as every unknown option does)
local function check_retry(where, retry)
  if retry == nil then return DEFAULT_RETRY end
  local out = {}
  for k in pairs(retry) do
    if not RETRY_RULES[k] then
      raise("unknown option %s for jobs:define", options.show("retry." .. tostring(k)))
    end
  end
  for name, rule in pairs(RETRY_RULES) do
    local v = retry[name]
    out[name] = v == nil and rule.default or options.check(where, "retry." .. name, rule, v)
  end
  return out
end

function Jobs:define(jtype, fn, opts)
  if type(jtype) ~= "string" or jtype == "" then
    raise("jobs:define: type must be a non-empty string, got %s", tostring(jtype))
  end
  check_text("jobs:define", "type", jtype)
  local where = ("jobs:define %q"):format(jtype)
  if type(fn) ~= "function" then
    raise("%s: handler must be a function, got %s", where, type(fn))
  end
  local o = check_define(opts)
  check_text(where, "group", o.group)
  self.types[jtype] = { fn = fn, group = o.group, retry = check_retry(where, o.retry),
                        timeout = o.timeout }
  self.groups[o.group] = true
  return self
end

local SCHEDULE_OPTIONS = { group = true, run_at = true, priority = true, key = true }
local ITEM_FIELDS = { type = true, params = true, group = true, run_at = true, priority = true,
                      key = true }

-- Checks one job to schedule; returns the row for SQL or raises at the
-- caller's line, naming `where` (the function, and the item of a batch).
function Jobs:_job_row(jtype, params, opts, where)
  local def = self.types[jtype]
  if not def then
    raise("%s: unknown job type %q (define it first)", where, tostring(jtype))
  end
  opts = opts or {}
  local group = opts.group or def.group
  if not self.groups[group] then
    raise("%s: unknown group %q", where, tostring(group))
  end
  local ok, encoded = true, nil
  if params ~= nil then ok, encoded = pcall(json.encode, params) end
  if not ok then
    raise("%s %q: params cannot be encoded as JSON: %s", where, jtype, encoded)
  end
  local run_at = opts.run_at
  if run_at ~= nil and not is_time(run_at) then
    raise("%s %q: run_at must be a time in %s, got %s", where, jtype, TIME_RANGE, tostring(run_at))
  end
  local priority = opts.priority or 0
  if math.type(priority) ~= "integer" or priority < -0x80000000 or priority > 0x7fffffff then
    raise("%s %q: priority must be an integer from -2147483648 to 2147483647, got %s",
      where, jtype, tostring(priority))
  end
  local key = opts.key
  if key ~= nil and (type(key) ~= "string" or key == "") then
    raise("%s %q: key must be a non-empty string", where, jtype)
  end
  local problem = key and text_problem(key)
  if problem then raise("%s %q: key %s", where, jtype, problem) end
  return { g = group, type = jtype, priority = priority, params = encoded, key = opts.key,
           at = run_at }
end

local SCHEDULE_NOW_OPTIONS = { group = true, priority = true, key = true }

local function schedule(self, where, known, db_or_tx, jtype, params, opts)
  if opts ~= nil then
    if type(opts) ~= "table" then
      raise("%s: options must be a table, got %s", where, type(opts))
    end
    refuse_unknown(where, opts, known)
  end
  local r = self:_job_row(jtype, params, opts, where)
  local row = db_or_tx:one(sql.SCHEDULE, r.g, r.type, r.priority, r.params, r.key, r.at)
  if not row then
    return nil, ("an unfinished job already has key %q"):format(r.key)
  end
  return row.id
end

-- Schedules one job in db_or_tx's transaction; returns its id, or nil and
-- a message when a pending job already has opts.key.
function Jobs:schedule(db_or_tx, jtype, params, opts)
  return schedule(self, "jobs:schedule", SCHEDULE_OPTIONS, db_or_tx, jtype, params, opts)
end

-- The same, due now: run_at is refused (rather than ignored).
function Jobs:schedule_now(db_or_tx, jtype, params, opts)
  return schedule(self, "jobs:schedule_now", SCHEDULE_NOW_OPTIONS, db_or_tx, jtype, params, opts)
end

-- Schedules many jobs in one statement: list of { type =, params =,
-- run_at =, group =, priority =, key = }.  Returns the ids inserted.
function Jobs:schedule_many(db_or_tx, list)
  if type(list) ~= "table" then
    raise("jobs:schedule_many: expected a list of jobs, got %s", type(list))
  end
  if #list == 0 then return {} end
  -- params are JSON already: splice them in rather than encode twice
  local parts = {}
  for i, item in ipairs(list) do
    if type(item) ~= "table" then
      raise("jobs:schedule_many: item %d is not a table", i)
    end
    local where = ("jobs:schedule_many (item %d)"):format(i)
    refuse_unknown(where, item, ITEM_FIELDS)
    local r = self:_job_row(item.type, item.params, item, where)
    local params = r.params
    r.params = nil
    local head = json.encode(r):sub(1, -2)
    parts[i] = params and (head .. ',"params":' .. params .. "}") or (head .. "}")
  end
  local result = db_or_tx:query(sql.SCHEDULE_MANY, "[" .. table.concat(parts, ",") .. "]")
  local ids = {}
  for i, row in ipairs(result) do ids[i] = row.id end
  return ids
end

local check_failed = options.spec("jobs:failed", {
  group = { "string" },
  limit = { "integer", min = 0, default = 100 },
})

-- Jobs whose retries ran out, kept for a look and a retry.  (params are
-- decoded per job: one that cannot be, params_error says why.)
function Jobs:failed(opts)
  local o = check_failed(opts)
  local rows = self.pool:query(sql.FAILED, o.group, o.limit)
  for _, row in ipairs(rows) do
    if row.params then row.params, row.params_error = json.try_decode(row.params) end
  end
  return rows
end

-- Schedules failed jobs (one id or a list) to run again now; returns how
-- many it rescheduled.
function Jobs:retry(ids)
  if type(ids) ~= "table" then ids = { ids } end
  return self.pool:one(sql.RETRY, ids).retried
end

-- Schedules the failed jobs of group (at most limit, 10000, oldest
-- first) to run again now; returns how many.
function Jobs:retry_failed(group, limit)
  if type(group) ~= "string" or group == "" then
    raise("jobs:retry_failed: group must be a non-empty string, got %s", options.show(group))
  end
  limit = limit or 10000
  if math.type(limit) ~= "integer" or limit < 1 then
    raise("jobs:retry_failed: limit must be a positive integer, got %s", options.show(limit))
  end
  return self.pool:one(sql.RETRY_GROUP, group, limit).retried
end

-- Deletes failed or cancelled jobs (one id or a list); returns how many.
-- Jobs in any other state are left alone.
function Jobs:delete(ids)
  if type(ids) ~= "table" then ids = { ids } end
  for i, id in ipairs(ids) do
    if math.type(id) ~= "integer" then
      raise("jobs:delete: job id must be an integer, got %s (item %d)", options.show(id), i)
    end
  end
  if #ids == 0 then return 0 end
  return self.pool:exec(sql.DELETE_FINISHED, db.int_array(ids))
end

-- Jobs, oldest first: { id, group, type, state, priority, params, error_count,
-- last_error, inserted_at, run_at, locked_by }; opts: group, state, id,
-- limit (100).  (For a look from the shell: no index serves every filter.)
local check_list = options.spec("jobs:list", {
  group = { "string" },
  state = { "string" },
  id = { "integer" },
  limit = { "integer", min = 1, max = 100000, default = 100 },
})

function Jobs:list(opts)
  local o = check_list(opts)
  local rows = self.pool:query(sql.LIST, o.group, o.state, o.id, o.limit)
  rows.affected = nil
  for _, row in ipairs(rows) do
    if row.params then row.params, row.params_error = json.try_decode(row.params) end
  end
  return rows
end

-- The logged runs of a job (at most limit, 100): { attempt, ok, error,
-- started_at, finished_at, worker_id, type, group }.
function Jobs:runs(id, limit)
  if math.type(id) ~= "integer" then
    raise("jobs:runs: id must be an integer, got %s", options.show(id))
  end
  limit = limit or 100
  if math.type(limit) ~= "integer" or limit < 1 then
    raise("jobs:runs: limit must be a positive integer, got %s", options.show(limit))
  end
  local rows = self.pool:query(sql.RUNS, id, limit)
  rows.affected = nil
  return rows
end

-- Deletes logged runs, failed jobs and cancelled jobs older than the times
-- given (epoch seconds), in small batches: see retention.lua.
function Jobs:prune(opts)
  return retention.prune(self.pool, opts)
end

-- ---- pause and limits of a group (limits.lua) ------------------------------------

-- Persisted; every worker of the group, in every process, stops starting
-- its jobs within a second (running handlers finish).  Each returns the
-- group's settings { paused =, concurrency =, rate = }.
-- Pauses or resumes any group by name, whether or not this process
-- defines a job type in it (for the shell and the dashboard).
function jobs.set_paused(pool, group, paused, where)
  return limits.set_paused(pool, nil, group, paused, where)
end

function Jobs:pause(group)
  return limits.set_paused(self.pool, self.groups, group, true, "jobs:pause")
end

function Jobs:resume(group)
  return limits.set_paused(self.pool, self.groups, group, false, "jobs:resume")
end

function Jobs:paused(group)
  return limits.paused(self.pool, self.groups, group)
end

-- { concurrency = n, rate = per_second } across every worker of the group;
-- a limit left out is cleared (jobs:limit(group) clears both).
function Jobs:limit(group, opts)
  return limits.set(self.pool, self.groups, group, opts)
end

function Jobs:limits(group)
  return limits.get(self.pool, self.groups, group)
end

-- Cancels jobs not finished yet (one id or a list): waiting ones are kept
-- as 'cancelled', running ones' handlers are cancelled on the worker that
-- runs them; none runs again.  Returns how many it cancelled (unknown or
-- finished ids count 0), and how many of those were running.
function Jobs:cancel(ids)
  return control.cancel(self.pool, ids)
end

-- A job by id with its state, progress, last_error and runs; a completed
-- job from its history.  nil when nothing is known of it.
function Jobs:get(id)
  return control.get(self.pool, id)
end

-- ---- the worker ----------------------------------------------------------------

-- Bounds of the numeric options.  An interval shorter than 0.01 s makes
-- its loop spin; a task per unit of concurrency makes a huge concurrency
-- stall the loop while they start; batches and intervals past the top
-- make statements the server refuses or memory no worker needs.
local check_worker = options.spec("jobs:worker", {
  group = { "string", default = "default" },
  concurrency = { "integer", default = 10, min = 1, max = 10000 },
  prefetch = { "integer", default = 1000, min = 1, max = 100000 },
  poll_interval = { "number", default = 10, min = 0.01, max = 1000000 },
  flush_count = { "integer", default = 500, min = 1, max = 100000 },
  flush_age = { "number", default = 1, min = 0.01, max = 1000000 },
  heartbeat_interval = { "number", default = 10, min = 0.01, max = 1000000 },
  vacuum_every = { "integer", default = 100000, min = 0, max = 1000000000 }, -- (jobs/vacuum.lua)
  reclaim_after = { "number", min = 0.01, max = 1000000 }, -- (default: 6 heartbeats)
  should_log_run = { "function" },
  handle_error = { "function" },
  subscriber = { "table" },
  retention = { "table" }, -- (checked by retention.check)
})

function Jobs:worker(opts)
  local o = check_worker(opts)
  if o.retention then o.retention = retention.check("jobs:worker", o.retention) end
  o.subscriber = o.subscriber or self.subscriber
  o.reclaim_after = o.reclaim_after or 6 * o.heartbeat_interval
  if o.reclaim_after <= o.heartbeat_interval then
    raise("jobs:worker: reclaim_after (%s) must exceed heartbeat_interval (%s)",
      o.reclaim_after, o.heartbeat_interval)
  end
  if not self.groups[o.group] then
    raise("jobs:worker: unknown group %q (no job type is defined in it)", o.group)
  end
  if o.prefetch < o.concurrency then o.prefetch = o.concurrency end
  self.working = true
  if next(self.periodics) then self:scheduler() end
  -- claim again once a quarter of prefetch has been taken: a claim is on
  -- its way while the runners work through the rest
  o.refill_at = o.prefetch - math.max(1, o.prefetch // 4)
  o.claim_max = math.max(1, o.prefetch // 2)
  return worker.new(self.types, self.pool, o)
end

-- ---- periodic jobs (periodic.lua) ----------------------------------------------

-- Declares periodic job name: a job of jtype with params for each slot of
-- spec (cron, @daily..., "@every 90s").  The scheduler starts with this
-- object's first worker (or jobs:scheduler()); declaring a name again
-- replaces it from its next slot.
function Jobs:periodic(name, spec, jtype, params, opts)
  local decl = periodic.declaration(name, spec, opts)
  local r = self:_job_row(jtype, params, { group = decl.group }, ("jobs:periodic %q"):format(name))
  decl.type, decl.group, decl.params = r.type, r.g, r.params
  self.periodics[name] = decl
  if self.sched and self.sched.state == "running" then
    self.sched:changed()
  elseif self.working then
    self:scheduler()
  end
  return self
end

-- { { name, spec, group, type, timezone, backfill, next_run, last_run }, ... }
function Jobs:periodic_list()
  return periodic.list(self.pool, self.periodics)
end

-- The scheduler of this object's periodic jobs (started if it is not
-- running): it competes for the fleet's periodic lock until stopped.
function Jobs:scheduler()
  if not self.sched or self.sched.state ~= "running" then
    self.sched = periodic.new(self.pool, self.periodics, { subscriber = self.subscriber })
  end
  return self.sched
end

return jobs

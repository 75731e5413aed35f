-- Steering jobs from outside their handlers and from inside them:
-- jobs:cancel, jobs:get, job:progress, and the snooze error.
--
-- A cancel is one statement: waiting jobs (ready, scheduled, failed) and
-- running ones alike become 'cancelled', with locked_by cleared, so that
-- the result their worker may still write is refused by FLUSH (which
-- takes only rows the worker holds) and the job never runs again.  A
-- running job's run is logged as cancelled by that statement too, so the
-- history holds even if its worker is gone; the worker is told by a
-- NOTIFY naming its id and the jobs, and cancels the handler's task
-- (Worker:cancel_jobs).  A cancel that races the job's completion is
-- serialised by the row lock: either the completion deleted the row
-- first (cancel counts 0) or the cancel took it (counts 1, the result is
-- dropped).
local json = require "pgcoord.json"
local options = require "pgcoord.options"
local metrics = require "pgcoord.metrics"
local db = require "pgcoord.db"
local sql = require "pgcoord.jobs.sql"

local control = {}

local raise = options.raise

local cancelled_total = metrics.counter("pgcoord_jobs_cancelled_total",
  "Jobs cancelled by jobs:cancel (waiting or running), counted where cancel was called.",
  { "group", "state" })

-- ---- snooze ------------------------------------------------------------------

-- The error of pgcoord.snooze: the job runs again after seconds, and the
-- run is no attempt (error_count unchanged, snoozes counted).
local Snooze = {}
Snooze.__index = Snooze
Snooze.__tostring = function(e) return ("snoozed for %g s: %s"):format(e.seconds, e.message) end

function control.snooze(seconds, why)
  return setmetatable({ seconds = seconds, message = tostring(why or "snoozed") }, Snooze)
end

function control.is_snooze(err)
  return getmetatable(err) == Snooze
end

-- ---- cancel --------------------------------------------------------------------

-- The ids of jobs:cancel's argument (one id or a list), checked.
local function id_list(where, ids)
  if type(ids) ~= "table" then ids = { ids } end
  for i, id in ipairs(ids) do
    if math.type(id) ~= "integer" then
      raise("%s: job id must be an integer, got %s%s", where, options.show(id),
        #ids > 1 and (" (item %d)"):format(i) or "")
    end
  end
  return ids
end

-- Cancels the jobs not finished yet among ids; returns how many it
-- cancelled, and how many of those were running (their workers told).
-- Unknown, finished or already cancelled ids count 0.
function control.cancel(pool, ids)
  ids = id_list("jobs:cancel", ids)
  if #ids == 0 then return 0, 0 end
  local n, running = 0, 0
  for _, row in ipairs(pool:query(sql.CANCEL, db.int_array(ids))) do
    n = n + row.n
    if row.was == "running" then running = running + row.n end
    cancelled_total:inc(row.n, row.group, row.was)
  end
  return n, running
end

-- ---- get -----------------------------------------------------------------------

local function decode_field(row, field)
  if row[field] then row[field], row[field .. "_error"] = json.try_decode(row[field]) end
end

-- The job with its state, params, progress, last_error and runs (oldest
-- first); a job no longer in the table (completed and deleted) from its
-- history: state 'completed' when a run succeeded.  nil when nothing is
-- known of id.
-- (a job retried for ever must not make jobs:get unbounded)
local MAX_RUNS = 1000

function control.get(pool, id)
  if math.type(id) ~= "integer" then
    raise("jobs:get: job id must be an integer, got %s", options.show(id))
  end
  local job = pool:one(sql.GET, id)
  local runs = pool:query(sql.RUNS, id, MAX_RUNS)
  if not job then
    local last = runs[#runs]
    if not last then return nil end
    local completed = false
    for _, run in ipairs(runs) do completed = completed or run.ok end
    job = { id = id, group = last.group, type = last.type,
            state = completed and "completed" or "deleted" }
  end
  decode_field(job, "params")
  decode_field(job, "progress")
  job.runs = {}
  for i, run in ipairs(runs) do
    run.group, run.type = nil, nil
    job.runs[i] = run
  end
  return job
end

-- ---- progress ------------------------------------------------------------------

-- The metatable of a worker's claimed jobs: job:progress(value) saves
-- value on the job's row at once, while worker_id() still holds it.
-- Returns whether it was saved (false: the job is no longer this
-- worker's, cancelled say).
function control.job_meta(pool, worker_id)
  local methods = {}
  function methods.progress(job, value)
    local encoded
    if value ~= nil then
      local ok, s = pcall(json.encode, value)
      if not ok then raise("job:progress: value cannot be encoded as JSON: %s", tostring(s)) end
      if not utf8.len(s) then
        raise("job:progress: value contains a string that is not valid UTF-8")
      end
      encoded = s
    end
    return pool:exec(sql.PROGRESS, job.id, encoded, worker_id()) == 1
  end
  return { __index = methods }
end

return control

-- pgcoord: coordinate services through PostgreSQL.
--
-- This file is the public API; each primitive lives in its own module and
-- is loaded the first time it is used.
local core = require "pgcoord.core"
local json = require "pgcoord.json"

local task = require "pgcoord.task"
local log = require "pgcoord.log"
local db = require "pgcoord.db"
local lifecycle = require "pgcoord.lifecycle"
local notify = require "pgcoord.notify"

local pgcoord = {
  version = core.version,
  null = json.null,
  json = json,
  log = log,
}

task.set_reporter(function(t, err, trace)
  log.error("task failed", { task = t.id, error = tostring(err), traceback = trace })
end)
core.set_reporter(function(message)
  log.error("callback failed", { error = message })
end)

-- ---- runtime ----------------------------------------------------------------

pgcoord.spawn = task.spawn
pgcoord.sleep = task.sleep
pgcoord.now = core.now
pgcoord.time = core.time
pgcoord.current_task = task.current
pgcoord.is_cancelled = task.is_cancelled

pgcoord.on_stop = lifecycle.on_stop
pgcoord.stopping = lifecycle.stopping
pgcoord.stop = lifecycle.stop

local signals

-- First SIGINT/SIGTERM: graceful stop; second: exit at once.
function pgcoord.handle_signals()
  if signals then return end
  local function on_signal(signum)
    local name = log.signal_name(signum)
    if lifecycle.stopping() then
      log.warn("second signal, exiting at once", { signal = name })
      os.exit(128 + signum, false)
    end
    log.info("stopping gracefully", { signal = name })
    pgcoord.stop()
  end
  signals = { core.signal(2, on_signal), core.signal(15, on_signal) }
end

-- Runs the loop until no task is left (after pgcoord.stop(), once the
-- stop handlers and the tasks they end have finished).  Returns false
-- when a stop ran past its deadline and tasks had to be cancelled.
function pgcoord.run()
  pgcoord.handle_signals()
  while task.live() > 0 do core.step() end
  lifecycle.finished()
  return not lifecycle.expired()
end

-- One loop iteration, waiting at most timeout seconds (nil: until an event).
function pgcoord.step(timeout)
  return core.step(timeout)
end

-- Embedding in another event loop: the host polls pollfd() for reading,
-- waits at most next_timeout() seconds (nil: no limit), and calls step(0)
-- when either fires.  next_timeout() is 0 while work is ready, so a host
-- asks for it again before every wait (README: the luv and cqueues recipes).
pgcoord.pollfd = core.pollfd
pgcoord.next_timeout = core.next_timeout

-- ---- database -----------------------------------------------------------------

pgcoord.connect = db.connect

function pgcoord.is_error(err)
  return db.is_error(err)
end

-- True when err is a constraint violation (of the named constraint, if given).
function pgcoord.is_constraint_error(err, name)
  if not db.is_error(err) or type(err.sqlstate) ~= "string" then return false end
  if err.sqlstate:sub(1, 2) ~= "23" then return false end
  return name == nil or err.constraint == name
end

-- NOTIFY channel with value as JSON, inside db_or_tx's transaction if any.
pgcoord.publish = notify.publish

function pgcoord.migrate(pool)
  return require("pgcoord.migrate").run(pool)
end

-- Double quotes an identifier taken from options.
function pgcoord.quote_ident(name)
  if type(name) ~= "string" or name == "" or name:find("\0", 1, true) then
    error(("pgcoord: %q is not a valid SQL identifier"):format(tostring(name)), 2)
  end
  return '"' .. name:gsub('"', '""') .. '"'
end

-- ---- primitives, loaded on first use ------------------------------------------

-- key = { module, field }; no field: the module itself.
local LAZY = {
  subscriber = { "pgcoord.subscriber", "new" },
  send_listener_ping = { "pgcoord.subscriber", "send_ping" },
  fanout = { "pgcoord.fanout", "new" },
  joblock = { "pgcoord.joblock", "new" },
  run_in_job_lock = { "pgcoord.joblock", "run_in_job_lock" },
  queue = { "pgcoord.queue", "new" },
  jobs = { "pgcoord.jobs" },
  retry_at = { "pgcoord.jobs", "retry_at" },
  snooze = { "pgcoord.jobs", "snooze" },
  outbox = { "pgcoord.outbox", "new" },
  processed = { "pgcoord.outbox.processed", "new" },
  http = { "pgcoord.http" },
  metrics = { "pgcoord.metrics" },
}

return setmetatable(pgcoord, {
  __index = function(t, key)
    local where = LAZY[key]
    if not where then return nil end
    local value = require(where[1])
    if where[2] then value = value[where[2]] end
    rawset(t, key, value)
    return value
  end,
})

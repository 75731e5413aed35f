-- The process lifecycle: running, then stopping, with a deadline.
--
-- A graceful stop (the first SIGINT/SIGTERM, or pgcoord.stop()) runs the
-- stop handlers, each in a task of its own, and lets in-flight work
-- finish.  Past the deadline, every task still alive is cancelled (its
-- to-be-closed variables run); the stop handlers, and the tasks a service
-- marks as part of its stop (t.cleanup = true: a result writer, say), get
-- a moment more than the rest, so a worker whose runners were cancelled
-- still writes back its jobs, and then they are cancelled too.  Part of the runtime layer: it
-- requires nothing above task and log.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"

local lifecycle = {}

local DEFAULT_TIMEOUT = 30
-- After the deadline, what the stop handlers get to write back.
local HANDLER_GRACE = 2

local state = "running"       -- "stopping", then "expired" past the deadline
local handlers = {}           -- fn -> registration order
local registered = 0
local default_timeout = DEFAULT_TIMEOUT
local deadline_timer

local function check_timeout(where, timeout, level)
  if type(timeout) ~= "number" or timeout ~= timeout or timeout <= 0 then
    error(("%s: timeout must be a number of seconds > 0 (math.huge: no deadline), got %s")
      :format(where, tostring(timeout)), level + 1)
  end
  return timeout
end

-- fn runs (in a task of its own) when a graceful stop begins; returns a
-- function that unregisters it.  Registered while stopping, it runs now.
function lifecycle.on_stop(fn)
  if type(fn) ~= "function" then
    error(("pgcoord.on_stop: expected a function, got %s"):format(type(fn)), 2)
  end
  if state ~= "running" then
    task.spawn(fn).cleanup = true
    return function() end
  end
  registered = registered + 1
  handlers[fn] = registered
  return function() handlers[fn] = nil end
end

-- How many stop handlers are registered (and not removed).
function lifecycle.handlers()
  local n = 0
  for _ in pairs(handlers) do n = n + 1 end
  return n
end

function lifecycle.stopping()
  return state ~= "running"
end

-- True once a stop ran past its deadline (pgcoord-run then exits 1).
function lifecycle.expired()
  return state == "expired"
end

-- pgcoord-run --stop-timeout: the deadline of stops that name none.
function lifecycle.set_stop_timeout(seconds)
  default_timeout = check_timeout("--stop-timeout", seconds, 2)
end

function lifecycle.stop_timeout()
  return default_timeout
end

-- "worker.lua:312" for the function a task runs.
local function where(t)
  local info = t.fn and debug.getinfo(t.fn, "S")
  if not info then return "?" end
  return ("%s:%d"):format(info.short_src:match("[^/]*$"), info.linedefined)
end

local function cancel_all(only_workers)
  for _, t in ipairs(task.alive()) do
    if not (only_workers and t.cleanup) then t:cancel() end
  end
end

local function expire(timeout)
  deadline_timer = nil
  state = "expired"
  local alive, sites = task.alive(), {}
  for i, t in ipairs(alive) do sites[i] = where(t) end
  if #alive == 0 then return end
  log.error("stop deadline passed, cancelling what is still running",
    { timeout = timeout, tasks = #alive, running = table.concat(sites, " ") })
  cancel_all(true)
  if #task.alive() > 0 then
    core.timer(math.min(HANDLER_GRACE, timeout), function() cancel_all(false) end)
  end
end

-- Begins a graceful stop; opts.timeout (seconds, default 30 or
-- --stop-timeout) is the deadline.  A second call changes nothing.
function lifecycle.stop(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error(("pgcoord.stop: options must be a table, got %s"):format(type(opts)), 2)
  end
  for k in pairs(opts or {}) do
    if k ~= "timeout" then error(("unknown option %q for pgcoord.stop"):format(tostring(k)), 2) end
  end
  local timeout = opts and opts.timeout
  timeout = timeout == nil and default_timeout or check_timeout("pgcoord.stop", timeout, 2)
  if state ~= "running" then return end
  state = "stopping"
  local list = {}
  for fn, order in pairs(handlers) do list[#list + 1] = { fn, order } end
  handlers = {}
  table.sort(list, function(a, b) return a[2] < b[2] end)
  for _, h in ipairs(list) do task.spawn(h[1]).cleanup = true end
  if timeout < math.huge then
    deadline_timer = core.timer(timeout, function() expire(timeout) end)
  end
end

-- The loop is done: nothing to cancel any more.
function lifecycle.finished()
  if deadline_timer then
    deadline_timer:cancel()
    deadline_timer = nil
  end
end

return lifecycle

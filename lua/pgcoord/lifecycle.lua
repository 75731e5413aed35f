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

-- While a stop waits, this often (seconds) a line says for what.
lifecycle.WAIT_REPORT_EVERY = 5

local state = "running"       -- "stopping", then "expired" past the deadline
local handlers = {}           -- fn -> { order, name }
local registered = 0
local default_timeout = DEFAULT_TIMEOUT
local deadline_timer, report_timer

-- "host:pid", naming this process in job workers and lock holders: the
-- HOSTNAME variable (a container's name, say), else the kernel's.
function lifecycle.process_name()
  local host = os.getenv("HOSTNAME")
  if not host or host == "" then host = core.hostname() or "localhost" end
  return ("%s:%d"):format(host, core.getpid())
end

local function check_timeout(where, timeout, level)
  if type(timeout) ~= "number" or timeout ~= timeout or timeout <= 0 then
    error(("%s: timeout must be a number of seconds > 0 (math.huge: no deadline), got %s")
      :format(where, tostring(timeout)), level + 1)
  end
  return timeout
end

-- The task of a stop handler: part of the stop, and named (the service
-- it stops) in the lines of a stop that waits.
local function spawn_handler(fn, name)
  local t = task.spawn(fn)
  t.cleanup, t.service = true, name
end

-- fn runs (in a task of its own) when a graceful stop begins; returns a
-- function that unregisters it.  Registered while stopping, it runs now.
-- name: what fn stops ("job worker default"), for the logs of a stop.
function lifecycle.on_stop(fn, name)
  if type(fn) ~= "function" then
    error(("pgcoord.on_stop: expected a function, got %s"):format(type(fn)), 2)
  end
  if name ~= nil and type(name) ~= "string" then
    error(("pgcoord.on_stop: name must be a string, got %s"):format(type(name)), 2)
  end
  if state ~= "running" then
    spawn_handler(fn, name)
    return function() end
  end
  registered = registered + 1
  handlers[fn] = { registered, name }
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

-- What a stop still waits for: the services whose stop handlers run,
-- and where the other tasks were spawned ("worker.lua:480 (3)").
local function waiting_for(alive)
  local services, counts, sites = {}, {}, {}
  for _, t in ipairs(alive) do
    if t.service then
      services[#services + 1] = t.service
    else
      local site = where(t)
      if not counts[site] then sites[#sites + 1] = site end
      counts[site] = (counts[site] or 0) + 1
    end
  end
  for i, site in ipairs(sites) do
    if counts[site] > 1 then sites[i] = ("%s (%d)"):format(site, counts[site]) end
  end
  return table.concat(services, ", "), table.concat(sites, " ")
end

-- Every WAIT_REPORT_EVERY seconds of a stop, while tasks remain: one line.
local function report_waiting(started, timeout)
  report_timer = core.timer(lifecycle.WAIT_REPORT_EVERY, function()
    report_timer = nil
    local alive = task.alive()
    if #alive == 0 then return end
    local services, sites = waiting_for(alive)
    local elapsed = core.now() - started
    log.info("stop waiting", { waiting_for = services ~= "" and services or nil,
      tasks = #alive, running = sites ~= "" and sites or nil,
      elapsed = ("%.1f"):format(elapsed),
      deadline_in = timeout < math.huge and ("%.1f"):format(math.max(0, timeout - elapsed))
        or nil })
    report_waiting(started, timeout)
  end)
end

local function cancel_all(only_workers)
  for _, t in ipairs(task.alive()) do
    if not (only_workers and t.cleanup) then t:cancel() end
  end
end

local function expire(timeout)
  deadline_timer = nil
  state = "expired"
  local alive = task.alive()
  if #alive == 0 then return end
  local services, sites = waiting_for(alive)
  log.error("stop deadline passed, cancelling what is still running",
    { timeout = timeout, tasks = #alive, waiting_for = services ~= "" and services or nil,
      running = sites ~= "" and sites or nil })
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
  for fn, h in pairs(handlers) do list[#list + 1] = { fn, h[1], h[2] } end
  handlers = {}
  table.sort(list, function(a, b) return a[2] < b[2] end)
  for _, h in ipairs(list) do spawn_handler(h[1], h[3]) end
  if timeout < math.huge then
    deadline_timer = core.timer(timeout, function() expire(timeout) end)
  end
  report_waiting(core.now(), timeout)
end

-- The loop is done: nothing to cancel any more.
function lifecycle.finished()
  if deadline_timer then
    deadline_timer:cancel()
    deadline_timer = nil
  end
  if report_timer then
    report_timer:cancel()
    report_timer = nil
  end
end

return lifecycle

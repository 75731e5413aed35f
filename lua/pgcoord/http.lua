-- The operations endpoint: /metrics (Prometheus), /healthz and the
-- dashboard (dashboard/) under /, served on the event loop.  /metrics and
-- /healthz are answered from state that background tasks keep fresh (a
-- health probe every second, on a connection of its own, depths every
-- depth_interval), so a scrape never waits on the database (but /healthz
-- asked before the first probe came back waits for it, a second at most);
-- a dashboard page waits in a task of its own.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local metrics = require "pgcoord.metrics"
local status = require "pgcoord.status"
local options = require "pgcoord.options"
local lifecycle = require "pgcoord.lifecycle"
local dashboard = require "pgcoord.dashboard"
local db_module = require "pgcoord.db"

local http = {}

-- ---- what the endpoint reports ------------------------------------------------

local build_info = metrics.gauge("pgcoord_build_info",
  "pgcoord's version, in the label (the value is always 1).", { "version" })
build_info:set(1, core.version)
local pool_connections = metrics.gauge("pgcoord_pool_connections",
  "Connections of the pools of each name (the name option of pgcoord.connect, else the"
  .. " application_name) by state (in_use, idle, waiting: tasks waiting for one).",
  { "pool", "state" })
local received = metrics.counter("pgcoord_notifications_received_total",
  "Notifications received per channel.", { "channel" })
local dropped = metrics.counter("pgcoord_notifications_dropped_total",
  "Notifications dropped for full listener buffers, per channel.", { "channel" })
local poll_saved = metrics.counter("pgcoord_poll_saved_items_total",
  "Items found by fallback polls that no notification announced, per channel.", { "channel" })
local reconnects = metrics.counter("pgcoord_subscriber_reconnects_total",
  "LISTEN connections re-established, per subscriber name (its name option, else its pool's).",
  { "subscriber" })
local lock_held = metrics.gauge("pgcoord_job_lock_held",
  "1 while this process holds the job lock, else 0.", { "lock" })
-- (every state has its series, 0 or 1: a change of state changes values,
-- not which series exist)
local LOCK_STATES = { "waiting", "held", "lost", "released" }
local lock_state = metrics.gauge("pgcoord_job_lock_state",
  "Job locks of this process by name in each state (waiting, held, lost, released): 1 for the"
  .. " state a lock is in, 0 for the others.", { "lock", "state" })
local group_jobs = metrics.gauge("pgcoord_job_group_jobs",
  "Jobs per group and state (running: handlers in progress; claimed: taken by a worker, not"
  .. " started; refreshed on an interval).", { "group", "state" })
local oldest_ready = metrics.gauge("pgcoord_job_group_oldest_ready_seconds",
  "Age of the oldest ready job per group (refreshed on an interval).", { "group" })
local queue_messages = metrics.gauge("pgcoord_queue_messages",
  "Deliveries per queue subscription and state (refreshed on an interval).",
  { "queue", "subscription", "state" })
local outbox_messages = metrics.gauge("pgcoord_outbox_messages",
  "Outbox messages per table and status (refreshed on an interval).", { "table", "status" })
local up = metrics.gauge("pgcoord_database_up",
  "1 when the database answered the last health probe within a second.")
local http_open = metrics.gauge("pgcoord_http_connections",
  "Connections open to this HTTP endpoint.")
local http_refused = metrics.counter("pgcoord_http_connections_refused_total",
  "Connections answered 503 and closed because max_connections were open.")
local http_timed_out = metrics.counter("pgcoord_http_connections_timed_out_total",
  "Connections closed for not completing a request within idle_timeout.")

-- The counters the modules keep, read at scrape time (they only grow, so
-- they are exposed as counters, set rather than incremented here).
-- Objects that share a name add up in one series: a label is a name a
-- person gave, not an order of creation that changes from run to run.
metrics.collect(function()
  pool_connections:reset()
  for pool in metrics.each("pool") do
    local s = pool:stats()
    pool_connections:add(s.in_use, pool.name, "in_use")
    pool_connections:add(s.idle, pool.name, "idle")
    pool_connections:add(s.waiting, pool.name, "waiting")
  end
  for fan in metrics.each("fanout") do
    local s = fan:stats()
    received:set(s.notifications, s.channel)
    dropped:set(s.drops + s.overflows, s.channel)
    poll_saved:set(s.poll_saved, s.channel)
  end
  reconnects:reset()
  for sub in metrics.each("subscriber") do
    reconnects:add(sub:stats().reconnects, sub.name)
  end
  lock_held:reset()
  lock_state:reset()
  for lock in metrics.each("joblock") do
    local state = lock:state()
    if state == "" then state = "waiting" end
    lock_held:add(state == "held" and 1 or 0, lock.name)
    for _, st in ipairs(LOCK_STATES) do lock_state:add(st == state and 1 or 0, lock.name, st) end
  end
  local open, refused, timed_out = 0, 0, 0
  for server in metrics.each("http") do
    local s = server.server:stats()
    open, refused, timed_out = open + s.open, refused + s.refused, timed_out + s.timed_out
  end
  http_open:set(open)
  http_refused:set(refused)
  http_timed_out:set(timed_out)
end)

-- ---- the process: the standard process_* metrics, from /proc/self ---------------

local process_cpu = metrics.counter("process_cpu_seconds_total",
  "Total user and system CPU time spent in seconds.")
local process_rss = metrics.gauge("process_resident_memory_bytes",
  "Resident memory size in bytes.")
local process_vm = metrics.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.")
local process_fds = metrics.gauge("process_open_fds", "Number of open file descriptors.")
local process_max_fds = metrics.gauge("process_max_fds",
  "Maximum number of open file descriptors.")
local process_start = metrics.gauge("process_start_time_seconds",
  "Start time of the process since unix epoch in seconds.")

local function read_file(path)
  local f <close> = io.open(path, "rb")
  return f and f:read("a")
end

-- The fields of /proc/self/stat after the command name (which is in
-- parentheses and may hold spaces): [1] is field 3 of proc(5), the state.
local function proc_stat()
  local text = read_file("/proc/self/stat")
  local rest = text and text:match("%)%s+(.*)$")
  if not rest then return nil end
  local fields = {}
  for word in rest:gmatch("%S+") do fields[#fields + 1] = tonumber(word) or word end
  return fields
end

-- The units of /proc's ticks and pages; nil off Linux (no process_* series).
local units = read_file("/proc/self/stat") and core.sysconf() or nil

-- The boot time plus the process's start in ticks (proc(5) field 22).
local function start_time(fields)
  local boot = tonumber((read_file("/proc/stat") or ""):match("\nbtime%s+(%d+)"))
  return boot and fields[20] and boot + fields[20] / units.clock_ticks
end
local started_at -- (read once: fixed for the life of the process)

metrics.collect(function()
  local fields = units and proc_stat()
  if not fields then return end
  -- proc(5) fields 14, 15: utime, stime; 23: vsize; 24: rss (pages)
  process_cpu:set((fields[12] + fields[13]) / units.clock_ticks)
  process_vm:set(fields[21])
  process_rss:set(fields[22] * units.page_size)
  started_at = started_at or start_time(fields)
  if started_at then process_start:set(started_at) end
  -- (listing the folder opens one descriptor more, its own)
  local fds = core.listdir("/proc/self/fd")
  if fds then process_fds:set(#fds - 1) end
  local max = (read_file("/proc/self/limits") or ""):match("Max open files%s+(%d+)")
  if max then process_max_fds:set(tonumber(max)) end
end)

local function refresh_depths(db, outbox_tables)
  local s = status.collect(db, outbox_tables)
  group_jobs:reset()
  oldest_ready:reset()
  for _, g in ipairs(s.jobs or {}) do
    for _, state in ipairs({ "ready", "scheduled", "running", "claimed", "failed" }) do
      group_jobs:set(g[state], g.group, state)
    end
    oldest_ready:set(g.oldest_ready_age or 0, g.group)
  end
  queue_messages:reset()
  for _, q in ipairs(s.queues or {}) do
    queue_messages:set(q.pending, q.queue, q.subscription, "pending")
    queue_messages:set(q.dead, q.queue, q.subscription, "dead")
  end
  outbox_messages:reset()
  for _, o in ipairs(s.outbox or {}) do
    for _, st in ipairs({ "pending", "processing", "failed" }) do
      outbox_messages:set(o[st], o.table, st)
    end
  end
end

-- ---- the server ------------------------------------------------------------------

local Server = {}
Server.__index = Server

local WHERE = "pgcoord.http.serve"

-- "host:port" -> host, port; an empty host is loopback, never every
-- interface (":9400" must not expose the endpoint to the network).
local function parse_address(addr)
  if type(addr) ~= "string" then
    error(("%s: address must be \"host:port\", got %s"):format(WHERE, tostring(addr)), 3)
  end
  local host, port = addr:match("^%[?([^%]]*)%]?:(%d+)$")
  port = tonumber(port)
  if not host or not port or port > 65535 then
    error(("%s: address must be \"host:port\", got %q"):format(WHERE, addr), 3)
  end
  return host == "" and "127.0.0.1" or host, port
end

local check_options = options.spec(WHERE, {
  db = { "pool" },
  -- floors: a probe or refresh loop must not spin
  probe_interval = { "number", default = 1, min = 0.1 },
  depth_interval = { "number", default = 15, min = 1 },
  outbox_tables = { "table" },
  idle_timeout = { "number", default = 30, above = 0 },
  max_connections = { "integer", default = 256, min = 1, max = 1000000 },
  -- the dashboard's: actions need it, and pages too off loopback
  token = { "string" },
  dashboard = { "boolean", default = true },
})

function Server:_health()
  local now = core.now()
  local lag = self.lag or 0
  if lag > 1 then
    return false, ("the event loop is %.2fs behind"):format(lag)
  end
  if not self.db then return true, "ok (no database to check)" end
  if not self.last_ok then
    return false, self.last_error or "the database has not answered yet"
  end
  if now - self.last_ok > 1 + self.probe_interval * 1.5 then
    return false, ("the database did not answer within 1s: %s")
      :format(self.last_error or "no answer")
  end
  return true, "ok"
end

local TEXT = "text/plain; charset=utf-8"

-- How long the probe waits for the database's answer, and a /healthz
-- asked before the first probe came back waits for that probe.
local PROBE_TIMEOUT = 1

function Server:_reply_health()
  local ok, why = self:_health()
  return ok and 200 or 503, TEXT, why .. "\n", dashboard.HEADERS
end

function Server:_handle(method, path, req)
  if path ~= "/metrics" and path ~= "/healthz" then
    if self.dashboard then return self.dashboard:handle(method, path, req) end
    return 404, TEXT, "not found: try /metrics or /healthz\n", dashboard.HEADERS
  end
  if method ~= "GET" and method ~= "HEAD" then
    return 405, TEXT, "method not allowed: use GET\n", dashboard.HEADERS
  end
  if path == "/healthz" then
    -- Right after start the database has not been asked yet: a load
    -- balancer must not see a 503 for that, so the answer waits for the
    -- first probe's (which ends within PROBE_TIMEOUT).
    if self.db and not self.probed then
      req:defer()
      task.spawn_daemon(function()
        self.first_probe:wait(PROBE_TIMEOUT + 0.1)
        req:reply(self:_reply_health())
      end)
      return
    end
    return self:_reply_health()
  end
  return 200, "text/plain; version=0.0.4; charset=utf-8", metrics.render(), dashboard.HEADERS
end

-- The probe's own pool of one connection, opened at the first probe: a
-- probe waiting behind busy dashboard pages on db's connections would
-- call a busy pool a dead database.
local function probe(self)
  if not self.probe_db then
    local db = self.db
    self.probe_db = db_module.connect(db.conninfo, { size = 1, params = db.params,
      prepare = db.prepare, name = db.name .. "-health", connect_timeout = PROBE_TIMEOUT })
  end
  return self.probe_db:one("SELECT 1 AS ok")
end

-- Probes the database every probe_interval; measures the loop's lag.
function Server:_probe_loop()
  local before = core.now()
  while self.state == "running" do
    if self.db then
      local ok, err = pcall(task.with_timeout, PROBE_TIMEOUT, probe, self)
      if ok then
        self.last_ok, self.last_error = core.now(), nil
        up:set(1)
      else
        self.last_error = tostring(err)
        up:set(0)
      end
      self.probed = true
      self.first_probe:signal()
    end
    local wait = math.max(0, before + self.probe_interval - core.now())
    self.wake:wait(wait)
    -- how late the loop woke us: a loop busy elsewhere is not healthy
    self.lag = math.max(0, core.now() - before - self.probe_interval)
    before = core.now()
  end
end

function Server:_depth_loop()
  while self.state == "running" do
    local ok, err = pcall(refresh_depths, self.db, self.outbox_tables)
    if not ok then log.warn("metrics refresh failed", { error = tostring(err) }) end
    self.wake:wait(self.depth_interval)
  end
end

-- Serves /metrics and /healthz on "host:port" (port 0 picks a free one; an
-- empty host is 127.0.0.1).  opts.db: the pool to read depths from (the
-- health probe opens one connection more, with its conninfo);
-- idle_timeout (30 s): a connection that does not complete a request
-- within it of opening or of its previous request is closed;
-- max_connections (256): one more is answered 503 and closed.  With a db
-- the dashboard is served under / (dashboard = false: not); token: what
-- its actions need, and its pages too on an address that is not loopback
-- (where, without a token, it is not served).
function http.serve(addr, opts)
  local host, port = parse_address(addr)
  opts = check_options(opts)
  local self = setmetatable({
    db = opts.db,
    probe_interval = opts.probe_interval,
    depth_interval = opts.depth_interval,
    outbox_tables = opts.outbox_tables,
    wake = task.cond(),
    first_probe = task.cond(),
    state = "running",
  }, Server)
  if opts.db and opts.dashboard then
    self.dashboard = dashboard.new({ db = opts.db, token = opts.token,
      exposed = not dashboard.loopback(host), outbox_tables = opts.outbox_tables,
      health = function() return self:_health() end })
  end
  local idle_timeout, max_connections = opts.idle_timeout, opts.max_connections
  self.server = core.http_listen(host, port, function(method, path, req)
    return self:_handle(method, path, req)
  end, idle_timeout, max_connections)
  self.port = self.server:port()
  self.address = self.server:address()
  metrics.track("http", self)
  -- background work: it must not keep a finished process alive
  self.tasks = { task.spawn_daemon(self._probe_loop, self) }
  if self.db then self.tasks[2] = task.spawn_daemon(self._depth_loop, self) end
  self.unregister = lifecycle.on_stop(function() self:close() end,
    "http endpoint " .. tostring(self.address))
  log.info("http endpoint listening", { address = self.address,
    idle_timeout = idle_timeout, max_connections = max_connections,
    dashboard = self.dashboard and (self.dashboard.exposed and not opts.token and "off"
      or (opts.token and "token" or "open")) or "off" })
  return self
end

-- Stops serving: the listener closes, the probe and refresh loops end
-- (joined up to timeout seconds), the stop handler goes.  close is its
-- alias.
function Server:stop(timeout)
  if self.state == "stopped" then return true end
  self.state = "stopped"
  self.unregister()
  self.server:close()
  self.wake:signal()
  local deadline = timeout and core.now() + timeout
  local all = true
  for _, t in ipairs(self.tasks) do
    if not t:wait(deadline and math.max(0, deadline - core.now())) then
      t:cancel()
      all = false
    end
  end
  if self.probe_db then self.probe_db:close() end
  return all
end
Server.close = Server.stop

return http

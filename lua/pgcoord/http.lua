-- The operations endpoint: /metrics (Prometheus), /healthz and the
-- dashboard (dashboard/) under /, served on the event loop.  /metrics and
-- /healthz are answered from state that background tasks keep fresh (a
-- health probe every second, depths every depth_interval), so a scrape
-- never waits on the database; a dashboard page waits in a task of its
-- own.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local metrics = require "pgcoord.metrics"
local status = require "pgcoord.status"
local options = require "pgcoord.options"
local lifecycle = require "pgcoord.lifecycle"
local dashboard = require "pgcoord.dashboard"

local http = {}

-- ---- what the endpoint reports ------------------------------------------------

local pool_connections = metrics.gauge("pgcoord_pool_connections",
  "Connections of each pool by state (in_use, idle, waiting: tasks waiting for one).",
  { "pool", "state" })
local received = metrics.counter("pgcoord_notifications_received_total",
  "Notifications received per channel.", { "channel" })
local dropped = metrics.counter("pgcoord_notifications_dropped_total",
  "Notifications dropped for full listener buffers, per channel.", { "channel" })
local poll_saved = metrics.counter("pgcoord_poll_saved_items_total",
  "Items found by fallback polls that no notification announced, per channel.", { "channel" })
local reconnects = metrics.counter("pgcoord_subscriber_reconnects_total",
  "LISTEN connections re-established, per subscriber.", { "subscriber" })
local lock_held = metrics.gauge("pgcoord_job_lock_held",
  "1 while this process holds the job lock, else 0; state in the label.", { "lock", "state" })
local group_jobs = metrics.gauge("pgcoord_job_group_jobs",
  "Jobs per group and state (refreshed on an interval).", { "group", "state" })
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
metrics.collect(function()
  pool_connections:reset()
  local n = 0
  for pool in metrics.each("pool") do
    n = n + 1
    local s = pool:stats()
    local name = pool.params.application_name or ("pool" .. n)
    pool_connections:set(s.in_use, name, "in_use")
    pool_connections:set(s.idle, name, "idle")
    pool_connections:set(s.waiting, name, "waiting")
  end
  for fan in metrics.each("fanout") do
    local s = fan:stats()
    received:set(s.notifications, s.channel)
    dropped:set(s.drops + s.overflows, s.channel)
    poll_saved:set(s.poll_saved, s.channel)
  end
  reconnects:reset()
  n = 0
  for sub in metrics.each("subscriber") do
    n = n + 1
    reconnects:set(sub:stats().reconnects, "subscriber" .. n)
  end
  lock_held:reset()
  for lock in metrics.each("joblock") do
    local state = lock:state()
    lock_held:set(state == "held" and 1 or 0, lock.name, state == "" and "waiting" or state)
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

local function refresh_depths(db, outbox_tables)
  local s = status.collect(db, outbox_tables)
  group_jobs:reset()
  oldest_ready:reset()
  for _, g in ipairs(s.jobs or {}) do
    for _, state in ipairs({ "ready", "scheduled", "running", "failed" }) do
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

function Server:_handle(method, path, req)
  if path ~= "/metrics" and path ~= "/healthz" then
    if self.dashboard then return self.dashboard:handle(method, path, req) end
    return 404, TEXT, "not found: try /metrics or /healthz\n", dashboard.HEADERS
  end
  if method ~= "GET" and method ~= "HEAD" then
    return 405, TEXT, "method not allowed: use GET\n", dashboard.HEADERS
  end
  if path == "/healthz" then
    local ok, why = self:_health()
    return ok and 200 or 503, TEXT, why .. "\n", dashboard.HEADERS
  end
  return 200, "text/plain; version=0.0.4; charset=utf-8", metrics.render(), dashboard.HEADERS
end

-- Probes the database every probe_interval; measures the loop's lag.
function Server:_probe_loop()
  local before = core.now()
  while self.state == "running" do
    if self.db then
      local ok, err = pcall(task.with_timeout, 1, self.db.one, self.db, "SELECT 1 AS ok")
      if ok then
        self.last_ok, self.last_error = core.now(), nil
        up:set(1)
      else
        self.last_error = tostring(err)
        up:set(0)
      end
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
-- empty host is 127.0.0.1).  opts.db: the pool to probe and to read depths
-- from; idle_timeout (30 s): a connection that does not complete a request
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
  self.unregister = lifecycle.on_stop(function() self:close() end)
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
  return all
end
Server.close = Server.stop

return http

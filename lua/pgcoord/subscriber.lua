-- The subscriber: one LISTEN connection serving many channels.
--
-- Connections die silently (a TCP drop, a balancer's idle timeout, a
-- failover), and a dead LISTEN connection looks exactly like a quiet one.
-- So the subscriber pings itself on channel `listener_ping` every
-- ping_interval; when nothing at all arrives within ping_grace, or the
-- socket fails, it drops the connection and reconnects with capped
-- exponential backoff and jitter, LISTENs again on every channel, and
-- calls on_reconnect so that a consumer can reload what it missed.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local db = require "pgcoord.db"
local log = require "pgcoord.log"
local store = require "pgcoord.store"

local subscriber = {}

local Sub = {}
Sub.__index = Sub

local PING_CHANNEL = "listener_ping"

local WHERE = "pgcoord.subscriber"

local function quote(name)
  return '"' .. name:gsub('"', '""') .. '"'
end

-- A number > 0.  (A tail call, so level 2 is subscriber.new's caller.)
local function positive(opts, name, default)
  return store.number(WHERE, opts, name, default, 0, false, 2)
end

local KNOWN = { ping_interval = true, ping_grace = true, ping_db = true, on_reconnect = true,
                reconnect_min = true, reconnect_max = true }

function subscriber.new(pool, opts)
  store.check_pool(WHERE, pool)
  opts = store.check_options(WHERE, opts, KNOWN)
  local ping_interval = positive(opts, "ping_interval", 300)
  local ping_grace = positive(opts, "ping_grace", opts.ping_interval and ping_interval * 1.4 or 420)
  if ping_grace <= ping_interval then
    error(("pgcoord.subscriber: ping_grace (%s) must exceed ping_interval (%s)")
      :format(ping_grace, ping_interval), 2)
  end
  local ping_db = opts.ping_db
  if ping_db == nil then ping_db = pool end
  if ping_db ~= false and (type(ping_db) ~= "table" or type(ping_db.query) ~= "function") then
    error("pgcoord.subscriber: ping_db must be a pool or false", 2)
  end
  if opts.on_reconnect ~= nil and type(opts.on_reconnect) ~= "function" then
    error("pgcoord.subscriber: on_reconnect must be a function", 2)
  end
  local self = setmetatable({
    pool = pool,
    ping_interval = ping_interval,
    ping_grace = ping_grace,
    ping_db = ping_db,
    reconnect_hooks = {},      -- key -> fn(sub), after every connection
    reconnect_min = positive(opts, "reconnect_min", 0.1),
    reconnect_max = positive(opts, "reconnect_max", 30),
    fans = {},                 -- channel -> fan-out
    conn = nil,
    generation = 0,            -- connections made so far
    wake = task.cond(),        -- bounce, loss, stop
    listening = task.cond(),   -- signalled on every (re)connect
    reason = nil,              -- why the current connection must go
    running = false,
    stopped = false,
    counters = { notifications = 0, reconnects = 0, pings = 0, ping_failures = 0 },
  }, Sub)
  if opts.on_reconnect then self:hook_reconnect(opts.on_reconnect) end
  require("pgcoord.metrics").track("subscriber", self)
  return self
end

-- Calls fn(sub) after every connection, the first included (the option
-- on_reconnect is one of these): whatever uses the subscriber reloads what
-- it may have missed.  Returns a function that removes the hook.
function Sub:hook_reconnect(fn)
  if type(fn) ~= "function" then
    error(("sub:hook_reconnect: expected a function, got %s"):format(type(fn)), 2)
  end
  local key, hooks = {}, self.reconnect_hooks
  hooks[key] = fn
  return function() hooks[key] = nil end
end

-- ---- channels ------------------------------------------------------------

-- The fan-out of channel, added first if the channel has none.
function Sub:channel(channel)
  local fanout = require("pgcoord.fanout")
  fanout.check_channel("sub:channel", channel)
  return self.fans[channel] or self:add(fanout.new(channel))
end

function Sub:add(fan)
  if type(fan) ~= "table" or type(fan.channel) ~= "string" or type(fan._wire) ~= "function" then
    error("sub:add: expected a fan-out from pgcoord.fanout", 2)
  end
  local channel = require("pgcoord.fanout").check_channel("sub:add", fan.channel)
  if channel == PING_CHANNEL then
    error(("sub:add: channel %q is the subscriber's own"):format(PING_CHANNEL), 2)
  end
  if self.fans[channel] and self.fans[channel] ~= fan then
    error(("sub:add: channel %q already has a fan-out"):format(channel), 2)
  end
  self.fans[channel] = fan
  if self.conn and self.conn:status() == "ready" then
    local ok, err = pcall(db.run, self.conn, "LISTEN " .. quote(channel))
    if not ok then self:_drop("LISTEN failed: " .. tostring(err)) end
  end
  return fan
end

function Sub:_dispatch(channel, payload)
  self.last_activity = core.now()
  self.counters.notifications = self.counters.notifications + 1
  if channel == PING_CHANNEL then return end
  local fan = self.fans[channel]
  if fan then fan:_wire(payload) end
end

-- Ends the current connection's session; the loop reconnects.
function Sub:_drop(reason)
  if not self.reason then self.reason = reason end
  self.wake:signal(reason)
end

-- ---- the connection loop -------------------------------------------------

local function listen_all(self, conn)
  local parts = { "LISTEN " .. quote(PING_CHANNEL) }
  for channel in pairs(self.fans) do parts[#parts + 1] = "LISTEN " .. quote(channel) end
  db.run_script(conn, table.concat(parts, "; "))
end

-- One connection's life: listen, tell the consumer, watch for silence.
function Sub:_session(conn)
  self.generation = self.generation + 1
  self.reason = nil
  conn:on_notify(function(channel, payload) self:_dispatch(channel, payload) end)
  conn:on_close(function(why) self:_drop("connection lost: " .. tostring(why)) end)
  listen_all(self, conn)
  self.conn = conn
  self.last_activity = core.now()
  if self.generation > 1 then self.counters.reconnects = self.counters.reconnects + 1 end
  log.info("subscriber listening",
    { channels = self:_channel_count(), generation = self.generation })
  for _, fn in pairs(self.reconnect_hooks) do
    local ok, err = xpcall(fn, debug.traceback, self)
    if not ok then log.error("on_reconnect failed", { error = err }) end
  end
  self.listening:signal()
  local check = math.min(self.ping_interval, self.ping_grace - self.ping_interval) / 2
  while not self.reason and not self.stopped do
    self.wake:wait(check)
    if not self.reason and core.now() - self.last_activity > self.ping_grace then
      self.reason = ("no notification within ping_grace (%gs)"):format(self.ping_grace)
    end
  end
  return self.reason or "stopped"
end

function Sub:_channel_count()
  local n = 0
  for _ in pairs(self.fans) do n = n + 1 end
  return n
end

function Sub:_loop()
  local failures = 0
  while not self.stopped do
    local generation = self.generation
    local reason
    local ok, conn = pcall(db.open, self.pool)
    if ok then
      local sok, why = pcall(self._session, self, conn)
      reason = sok and why or ("session failed: " .. tostring(why))
      self.conn = nil
      conn:close()
    else
      reason = tostring(conn)
    end
    if self.stopped then break end
    if self.generation > generation then failures = 0 end
    failures = failures + 1
    local delay = math.min(self.reconnect_max, self.reconnect_min * 2 ^ (failures - 1))
    delay = delay * (0.5 + math.random() * 0.5)
    log.warn("subscriber reconnecting", { reason = reason, delay = ("%.3f"):format(delay) })
    self.wake:wait(delay)
  end
end

function Sub:_ping_loop()
  while not self.stopped do
    self.ping_wake:wait(self.ping_interval)
    if self.stopped then break end
    local ok, err = pcall(subscriber.send_ping, self.ping_db)
    if ok then
      self.counters.pings = self.counters.pings + 1
    else
      self.counters.ping_failures = self.counters.ping_failures + 1
      log.warn("listener ping failed", { error = tostring(err) })
    end
  end
end

function Sub:start()
  if self.running then return self end
  self.running, self.stopped = true, false
  self.task = task.spawn(self._loop, self)
  if self.ping_db then
    self.ping_wake = task.cond()
    self.ping_task = task.spawn(self._ping_loop, self)
  end
  if not self.stop_hooked then -- once, however often it is restarted
    self.stop_hooked = true
    require("pgcoord").on_stop(function() self:stop() end)
  end
  return self
end

-- Forces a reconnect.  Only a live connection is torn down: a bounce
-- asked for while reconnecting is already being served.
function Sub:bounce()
  if self.conn and not self.reason then
    self:_drop("bounce requested")
    return true
  end
  return false
end

-- Unlistens, closes, and waits for the subscriber's tasks to end.
function Sub:stop()
  if not self.running then return end
  self.running, self.stopped = false, true
  local conn = self.conn
  if conn and conn:status() == "ready" then pcall(db.run, conn, "UNLISTEN *") end
  self.wake:signal("stopped")
  if self.ping_wake then self.ping_wake:signal() end
  local current = task.current()
  for _, t in ipairs({ self.task, self.ping_task }) do
    if t and t ~= current then pcall(t.join, t) end
  end
end

-- Waits until the subscriber listens (true), or timeout seconds (false).
function Sub:ready(timeout)
  local deadline = timeout and core.now() + timeout
  while not self:connected() do
    local left = deadline and deadline - core.now()
    if left and left <= 0 then return false end
    self.listening:wait(left)
  end
  return true
end

function Sub:connected()
  return self.conn ~= nil and self.reason == nil
end

function Sub:stats()
  local c = self.counters
  return { connected = self:connected(), generation = self.generation,
           notifications = c.notifications, reconnects = c.reconnects,
           pings = c.pings, ping_failures = c.ping_failures }
end

-- Pings every subscriber of the database (another process may do this).
function subscriber.send_ping(pool)
  pool:query("SELECT pg_notify($1, '')", PING_CHANNEL)
end

subscriber.PING_CHANNEL = PING_CHANNEL

return subscriber

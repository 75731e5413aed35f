-- The subscriber: one LISTEN connection serving many channels.
--
-- Connections die silently (a TCP drop, a balancer's idle timeout, a
-- failover), and a dead LISTEN connection looks exactly like a quiet one.
-- So the subscriber pings itself on channel `listener_ping` every
-- ping_interval; when nothing at all arrives within ping_grace, or the
-- socket fails, it drops the connection and reconnects with capped
-- exponential backoff and jitter, LISTENs again on every channel, and
-- calls on_reconnect so that a consumer can reload what it missed.
--
-- A service: state is "stopped", then "starting" (sub:start()) until the
-- first connection listens, "running", "stopping" while sub:stop() waits
-- for its tasks, and "stopped" again; it can be started once more.
-- Part of the notifications layer: requires the runtime, db and fanout.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local db = require "pgcoord.db"
local log = require "pgcoord.log"
local lifecycle = require "pgcoord.lifecycle"
local options = require "pgcoord.options"
local backoff = require "pgcoord.backoff"
local fanout = require "pgcoord.fanout"

local subscriber = {}

local Sub = {}
Sub.__index = Sub

local PING_CHANNEL = "listener_ping"

local WHERE = "pgcoord.subscriber"

local function quote(name)
  return '"' .. name:gsub('"', '""') .. '"'
end

local check_options = options.spec(WHERE, {
  ping_interval = { "number", above = 0, default = 300 },
  ping_grace = { "number", above = 0 },
  ping_db = { "pool" },        -- or false, taken out before the check
  on_reconnect = { "function" },
  reconnect_min = { "number", above = 0, default = 0.1 },
  reconnect_max = { "number", above = 0, default = 30 },
  name = { "string" },         -- in metrics; nil: the pool's name
})

-- ping_db = false (no pinging) is the one option that is not of its kind.
local function without_ping_db(opts)
  local copy = {}
  for k, v in pairs(opts) do copy[k] = v end
  copy.ping_db = nil
  return copy
end

local function check_pool(pool)
  if type(pool) ~= "table" or type(pool.query) ~= "function" or type(pool.tx) ~= "function"
    or not pool.size then
    options.raise("%s: expected a pool from pgcoord.connect, got %s", WHERE, type(pool))
  end
end

function subscriber.new(pool, opts)
  check_pool(pool)
  local ping_off = type(opts) == "table" and opts.ping_db == false
  local o = check_options(ping_off and without_ping_db(opts) or opts)
  local ping_grace = o.ping_grace or (opts and opts.ping_interval and o.ping_interval * 1.4) or 420
  if ping_grace <= o.ping_interval then
    options.raise("%s: ping_grace (%s) must exceed ping_interval (%s)",
      WHERE, options.show(ping_grace), options.show(o.ping_interval))
  end
  local ping_db = o.ping_db or pool
  if ping_off then ping_db = false end
  local self = setmetatable({
    pool = pool,
    name = o.name or pool.name,
    ping_interval = o.ping_interval,
    ping_grace = ping_grace,
    ping_db = ping_db,
    reconnect_hooks = {},      -- key -> fn(sub), after every connection
    backoff = backoff.new({ base = o.reconnect_min, cap = o.reconnect_max }),
    fans = {},                 -- channel -> fan-out
    conn = nil,
    generation = 0,            -- connections made so far
    state = "stopped",
    task = nil,                -- the connection loop
    ping_task = nil,
    unregister = nil,          -- removes the stop handler
    wake = task.signal(),      -- bounce, loss, stop
    ping_wake = task.signal(), -- stop
    listening = task.cond(),   -- signalled on every (re)connect, and on failure
    heard_ping = task.cond(),  -- signalled on every ping that comes back
    listened = task.cond(),    -- signalled when an added channel's LISTEN ends
    pings_heard = 0,
    failure = nil,             -- why it cannot work (LISTEN through a pooler)
    reason = nil,              -- why the current connection must go
    -- (notifications: those the connections closed so far heard; the
    -- current one counts its own)
    counters = { notifications = 0, reconnects = 0, pings = 0, ping_failures = 0 },
  }, Sub)
  if o.on_reconnect then self:hook_reconnect(o.on_reconnect) end
  require("pgcoord.metrics").track("subscriber", self)
  return self
end

-- True for a subscriber from pgcoord.subscriber.
function subscriber.is(v)
  return getmetatable(v) == Sub
end

-- Calls fn(sub) after every connection, the first included (the option
-- on_reconnect is one of these): whatever uses the subscriber reloads what
-- it may have missed.  Returns a function that removes the hook.
function Sub:hook_reconnect(fn)
  if type(fn) ~= "function" then
    options.raise("sub:hook_reconnect: expected a function, got %s", type(fn))
  end
  local key, hooks = {}, self.reconnect_hooks
  hooks[key] = fn
  return function() hooks[key] = nil end
end

-- ---- channels ------------------------------------------------------------

-- The fan-out of channel, added first if the channel has none.
function Sub:channel(channel)
  fanout.check_channel("sub:channel", channel)
  return self.fans[channel] or self:add(fanout.new(channel))
end

function Sub:add(fan)
  if not fanout.is(fan) then
    options.raise("sub:add: expected a fan-out from pgcoord.fanout, got %s", type(fan))
  end
  local channel = fanout.check_channel("sub:add", fan.channel)
  if channel == PING_CHANNEL then
    options.raise("sub:add: channel %q is the subscriber's own", PING_CHANNEL)
  end
  if self.fans[channel] and self.fans[channel] ~= fan then
    options.raise("sub:add: channel %q already has a fan-out", channel)
  end
  self.fans[channel] = fan
  -- One LISTEN at a time: the connection is busy while another add's is
  -- on its way, and skipping this one would leave the channel unheard.
  -- (the wait is bounded: an UNLISTEN at a stop signals nothing)
  while self.conn and self.conn:status() == "busy" do self.listened:wait(0.05) end
  if self.conn and self.conn:status() == "ready" then
    local ok, err = pcall(db.run, self.conn, "LISTEN " .. quote(channel))
    self.listened:signal()
    if not ok then self:_drop("LISTEN failed: " .. tostring(err)) end
  end
  return fan
end

-- How a session's connection hands notifications on.  Those of a
-- channel with a fan-out go straight to fanout.wire(fan, payloads, n):
-- the connection looks the channel up in self.fans itself
-- (conn:route_notify) and hands a burst on one channel over in one call.
-- Only the pings come here (every other channel is listened to after its
-- fan-out is added, and none is removed).  The connection decodes the
-- payloads (conn:on_notify(fn, "json")) and counts what it hears
-- (conn:notifications()), which the session's check reads: no clock read
-- per notification.
function Sub:_hear(conn)
  conn:on_notify(function(channel)
    if channel == PING_CHANNEL then
      self.pings_heard = self.pings_heard + 1
      self.last_ping_heard = core.now()
      self.heard_ping:signal()
    end
  end, "json")
  conn:route_notify(self.fans, fanout.wire)
end

-- Ends the current connection's session; the loop reconnects.
function Sub:_drop(reason)
  if not self.reason then self.reason = reason end
  self.wake:notify()
end

-- ---- the connection loop -------------------------------------------------

local function listen_all(self, conn)
  local parts = { "LISTEN " .. quote(PING_CHANNEL) }
  for channel in pairs(self.fans) do parts[#parts + 1] = "LISTEN " .. quote(channel) end
  db.run_script(conn, table.concat(parts, "; "))
end

-- Whether the running task, the subscriber's task `own` (self.task or
-- self.ping_task) when it started, goes on: not once a stop began or the
-- subscriber failed, nor after a stop from inside it and a new start.
function Sub:_keeps(own)
  return own == task.current() and self.state ~= "stopping" and not self.failure
end

-- A pooler in transaction mode (PgBouncer) runs the LISTEN on a server
-- connection it then gives to other clients: nothing comes back, ever.
-- So behind a pooler a ping sent through another connection must come
-- back within PROBE_TIMEOUT, or the subscriber fails, saying why: no
-- retry could help.
local PROBE_TIMEOUT = 3

function Sub:_hears_itself()
  local before = self.pings_heard
  subscriber.send_ping(self.pool)
  local deadline = core.now() + PROBE_TIMEOUT
  while self.pings_heard == before do
    local left = deadline - core.now()
    if left <= 0 then return false end
    self.heard_ping:wait(left)
  end
  return true
end

-- One connection's life: listen, tell the consumer, watch for silence.
function Sub:_session(conn)
  self.generation = self.generation + 1
  self.reason = nil
  self.wake:clear()
  self:_hear(conn)
  conn:on_close(function(why) self:_drop("connection lost: " .. tostring(why)) end)
  listen_all(self, conn)
  if db.behind_pooler(conn) and not self:_hears_itself() then
    self.failure = ("%s: no notification came back within %gs through a connection pooler:"
      .. " LISTEN needs a session of its own, which a pooler in transaction mode"
      .. " (PgBouncer's pool_mode = transaction) does not keep; connect the subscriber"
      .. " to PostgreSQL directly (pings may still go through the pooler: ping_db)")
      :format(WHERE, PROBE_TIMEOUT)
    return self.failure
  end
  self.conn = conn
  self.last_activity = core.now()
  if self.generation > 1 then self.counters.reconnects = self.counters.reconnects + 1 end
  if self.state == "starting" then self.state = "running" end
  log.info("subscriber listening",
    { channels = self:_channel_count(), generation = self.generation })
  for _, fn in pairs(self.reconnect_hooks) do
    local ok, err = xpcall(fn, debug.traceback, self)
    if not ok then log.error("on_reconnect failed", { error = err }) end
  end
  self.listening:signal()
  -- A notification counts as heard at the first check after it (never
  -- earlier than it came), so silence is found at most two checks late:
  -- half a ping's interval, or half the margin the grace leaves over it,
  -- as when each notification read the clock and the checks came twice
  -- as far apart.
  local check = math.min(self.ping_interval, self.ping_grace - self.ping_interval) / 4
  local heard = conn:notifications()
  while not self.reason and self:_keeps(self.task) do
    self.wake:wait(check)
    local now, count = core.now(), conn:notifications()
    if count ~= heard then
      heard, self.last_activity = count, now
    elseif not self.reason and now - self.last_activity > self.ping_grace then
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
  while self:_keeps(self.task) do
    local generation = self.generation
    local reason
    local ok, conn = pcall(db.open, self.pool)
    if ok then
      local sok, why = pcall(self._session, self, conn)
      reason = sok and why or ("session failed: " .. tostring(why))
      self.conn = nil
      local c = self.counters -- (what this connection heard, now in the total)
      c.notifications = c.notifications + conn:notifications()
      conn:close()
    else
      reason = tostring(conn)
    end
    if self.failure then
      log.error("subscriber failed", { error = self.failure })
      self.state = "stopped"
      if self.unregister then
        self.unregister()
        self.unregister = nil
      end
      self.ping_wake:notify()
      self.listening:signal()
      break
    end
    if not self:_keeps(self.task) then break end
    if self.generation > generation then self.backoff:reset() end
    local delay = self.backoff:next()
    log.warn("subscriber reconnecting", { reason = reason, delay = ("%.3f"):format(delay) })
    -- only a stop cuts the wait short: the loss that ended the session
    -- may have left a wake-up
    self.wake:clear()
    self.wake:wait(delay)
  end
end

function Sub:_ping_loop()
  while self:_keeps(self.ping_task) do
    self.ping_wake:wait(self.ping_interval)
    if not self:_keeps(self.ping_task) then break end
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
  local state = self.state
  if state == "starting" or state == "running" then return self end
  if state == "stopping" then
    options.raise("sub:start: the subscriber is stopping; start it once sub:stop() has returned")
  end
  self.state = "starting"
  self.failure = nil
  self.task = task.spawn(self._loop, self)
  if self.ping_db then
    self.ping_wake:clear()
    self.ping_task = task.spawn(self._ping_loop, self)
  end
  self.unregister = lifecycle.on_stop(function() self:stop() end, "subscriber")
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

-- Waits for tasks to end, at most timeout seconds (nil: as long as they
-- take), then cancels those still alive; true when none had to be.
local function join(tasks, timeout)
  local deadline = timeout and core.now() + timeout
  local me, clean = task.current(), true
  for _, t in ipairs(tasks) do
    if t ~= me and not t:wait(deadline and math.max(0, deadline - core.now())) then
      t:cancel()
      clean = false
    end
  end
  return clean
end

-- Unlistens, closes, and waits for the subscriber's tasks to end (at most
-- timeout seconds, then cancels them: false); unregisters its stop handler.
function Sub:stop(timeout)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout or timeout < 0) then
    options.raise("sub:stop: timeout must be a number of seconds >= 0, got %s",
      options.show(timeout))
  end
  if self.state == "stopped" then return true end
  local tasks = { self.task, self.ping_task }
  if self.state ~= "stopping" then -- the first of several stops does the work
    self.state = "stopping"
    if self.unregister then
      self.unregister()
      self.unregister = nil
    end
    local conn = self.conn
    if conn and conn:status() == "ready" then pcall(db.run, conn, "UNLISTEN *") end
    self.wake:notify()
    self.ping_wake:notify()
  end
  local clean = join(tasks, timeout)
  if self.task == tasks[1] then -- not started again meanwhile
    self.state, self.task, self.ping_task = "stopped", nil, nil
  end
  return clean
end

-- Waits until the subscriber listens (true), or timeout seconds (false);
-- raises when it failed (LISTEN through a pooler in transaction mode).
function Sub:ready(timeout)
  local deadline = timeout and core.now() + timeout
  while not self:connected() do
    if self.failure then error(self.failure, 2) end
    local left = deadline and deadline - core.now()
    if left and left <= 0 then return false end
    self.listening:wait(left)
  end
  return true
end

function Sub:connected()
  return self.conn ~= nil and self.reason == nil
end

-- "stopped", "starting", "running" or "stopping".
function Sub:status()
  return self.state
end

-- (channels: the names listened to, sorted; last_ping_age: seconds since
-- the last ping came back, nil before the first)
function Sub:stats()
  local c = self.counters
  local channels = {}
  for name in pairs(self.fans) do channels[#channels + 1] = name end
  table.sort(channels)
  return { state = self.state, connected = self:connected(), generation = self.generation,
           error = self.failure,
           notifications = c.notifications + (self.conn and self.conn:notifications() or 0),
           reconnects = c.reconnects,
           pings = c.pings, ping_failures = c.ping_failures, channels = channels,
           last_ping_age = self.last_ping_heard and core.now() - self.last_ping_heard }
end

-- Pings every subscriber of the database (another process may do this).
function subscriber.send_ping(pool)
  pool:query("SELECT pg_notify($1, '')", PING_CHANNEL)
end

subscriber.PING_CHANNEL = PING_CHANNEL

return subscriber

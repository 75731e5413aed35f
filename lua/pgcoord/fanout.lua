-- Fan-out: one channel's notifications handed to many in-process
-- listeners, each with its own bounded buffer and filter, so one slow
-- listener never delays another.
--
-- Recovery: consumers that also poll report what their polls found with
-- fan:polled(found).  Polls that keep finding work while no notification
-- arrives mean the LISTEN connection is deaf: after `threshold` such polls
-- in a row the subscriber is bounced.
local task = require "pgcoord.task"
local json = require "pgcoord.json"
local log = require "pgcoord.log"

local fanout = {}

local Fan = {}
Fan.__index = Fan
local Listener = {}
Listener.__index = Listener

local OVERFLOW = { drop = true, error = true }

local function check_filter(where, filter)
  if filter ~= nil and type(filter) ~= "function" then
    error(("%s: filter must be a function, got %s"):format(where, type(filter)), 3)
  end
end

local function check_buffer(where, buffer)
  if buffer == nil then return 64 end
  if math.type(buffer) ~= "integer" or buffer < 1 then
    error(("%s: buffer must be a positive integer, got %s"):format(where, tostring(buffer)), 3)
  end
  return buffer
end

-- PostgreSQL's names are at most NAMEDATALEN - 1 bytes: LISTEN cuts a
-- longer channel name (then hears nothing its publishers send), pg_notify
-- refuses it.
local MAX_CHANNEL = 63

local function channel_problem(channel)
  if type(channel) ~= "string" or channel == "" then
    return ("channel must be a non-empty string, got %s"):format(tostring(channel))
  end
  local shown = #channel > MAX_CHANNEL and ("%q…"):format(channel:sub(1, MAX_CHANNEL))
    or ("%q"):format(channel)
  -- a NUL cuts the name short on its way to the server; a name the server
  -- refuses fails the subscriber's one LISTEN batch for every channel
  if channel:find("\0", 1, true) then return ("channel %s contains a NUL byte"):format(shown) end
  if #channel > MAX_CHANNEL then
    return ("channel %s is %d bytes long; PostgreSQL takes names of at most %d bytes")
      :format(shown, #channel, MAX_CHANNEL)
  end
  if not utf8.len(channel) then return ("channel %s is not valid UTF-8"):format(shown) end
  return nil
end

-- Raises, naming `where`, at the caller of the function that calls it,
-- unless channel can be LISTENed to and notified as it is.
function fanout.check_channel(where, channel)
  local problem = channel_problem(channel)
  if problem then error(("%s: %s"):format(where, problem), 3) end
  return channel
end

function fanout.new(channel, opts)
  fanout.check_channel("pgcoord.fanout", channel)
  opts = opts or {}
  local overflow = opts.overflow or "drop"
  if not OVERFLOW[overflow] then
    error(("pgcoord.fanout: overflow must be \"drop\" or \"error\", got %s")
      :format(tostring(overflow)), 2)
  end
  local fan = setmetatable({
    channel = channel,
    overflow = overflow,
    listeners = {},      -- set: listener -> true
    count = 0,
    counters = { notifications = 0, drops = 0, overflows = 0, poll_saved = 0, streak = 0 },
    recovery = nil,
  }, Fan)
  require("pgcoord.metrics").track("fanout", fan)
  return fan
end

-- ---- listeners -----------------------------------------------------------

function Fan:listen(opts)
  opts = opts or {}
  check_filter("fan:listen", opts.filter)
  local l = setmetatable({
    fan = self,
    filter = opts.filter,
    capacity = check_buffer("fan:listen", opts.buffer),
    head = 1, tail = 0,  -- queue[head..tail]
    queue = {},
    drops = 0,
    closed = false,
    ready = nil,         -- task.cond, made when someone first waits
  }, Listener)
  l.wake_reader = function()
    l.wake_pending = false
    if l.ready then l.ready:signal() end
  end
  self.listeners[l] = true
  self.count = self.count + 1
  return l
end

-- Queues msg; false when the buffer is full.
function Listener:_offer(msg)
  if self.tail - self.head + 1 >= self.capacity then
    self.drops = self.drops + 1
    return false
  end
  self.tail = self.tail + 1
  self.queue[self.tail] = msg
  local ready = self.ready
  if ready and next(ready.waiters) ~= nil and not self.wake_pending then
    if self.tail - self.head + 1 < self.capacity // 2 then
      -- wake the reader once for the whole burst this read brought
      self.wake_pending = true
      task.defer(self.wake_reader)
    else
      ready:signal()
    end
  end
  return true
end

function Listener:_pop()
  local head = self.head
  if head > self.tail then return nil end
  local msg = self.queue[head]
  self.queue[head] = nil
  self.head = head + 1
  if self.head > self.tail then self.head, self.tail = 1, 0 end
  return msg
end

-- Next message; nil, "timeout" after timeout seconds; nil, "closed".
function Listener:receive(timeout)
  while true do
    if self.head <= self.tail then return self:_pop() end
    if self.closed then return nil, "closed" end
    self.ready = self.ready or task.cond()
    local ok, err = self.ready:wait(timeout)
    if not ok and err == "timeout" then
      if self.head <= self.tail then return self:_pop() end
      return nil, "timeout"
    end
  end
end

-- for msg in l:messages() do ... end, until the listener is closed.
function Listener:messages()
  return function()
    return (self:receive())
  end
end

function Listener:pending()
  return self.tail - self.head + 1
end

function Listener:close()
  if self.closed then return end
  self.closed = true
  local fan = self.fan
  if fan.listeners[self] then
    fan.listeners[self] = nil
    fan.count = fan.count - 1
  end
  self.queue, self.head, self.tail = {}, 1, 0
  if self.ready then self.ready:signal() end
end

-- fan:on listeners end at a graceful stop, so that their tasks finish.
local callback_listeners = setmetatable({}, { __mode = "k" })
local stop_hooked = false

-- Runs fn(msg) for each message in a task of its own; returns the listener.
function Fan:on(fn, opts)
  if type(fn) ~= "function" then
    error(("fan:on: expected a function, got %s"):format(type(fn)), 2)
  end
  opts = opts or {}
  check_filter("fan:on", opts.filter)
  local l = self:listen({ filter = opts.filter, buffer = opts.buffer or 1024 })
  local channel = self.channel
  l.task = task.spawn(function()
    for msg in l:messages() do
      local ok, err = xpcall(fn, debug.traceback, msg)
      if not ok then log.error("listener failed", { channel = channel, error = err }) end
    end
  end)
  callback_listeners[l] = true
  if not stop_hooked then
    stop_hooked = true
    require("pgcoord").on_stop(function()
      for cl in pairs(callback_listeners) do cl:close() end
    end)
  end
  return l
end

-- ---- delivery ------------------------------------------------------------

local function decode(payload)
  if payload == nil or payload == "" then return payload end
  local value = json.try_decode(payload)
  if value == nil then return payload end -- not JSON: the raw string
  return value
end

-- Hands msg to every listener; returns how many buffers were full.
function Fan:_dispatch(msg)
  local full = 0
  for l in pairs(self.listeners) do
    local wanted = true
    if l.filter then
      local ok, keep = pcall(l.filter, msg)
      if not ok then
        log.error("listener filter failed", { channel = self.channel, error = tostring(keep) })
      end
      wanted = ok and keep
    end
    if wanted and not l:_offer(msg) then full = full + 1 end
  end
  self.counters.notifications = self.counters.notifications + 1
  if full > 0 then
    if self.overflow == "drop" then
      self.counters.drops = self.counters.drops + full
    else
      self.counters.overflows = self.counters.overflows + full
    end
  end
  return full
end

-- From the subscriber: a notification that came over the wire.
function Fan:_wire(payload)
  self.counters.streak = 0
  local full = self:_dispatch(decode(payload))
  if full > 0 and self.overflow == "error" then
    log.warn("listener buffer full, notification not delivered",
      { channel = self.channel, listeners = full })
  end
end

-- Local dispatch of value to this process's listeners.
function Fan:notify(value)
  local full = self:_dispatch(value)
  if full > 0 and self.overflow == "error" then
    error(("pgcoord.fanout: %d listener buffer(s) full on channel %q (overflow = \"error\")")
      :format(full, self.channel), 2)
  end
end

function Fan:publish(db_or_tx, value)
  return require("pgcoord").publish(db_or_tx, self.channel, value)
end

-- ---- recovery ------------------------------------------------------------

function Fan:enable_recovery(sub, opts)
  if type(sub) ~= "table" or type(sub.bounce) ~= "function" then
    error("fan:enable_recovery: expected a subscriber", 2)
  end
  opts = opts or {}
  local threshold = opts.threshold or 5
  if math.type(threshold) ~= "integer" then
    error(("fan:enable_recovery: threshold must be an integer, got %s")
      :format(tostring(threshold)), 2)
  end
  self.recovery = { sub = sub, threshold = threshold }
end

-- A poll found `found` items that no notification announced.
function Fan:polled(found)
  local r = self.recovery
  if not r or type(found) ~= "number" or found <= 0 then return end
  local c = self.counters
  c.poll_saved = c.poll_saved + found
  c.streak = c.streak + 1
  if r.threshold > 0 and c.streak >= r.threshold then
    log.warn("polls keep finding work without notifications, reconnecting",
      { channel = self.channel, streak = c.streak })
    c.streak = 0
    r.sub:bounce()
  end
end

function Fan:stats()
  local c = self.counters
  return { channel = self.channel, listeners = self.count, notifications = c.notifications,
           drops = c.drops, overflows = c.overflows, poll_saved = c.poll_saved,
           streak = c.streak }
end

return fanout

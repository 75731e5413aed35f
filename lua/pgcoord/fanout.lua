-- Fan-out: one channel's notifications handed to many in-process
-- listeners, each with its own bounded buffer and filter, so one slow
-- listener never delays another.
--
-- Recovery: consumers that also poll report what their polls found with
-- fan:polled(found).  Polls that keep finding work while no notification
-- arrives mean the LISTEN connection is deaf: after `threshold` such polls
-- in a row the subscriber is bounced.
--
-- Part of the notifications layer: requires only the runtime.
local task = require "pgcoord.task"
local fifo = require "pgcoord.fifo"
local log = require "pgcoord.log"
local lifecycle = require "pgcoord.lifecycle"
local options = require "pgcoord.options"
local notify = require "pgcoord.notify"

local fanout = {}

local traceback = debug.traceback

local Fan = {}
Fan.__index = Fan
local Listener = {}
Listener.__index = Listener

-- Channel names are checked where they are given (pgcoord.notify).
fanout.check_channel = notify.check_channel

local fanout_options = options.spec("pgcoord.fanout", {
  overflow = { { "drop", "error" }, default = "drop" },
})

-- True for a fan-out from pgcoord.fanout.
function fanout.is(v)
  return getmetatable(v) == Fan
end

function fanout.new(channel, opts)
  fanout.check_channel("pgcoord.fanout", channel)
  local o = fanout_options(opts)
  local fan = setmetatable({
    channel = channel,
    overflow = o.overflow,
    -- an array, walked for every notification; closed listeners stay in
    -- it (the walk passes over them) until forget_closed makes a new one
    listeners = {},
    closed_listeners = 0, -- how many of those are closed
    counters = { notifications = 0, drops = 0, overflows = 0, poll_saved = 0, streak = 0 },
    recovery = nil,
  }, Fan)
  require("pgcoord.metrics").track("fanout", fan)
  return fan
end

-- ---- listeners -----------------------------------------------------------

local listen_options = options.spec("fan:listen", {
  filter = { "function" },
  buffer = { "integer", min = 1, default = 64 },
})

local function new_listener(fan, filter, capacity)
  -- (eight fields: the hash part's size, and 10,000 idle listeners take
  -- 5.5 MB; a nil in the constructor would still be counted, and double
  -- it, so the filter, and later the task's condition `ready`, are added
  -- only when there is one)
  local l = setmetatable({
    fan = fan,
    capacity = capacity,
    queue = fifo.new(),  -- the buffer
    waiting = 0,         -- tasks in receive(): once the last leaves, no wake-up is wanted
    -- someone waits and no wake-up went out since (a signal wakes every
    -- waiter, and each that waits again says so); and open and
    -- unfiltered: one field each, as dispatch reads them for every
    -- notification.  (A task that starts to wait while a wake-up is on
    -- its way may get a second, spurious one: receive looks again.)
    wake_wanted = false,
    takes_all = filter == nil,
    closed = false,
  }, Listener)
  l.filter = filter
  l.wake_reader = function() l.ready:signal() end -- (ready: made when someone first waits)
  fan.listeners[#fan.listeners + 1] = l
  return l
end

function Fan:listen(opts)
  local o = listen_options(opts)
  return new_listener(self, o.filter, o.buffer)
end

-- Wakes l's reader for msg just queued, count now in its buffer: once for
-- the whole burst a read brings while the buffer has room, at once when it
-- is filling up.  (Only while someone waits in receive: l.wake_wanted.)
local function wake(l, count)
  l.wake_wanted = false
  if count < l.capacity // 2 then
    task.defer(l.wake_reader)
  else
    l.ready:signal()
  end
end

-- Queues msg for listener l; false when its buffer is full.  (dispatch
-- has this inline: it runs for every listener of every notification.)
local function offer(l, msg)
  local q = l.queue -- (fifo.push, inline)
  local head, tail = q.head, q.tail + 1
  if tail - head >= l.capacity then return false end
  q.tail, q[tail] = tail, msg
  if l.wake_wanted then wake(l, tail - head + 1) end
  return true
end

-- Queues msg for this listener alone (a local wake-up, say); false when
-- its buffer is full or it is closed.
function Listener:push(msg)
  if self.closed then return false end
  return offer(self, msg)
end

local pop, count = fifo.pop, fifo.count

-- The next message without waiting, or nil.
function Listener:poll()
  return pop(self.queue)
end

-- Counts a task out of receive() however it leaves: a cancelled task is
-- unwound, not returned from.
local WAITING = { __close = function(closer)
  local l = closer.listener
  l.waiting = l.waiting - 1
  if l.waiting == 0 then l.wake_wanted = false end
end }

-- Next message; nil, "timeout" after timeout seconds; nil, "closed".
function Listener:receive(timeout)
  while true do
    if count(self.queue) > 0 then return pop(self.queue) end
    if self.closed then return nil, "closed" end
    if not self.ready then
      -- a wake-up is only sent while someone waits (wake_wanted), so a
      -- condition is enough: there is nothing to remember for later
      self.ready = task.cond()
      self.waiting_closer = setmetatable({ listener = self }, WAITING)
    end
    self.waiting = self.waiting + 1
    self.wake_wanted = true
    local woken
    do
      local _ <close> = self.waiting_closer
      woken = self.ready:wait(timeout)
    end
    if not woken then
      if count(self.queue) > 0 then return pop(self.queue) end
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
  return count(self.queue)
end

function Listener:is_closed()
  return self.closed
end

-- Open fan:on listeners.  While there are any, one stop handler closes
-- them all, so that a graceful stop ends their tasks; the last to close
-- removes it.
local callbacks, callback_count, unregister_callbacks = {}, 0, nil

local function close_callbacks()
  for l in pairs(callbacks) do l:close() end
end

local function remember_callback(l)
  callbacks[l] = true
  callback_count = callback_count + 1
  -- while stopping, on_stop runs the handler at once: each new listener
  -- needs a call of its own
  if unregister_callbacks == nil or lifecycle.stopping() then
    unregister_callbacks = lifecycle.on_stop(close_callbacks, "listener callbacks")
  end
end

local function forget_callback(l)
  callbacks[l] = nil
  callback_count = callback_count - 1
  if callback_count == 0 then
    unregister_callbacks()
    unregister_callbacks = nil
  end
end

-- A listener of fan closed.  Once the closed ones are half the array, it
-- is rebuilt without them: a close costs O(1) amortised, where a copy of
-- the array at each close made closing n listeners O(n^2) (10,000 took
-- 2.2 s).  The rebuild is a new table, so a walk of the old one that woke
-- a task which closed a listener goes on undisturbed.
local function forget_closed(fan)
  local listeners, closed = fan.listeners, fan.closed_listeners + 1
  if closed * 2 < #listeners then
    fan.closed_listeners = closed
    return
  end
  local open = {}
  for i = 1, #listeners do
    local l = listeners[i]
    if not l.closed then open[#open + 1] = l end
  end
  fan.listeners, fan.closed_listeners = open, 0
end

-- Stops delivery and ends receive() and messages(); a fan:on listener's
-- task ends after the message in hand.
function Listener:close()
  if self.closed then return end
  self.closed, self.takes_all = true, false
  forget_closed(self.fan)
  fifo.clear(self.queue)
  if callbacks[self] then forget_callback(self) end
  if self.ready then self.ready:signal() end
end

local on_options = options.spec("fan:on", {
  filter = { "function" },
  buffer = { "integer", min = 1, default = 1024 },
})

-- Runs fn(msg) for each message in a task of its own (l.task); returns
-- the listener.  The task lives until l:close(), which a graceful stop
-- does for it.
function Fan:on(fn, opts)
  if type(fn) ~= "function" then
    options.raise("fan:on: expected a function, got %s", type(fn))
  end
  local o = on_options(opts)
  local l = new_listener(self, o.filter, o.buffer)
  local channel = self.channel
  -- msg, then the others in hand: one protected call for a burst, not
  -- one each; after an error the next call goes on with the rest
  local q = l.queue -- (the listener's for life: a close empties it in place)
  local function run_in_hand(msg)
    while true do
      fn(msg)
      -- the next in hand: fifo.pop, inline (as a call it was a fifth of
      -- what a message cost here)
      local head, tail = q.head, q.tail
      if head > tail then return end
      msg, q[head] = q[head], nil
      if head == tail then q.head, q.tail = 1, 0 else q.head = head + 1 end
    end
  end
  l.task = task.spawn(function()
    -- as `for msg in l:messages()`
    while true do
      local msg = l:receive()
      if msg == nil then return end
      local ok, err = xpcall(run_in_hand, traceback, msg)
      if not ok then log.error("listener failed", { channel = channel, error = err }) end
    end
  end)
  remember_callback(l)
  return l
end

-- ---- delivery ------------------------------------------------------------

-- Whether listener l's filter keeps msg; a filter that fails keeps nothing.
local function filtered(fan, l, msg)
  local ok, keep = pcall(l.filter, msg)
  if not ok then
    log.error("listener filter failed", { channel = fan.channel, error = tostring(keep) })
  end
  return ok and keep
end

-- Counts n notifications handed to fan's listeners, of which full
-- offers found a buffer full.  wired: they came over the wire.
local function account(fan, n, full, wired)
  local counters = fan.counters
  counters.notifications = counters.notifications + n
  if wired then counters.streak = 0 end
  if full == 0 then return end
  if fan.overflow == "drop" then
    counters.drops = counters.drops + full
  else
    counters.overflows = counters.overflows + full
    if wired then
      log.warn("listener buffer full, notification not delivered",
        { channel = fan.channel, notifications = n, undelivered = full })
    end
  end
end

-- Hands msg to every listener of fan; returns how many buffers were full.
-- (offer is inline: a call per listener was a fifth of a notification's
-- cost)
local function dispatch(fan, msg)
  local full = 0
  local listeners = fan.listeners
  for i = 1, #listeners do
    local l = listeners[i]
    -- (a task that an earlier offer woke at once may have closed it)
    if l.takes_all or (not l.closed and filtered(fan, l, msg)) then
      local q = l.queue
      local head, tail = q.head, q.tail + 1
      if tail - head >= l.capacity then
        full = full + 1
      else
        q.tail, q[tail] = tail, msg
        if l.wake_wanted then wake(l, tail - head + 1) end
      end
    end
  end
  account(fan, 1, full)
  return full
end

-- The wire's dispatch: msgs[1..n], the payloads the subscriber's
-- connection heard in a row on fan's channel, decoded (conn:route_notify
-- calls this itself: no other Lua call for a burst).  Each listener takes
-- the whole run in turn; an unfiltered one's is one loop that copies what
-- its buffer has room for, and wakes its reader once, after.  msgs is
-- lent for the call.
function fanout.wire(fan, msgs, n)
  local full = 0
  local listeners = fan.listeners
  for i = 1, #listeners do
    local l = listeners[i]
    if l.takes_all then
      local q = l.queue
      local head, tail = q.head, q.tail
      local take = l.capacity - (tail - head + 1)
      if take > n then take = n elseif take < 0 then take = 0 end
      for k = 1, take do q[tail + k] = msgs[k] end
      full = full + (n - take)
      if take > 0 then
        q.tail = tail + take
        if l.wake_wanted then wake(l, tail + take - head + 1) end
      end
    else
      -- one offer each: a filter may close its own listener
      for k = 1, n do
        if l.closed then break end
        local msg = msgs[k]
        if filtered(fan, l, msg) and not l.closed and not offer(l, msg) then full = full + 1 end
      end
    end
  end
  account(fan, n, full, true)
end

-- Local dispatch of value to this process's listeners.
function Fan:notify(value)
  local full = dispatch(self, value)
  if full > 0 and self.overflow == "error" then
    error(("pgcoord.fanout: %d listener buffer(s) full on channel %q (overflow = \"error\")")
      :format(full, self.channel), 2)
  end
end

-- NOTIFY channel with value as JSON (pgcoord.publish).
fanout.publish = notify.publish

function Fan:publish(db_or_tx, value)
  return fanout.publish(db_or_tx, self.channel, value)
end

-- ---- recovery ------------------------------------------------------------

local recovery_options = options.spec("fan:enable_recovery", {
  threshold = { "integer", default = 5 },
})

function Fan:enable_recovery(sub, opts)
  if type(sub) ~= "table" or type(sub.bounce) ~= "function" then
    options.raise("fan:enable_recovery: expected a subscriber, got %s", type(sub))
  end
  local o = recovery_options(opts)
  self.recovery = { sub = sub, threshold = o.threshold }
end

-- Whether fan:enable_recovery was called (a consumer enables it only once).
function Fan:recovery_enabled()
  return self.recovery ~= nil
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
  return { channel = self.channel, listeners = #self.listeners - self.closed_listeners,
           notifications = c.notifications, drops = c.drops, overflows = c.overflows,
           poll_saved = c.poll_saved, streak = c.streak }
end

return fanout

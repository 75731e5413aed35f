-- The outbox relay, a service: a task that claims batches of pending
-- messages and hands each to publish_fn, woken by the NOTIFY a save sends
-- (or every poll_interval), and a retention cleanup of processed messages.
--
-- state: "starting", "running", "stopping", "stopped".  stop([timeout])
-- lets the batch in hand finish (cancelled past timeout: its messages are
-- claimed again once their visibility timeout passes), then ends the
-- cleanup and the listening, and unregisters from pgcoord's stop.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local options = require "pgcoord.options"
local backoff = require "pgcoord.backoff"
local lifecycle = require "pgcoord.lifecycle"
local tables = require "pgcoord.tables"
local subscriber = require "pgcoord.subscriber"
local metrics = require "pgcoord.metrics"

local relay = {}

-- Per outbox table, counted by this process's relays.
local relayed_total = metrics.counter("pgcoord_outbox_relayed_total",
  "Outbox messages published and marked processed, per table.", { "table" })
local failed_total = metrics.counter("pgcoord_outbox_failed_total",
  "Outbox publish attempts that failed, per table.", { "table" })

local Relay = {}
Relay.__index = Relay

local error_text = task.error_text

local function subscriber_problem(sub)
  if type(sub.channel) ~= "function" or type(sub.hook_reconnect) ~= "function"
    or type(sub.start) ~= "function" then
    return "must be a subscriber from pgcoord.subscriber"
  end
  return nil
end

local check_options = options.spec("ob:relay", {
  poll_interval = { "number", default = 1, above = 0 },
  batch_size = { "integer", default = 100, min = 1 },
  retention = { "number", default = 0 },
  cleanup_interval = { "number", default = 3600, above = 0 },
  subscriber = { "table", check = subscriber_problem },
  listen = { "boolean" },
})

-- ---- listening ------------------------------------------------------------------------

-- The relay's ears: the outbox channel's notifications, and every
-- (re)connection of the subscriber (saves may have come meanwhile), each
-- a wake-up of the relay.
local Listening = {}
Listening.__index = Listening

local function listen(ob, sub, wake)
  local own = sub == nil
  if own then sub = subscriber.new(ob.db) end
  local fan = sub:channel(ob.channel)
  -- one buffered notification is a wake-up; more would add nothing
  local listener = fan:listen({ buffer = 1 })
  local self = setmetatable({ sub = sub, own = own, fan = fan, listener = listener,
    unhook = sub:hook_reconnect(function() wake:notify() end) }, Listening)
  self.reader = task.spawn(function()
    while listener:receive() ~= nil do wake:notify() end
  end)
  sub:start()
  return self
end

-- A poll found n messages that no notification announced.
function Listening:polled(n)
  self.fan:polled(n)
end

function Listening:connected()
  return self.sub:connected()
end

function Listening:stop()
  self.listener:close() -- ends the reader
  self.unhook()
  if self.own then self.sub:stop() end
  if self.reader ~= task.current() then self.reader:wait() end
end

-- ---- the service ------------------------------------------------------------------------

-- ob:relay(publish_fn, { poll_interval = 1, batch_size = 100, retention = 0,
--   cleanup_interval = 3600, listen = ob.notify, subscriber = sub })
-- publish_fn(msg) publishes one message; it may wait (yield).  Returning
-- false (with an optional reason) or raising marks the attempt failed.
function relay.new(ob, publish, opts)
  if type(publish) ~= "function" then
    options.raise("ob:relay: publish_fn must be a function, got %s", type(publish))
  end
  local o = check_options(opts)
  local listening = o.listen
  if listening == nil then listening = ob.notify end
  local self = setmetatable({
    state = "starting",
    outbox = ob,
    publish = publish,
    poll_interval = o.poll_interval,
    batch_size = o.batch_size,
    wake = task.signal(),       -- a notification, a reconnection, a poke, a stop
    backoff = backoff.new({ base = 0.1, cap = 30 }),
    counters = { published = 0, failed = 0, gave_up = 0, batches = 0, fetch_errors = 0 },
  }, Relay)
  if listening then self.listening = listen(ob, o.subscriber, self.wake) end
  self.cleanup = tables.cleanup(o.retention, o.cleanup_interval, function()
    return ob:delete_processed_older_than(o.retention)
  end, { table = ob.name, what = "outbox" })
  self.state = "running"
  self.unregister = lifecycle.on_stop(function() self:stop() end,
    "outbox relay " .. ob.name)
  self.task = task.spawn(Relay._loop, self)
  log.info("outbox relay started", { table = ob.name, batch_size = self.batch_size,
    poll_interval = self.poll_interval, listen = listening and ob.channel or false })
  return self
end

-- Waits up to timeout seconds for a wake-up; true unless the wait timed out.
function Relay:_wait(timeout)
  if self.state ~= "running" then return true end
  return self.wake:wait(timeout)
end

-- Makes the relay look for messages now (or once its batch is done).
function Relay:poke()
  self.wake:notify()
end

function Relay:_loop()
  local notified = true
  while self.state == "running" do
    -- what woke the relay until now, this claim sees
    self.wake:clear()
    local ok, batch = pcall(self.outbox.fetch_pending, self.outbox, self.batch_size)
    if ok then
      self.backoff:reset()
      if #batch > 0 then
        if not notified and self.listening then self.listening:polled(#batch) end
        self:_publish_batch(batch)
      end
      notified = true
      if #batch < self.batch_size then notified = self:_wait(self.poll_interval) end
    elseif task.is_cancelled(batch) then
      error(batch, 0)
    else
      self.counters.fetch_errors = self.counters.fetch_errors + 1
      local delay = self.backoff:next()
      log.error("outbox relay cannot fetch messages", { table = self.outbox.name,
        error = error_text(batch), retry_in = ("%.1f"):format(delay) })
      self:_wait(delay)
    end
  end
  self:_finish()
end

function Relay:_failed(msg, text, trace)
  self.counters.failed = self.counters.failed + 1
  failed_total:inc(1, self.outbox.name)
  local ok, status, retries = pcall(self.outbox.mark_failed, self.outbox, msg.id, text)
  if not ok then
    if task.is_cancelled(status) then error(status, 0) end
    log.error("outbox relay cannot record a failed publish", { id = msg.id,
      table = self.outbox.name, publish_error = text, error = error_text(status) })
    return
  end
  local fields = { id = msg.id, topic = msg.topic, table = self.outbox.name,
                   retries = retries, error = text, traceback = trace }
  if status == "failed" then
    self.counters.gave_up = self.counters.gave_up + 1
    log.error("outbox message failed for good (max_retries reached)", fields)
  else
    log.warn("outbox publish failed, will retry", fields)
  end
end

-- Marks ids processed (logging a failure: the messages would then be
-- claimed again once their visibility timeout passes).
function Relay:_mark(ids)
  if #ids == 0 then return end
  local ok, err = pcall(self.outbox.mark_processed, self.outbox, ids)
  if ok then
    self.counters.published = self.counters.published + #ids
    relayed_total:inc(#ids, self.outbox.name)
  elseif task.is_cancelled(err) then
    error(err, 0)
  else
    log.error("outbox relay cannot mark messages processed; they will be published again",
      { table = self.outbox.name, messages = #ids, error = error_text(err) })
  end
end

-- Keeps the claim of batch[from..] (logging a failure).
function Relay:_extend(batch, from)
  local rest = {}
  for j = from, #batch do rest[#rest + 1] = batch[j].id end
  local ok, err = pcall(self.outbox.extend, self.outbox, rest)
  if not ok then
    if task.is_cancelled(err) then error(err, 0) end
    log.warn("outbox relay cannot extend its claim", { table = self.outbox.name,
      error = error_text(err) })
  end
end

-- Publishes every message of the batch (a stop waits for this), then
-- marks those published.  A batch that outlasts half the visibility
-- timeout has its finished part marked and the rest of its claim extended.
function Relay:_publish_batch(batch)
  self.counters.batches = self.counters.batches + 1
  local done = {}
  local claimed = core.now()
  local half = self.outbox.visibility_timeout / 2
  local n = #batch
  for i = 1, n do
    local msg = batch[i]
    local ok, res, why = xpcall(self.publish, task.traced, msg)
    if ok and res ~= false then
      done[#done + 1] = msg.id
    elseif ok then
      self:_failed(msg, why ~= nil and error_text(why) or "publish_fn returned false")
    elseif task.is_cancelled(res) then
      error(res, 0)
    else
      self:_failed(msg, error_text(res.err), res.trace)
    end
    if i < n and core.now() - claimed > half then
      self:_mark(done)
      done = {}
      self:_extend(batch, i + 1)
      claimed = core.now()
    end
  end
  self:_mark(done)
end

-- Once the loop has ended (or was cancelled): the cleanup and the
-- listening end too.  (Each step may be repeated: a stop that cancelled
-- the loop while it finished does them again.)
function Relay:_finish()
  local first = self.state ~= "stopped"
  self.state = "stopped"
  self.unregister()
  if self.listening then self.listening:stop() end
  self.cleanup:stop()
  if first then
    local c = self.counters
    log.info("outbox relay stopped", { table = self.outbox.name, published = c.published,
      failed = c.failed })
  end
end

-- Stops the relay: the batch in hand is published and marked first,
-- within timeout seconds (nil: however long it takes), else cancelled.
-- Waits for that, unless called from the relay's own publish_fn.  Returns
-- false when the batch had to be cancelled.
function Relay:stop(timeout)
  options.timeout("relay:stop", timeout)
  if self.state == "running" then
    self.state = "stopping"
    self.wake:notify()
  end
  local t = self.task
  if t == task.current() then return true end
  local finished = t:wait(timeout)
  if not finished then t:cancel() end
  self:_finish()
  return finished
end

function Relay:running()
  return self.state == "running"
end

function Relay:stats()
  local c = self.counters
  return { running = self:running(), published = c.published, failed = c.failed,
           gave_up = c.gave_up, batches = c.batches, fetch_errors = c.fetch_errors,
           cleaned = self.cleanup:stats().deleted,
           listening = self.listening ~= nil and self.listening:connected() }
end

return relay

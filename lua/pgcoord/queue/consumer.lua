-- The consume service of one subscription: the claim loop and the runners
-- of its handlers.  Its outcomes are written by acks.lua, its
-- leases renewed by keeper.lua; wakeups.lua wakes it on a NOTIFY.
--
-- Unordered subscriptions claim FOR UPDATE SKIP LOCKED, as many rows as
-- there are free handlers plus `prefetch` more, kept in hand for the
-- handlers that end next (so the server works on the next claim while the
-- handlers work through what came before; while a backlog lasts, a second
-- claim goes beside it, so that the server always has one to work on), and
-- each claim writes the acks of the handlers that ended since the last
-- one.  Handlers run on runner tasks, up to concurrency of them, one
-- message after another.  Ordered ones claim the head only, and ack it and
-- claim the next in one statement.  Part of the primitives layer.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local lifecycle = require "pgcoord.lifecycle"
local options = require "pgcoord.options"
local retry = require "pgcoord.retry"
local backoff = require "pgcoord.backoff"
local json = require "pgcoord.json"
local db = require "pgcoord.db"
local fifo = require "pgcoord.fifo"
local sql = require "pgcoord.queue.sql"
local acks = require "pgcoord.queue.acks"
local keeper = require "pgcoord.queue.keeper"
local metrics = require "pgcoord.metrics"
local pop, push, count = fifo.pop, fifo.push, fifo.count

local consumer = {}

-- Outcomes per subscription, counted by this process (its consumers'
-- counters go with them; these stay).
local TOTALS = {
  acked = metrics.counter("pgcoord_queue_acked_total",
    "Queue deliveries acked, per queue and subscription.", { "queue", "subscription" }),
  requeued = metrics.counter("pgcoord_queue_requeued_total",
    "Queue deliveries that failed and were requeued, per queue and subscription.",
    { "queue", "subscription" }),
  dead = metrics.counter("pgcoord_queue_dead_total",
    "Queue messages moved to the dead letters, per queue and subscription.",
    { "queue", "subscription" }),
}

local Consumer = {}
Consumer.__index = Consumer
-- What a handler gets: { id, payload, published_at, deliveries,
-- last_error } and msg:fence(tx).  Its delivery (the in-flight entry) is
-- kept aside, so that a handler that changes the fields cannot move the
-- fence onto another delivery: the entry is the message's metatable (its
-- __index is Message), and names the message it was given as (a weak
-- table from message to entry cost more than a no-op handler).  Its
-- __metatable keeps it from the handler: getmetatable(msg) is Message.
local Message = {}
Message.__index = Message
local get_entry = debug.getmetatable

local error_text = task.error_text
local json_decode = json.decode

-- Bounds of the options, in seconds and counts.  Below the floors a
-- consumer would spin: it polls every poll_interval, renews leases every
-- visibility_timeout / 3 and retries a failing message after retry_delay.
-- Above a year, now() + the interval nears the end of PostgreSQL's
-- timestamp range (and nothing in a queue waits that long).  A claim
-- takes at most CLAIM_BATCH rows, so that it and the start of its handlers
-- hold the loop briefly; MAX_CONCURRENCY bounds the handlers of a consumer
-- (and the leases its renewal statement carries).
local MIN_POLL, MIN_LEASE, MIN_RETRY = 0.01, 0.1, 0.01
local MAX_SECONDS = 365 * 86400
local MAX_CONCURRENCY = 10000
local MAX_DELIVERIES = 0x7fffffff   -- deliveries is an integer column
local CLAIM_BATCH = 500             -- rows per claim statement
-- The least rows for each of two claims on their way at once: a small
-- consumer sends one claim at a time, not two of a row or two each.
local MIN_SPLIT = 8
consumer.MAX_SECONDS = MAX_SECONDS
-- While a backlog lasts, a claim looks from the floor (the highest message
-- id claimed) on: an ack leaves the row's entry in the pending index until
-- a vacuum, and a claim from the first id walks every one of them (a drain
-- of 100,000 messages: 272 buffers of that index a claim, 149 from the
-- floor; by its end the scan alone read 262, 9 from the floor).  A row
-- below the floor can become claimable again (its backoff or lease ends,
-- its publisher commits late), so a claim looks from the first id again at
-- least every FULL_SCAN_INTERVAL seconds, and whenever the last claim came
-- back short: such a row waits at most that much longer.
consumer.FULL_SCAN_INTERVAL = 1

local check_options = options.spec("q:consume", {
  concurrency = { "integer", default = 1, min = 1, max = MAX_CONCURRENCY },
  prefetch = { "integer", min = 0, max = MAX_CONCURRENCY },   -- nil: concurrency
  poll_interval = { "number", default = 5, min = MIN_POLL, max = MAX_SECONDS },
  visibility_timeout = { "number", default = 30, min = MIN_LEASE, max = MAX_SECONDS },
  max_deliveries = { "integer", min = 1, max = MAX_DELIVERIES },   -- nil: no limit
  retry_delay = { "number", default = 1, min = MIN_RETRY, max = MAX_SECONDS },
  max_retry_delay = { "number", default = 300, min = MIN_RETRY, max = MAX_SECONDS },
})

-- q:consume's options, checked, with defaults.
function consumer.options(opts)
  local o = check_options(opts)
  o.prefetch = o.prefetch or o.concurrency
  if o.max_retry_delay < o.retry_delay then
    options.raise("q:consume: max_retry_delay (%s) must not be less than retry_delay (%s)",
      options.show(o.max_retry_delay), options.show(o.retry_delay))
  end
  return o
end

-- What the parts of one consumer share: the subscription (pool, queue,
-- subscription, subscription_id, queue_id, ordered, retention), the
-- options of q:consume, and counters.
local Context = {}
Context.__index = Context

-- Log fields naming the subscription, and extra.
function Context:fields(extra)
  local f = { queue = self.queue, subscription = self.subscription }
  for k, v in pairs(extra or {}) do f[k] = v end
  return f
end

-- Counts n (1 when nil) of an outcome: acked, requeued or dead.
function Context:count(outcome, n)
  n = n or 1
  self.counters[outcome] = self.counters[outcome] + n
  self.totals[outcome]:inc(n)
end

-- ---- starting ------------------------------------------------------------------

-- Starts consuming: sub describes the subscription, fn is the handler, o
-- the checked options, waker the queue handle's wake-ups.
function consumer.start(sub, fn, o, waker)
  local ctx = setmetatable(sub, Context)
  ctx.max_deliveries, ctx.visibility_timeout = o.max_deliveries, o.visibility_timeout
  ctx.counters = { handled = 0, failed = 0, acked = 0, requeued = 0, dead = 0, lost = 0,
    fenced = 0 }
  ctx.totals = {}
  for outcome, family in pairs(TOTALS) do
    ctx.totals[outcome] = family:with(ctx.queue, ctx.subscription)
  end
  local self = setmetatable({
    ctx = ctx,
    fn = fn,
    o = o,
    state = "starting",      -- starting, running, stopping, stopped
    wakeup = task.signal(),  -- the claim loop sleeps here
    running = 0,             -- handlers in progress
    runners = 0,             -- tasks that run handlers, one message after another
    idle = {},               -- the wake-ups of those waiting for a message
    held = fifo.new(),       -- claimed, for the next free handler: their entries
    -- claimed and not ended at most (an ordered subscription has one
    -- message in flight: nothing to hold), and the least room worth a
    -- claim (half of it, at most prefetch), so that handlers ending one by
    -- one do not make a claim each
    capacity = o.concurrency + (sub.ordered and 0 or o.prefetch),
    claim_at = math.max(1, math.min(sub.ordered and 0 or o.prefetch,
      (o.concurrency + o.prefetch) // 2)),
    backlog = false,         -- the last claim came back full
    floor = 0,               -- the highest message id claimed
    scanned_at = -math.huge, -- when the last claim from the first id went out
    loop_rows = 0,           -- the rows the loop's claim on its way asked for, if any
    companion = nil,         -- the task that claims beside the loop, once needed
    companion_go = task.signal(), -- it sleeps here between its claims
    companion_rows = 0,      -- the rows of its claim on its way, if any
    in_flight = {},          -- message id -> its entry: { id, n = delivery count, row, task,
                             -- outcome, msg }, the metatable of the message handed out
    next_due = nil,          -- when the earliest backoff this consumer set ends
    waker = waker,
    done = task.cond(),      -- signalled once stopped
  }, Consumer)
  self.wake_due = false     -- a wake-up of the next runner is deferred
  self.wake_deferred = function()
    self.wake_due = false
    self:_wake_runners()
  end
  self.fan = waker:add(self, ctx.queue_id)
  self.acks = acks.start(ctx)
  self.keeper = keeper.start(ctx, function() return self:_leases() end)
  self.state = "running"
  self.loop_task = task.spawn(self._loop, self)
  self.remove_stop = lifecycle.on_stop(function() self:stop() end,
    ("queue consumer %s/%s"):format(ctx.queue, ctx.subscription))
  log.info("queue consumer started", ctx:fields({ ordered = ctx.ordered,
    concurrency = o.concurrency }))
  return self
end

-- Wakes the claim loop; a wake-up that comes while it is busy is kept.
function Consumer:wake()
  self.wakeup:notify()
end

-- Whether a handler is free (a notification is worth a claim).
function Consumer:has_room()
  return self.running < self.o.concurrency
end

-- The leases of running handlers and of the messages held for them:
-- { ids = message ids, ns = delivery counts }.
function Consumer:_leases()
  local ids, ns = {}, {}
  for id, entry in pairs(self.in_flight) do
    if not entry.outcome then
      local k = #ids + 1
      ids[k], ns[k] = id, entry.n
    end
  end
  return { ids = ids, ns = ns }
end

-- ---- claiming ------------------------------------------------------------------

local function by_id(a, b) return a.id < b.id end

-- Messages held for a handler.
function Consumer:_held()
  return count(self.held)
end

-- Messages a claim may take now: the rows of the claims on their way are
-- spoken for, so that two claims at once never take more than the room.
function Consumer:_room()
  return self.capacity - self.running - self:_held() - self.loop_rows - self.companion_rows
end

-- The least message id an unordered claim looks at (see FULL_SCAN_INTERVAL).
function Consumer:_claim_from()
  local now = core.now()
  if self.backlog and now - self.scanned_at < consumer.FULL_SCAN_INTERVAL then
    return self.floor
  end
  self.scanned_at = now
  return 0
end

-- Claims up to n rows; an unordered claim writes the acks waiting too.
function Consumer:_claim(n)
  local ctx = self.ctx
  if ctx.ordered then
    return ctx.pool:query(sql.claim_head, ctx.subscription_id, n, ctx.max_deliveries,
      ctx.visibility_timeout)
  end
  local batch = self.acks:take()
  local sids, ids, ns = sql.token_arrays(ctx.subscription_id, batch)
  local in_hand = {}
  for id in pairs(self.in_flight) do in_hand[#in_hand + 1] = id end
  local ok, rows = pcall(ctx.pool.query, ctx.pool, sql.claim, ctx.subscription_id, n,
    ctx.max_deliveries, ctx.visibility_timeout, sids, ids, ns, db.int_array(in_hand),
    self:_claim_from())
  if not ok then
    self.acks:give_back(batch)
    error(rows, 0)
  end
  local first = rows[1]
  self.acks:settle(batch, first.acked, first.lost and first.lost:gmatch("%d+"))
  if first.id == nil then return {} end   -- nothing claimed: the one row says so
  -- (an UPDATE returns its rows in no set order, mostly the claim's)
  local last = rows[1].id
  for i = 2, #rows do
    local id = rows[i].id
    if id < last then
      table.sort(rows, by_id)
      last = rows[#rows].id
      break
    end
    last = id
  end
  if last > self.floor then self.floor = last end
  return rows
end

-- Starts a handler per claimed row; returns how many were first
-- deliveries.  Rows claimed while a stop began are handed back instead.
function Consumer:_start(rows)
  local fresh = 0
  local ctx = self.ctx
  for _, row in ipairs(rows) do
    if row.state == "dead" then
      ctx:count("dead")
      log.warn("queue message moved to the dead letters", ctx:fields({ message = row.id,
        deliveries = row.deliveries, reason = row.last_error }))
    elseif self.state ~= "running" then
      self.acks:abandon(row.id, row.deliveries)
    else
      if row.deliveries == 1 then fresh = fresh + 1 end
      local id = row.id
      local entry = { n = row.deliveries, id = id, consumer = self, row = row, msg = false,
                      __index = Message, __metatable = Message }
      self.in_flight[id] = entry
      push(self.held, entry)
    end
  end
  self:_wake_runners()
  return fresh
end

-- ---- runners: a task runs one handler after another ---------------------------
-- (a task per message would cost more than a no-op handler itself)

-- Wakes one idle runner, or starts one (up to concurrency), when
-- messages are held.
function Consumer:_wake_runners()
  if self:_held() == 0 then return end
  local idle = self.idle
  if #idle > 0 then
    table.remove(idle):notify()
  elseif self.runners < self.o.concurrency then
    self.runners = self.runners + 1
    task.spawn(self._runner, self, task.signal())
  end
end

-- A runner that takes a message with more held has the next runner woken
-- once it yields (from the loop, see task.defer), if messages are still
-- held then: handlers that wait get a runner each, one after another,
-- while handlers that never wait leave the first runner to go through the
-- lot, with no wake-up of another runner for nothing (one a message cost
-- more than a no-op handler).
function Consumer:_wake_next()
  if self.wake_due then return end
  self.wake_due = true
  task.defer(self.wake_deferred)
end

-- A handler's slot, given back: its delivery leaves the in-flight set
-- (handed back at the stop if it has no outcome) and room for a claim
-- wakes the loop.
function Consumer:_release(entry)
  local id = entry.id
  if self.in_flight[id] == entry then
    self.in_flight[id] = nil
    if not entry.outcome then self.acks:abandon(id, entry.n) end
  end
  local running = self.running - 1
  self.running = running
  -- (only once there is room for a claim: a wake-up of the loop per
  -- handler would cost more than a no-op handler; _room() inline, as this
  -- runs for every message)
  local room = self.capacity - running - count(self.held) - self.loop_rows
    - self.companion_rows
  if room >= self.claim_at then self:_room_freed(room) end
end

-- What a runner's to-be-closed variable does when the runner is closed
-- (cancelled while its handler waits): gives back the slot of the
-- delivery in hand.  One per runner, not one per message.
local Slot = { __close = function(slot)
  local entry = slot.entry
  if entry then
    slot.entry = nil
    slot.consumer:_release(entry)
  end
end }

-- A runner: handles what is held while the consumer runs; ends when it
-- stops (a cancel of the runner cancels its handler).
function Consumer:_runner(wake)
  local me = task.current()
  local slot <close> = setmetatable({ consumer = self, entry = false }, Slot)
  local held = self.held
  while true do
    -- the next message held, if any, taken
    local entry = self.state == "running" and pop(held)
    if entry then
      if count(held) > 0 and not self.wake_due then self:_wake_next() end
      entry.task = me
      self.running = self.running + 1
      slot.entry = entry
      local ok, err = pcall(self._handle, self, entry.row, entry)
      slot.entry = false
      self:_release(entry)
      if not ok then   -- cancelled (at a stop's deadline): this runner ends
        self.runners = self.runners - 1
        error(err, 0)
      end
    elseif self.state ~= "running" then
      break
    else
      local idle = self.idle
      idle[#idle + 1] = wake
      wake:wait()
    end
  end
  self.runners = self.runners - 1
end

-- Hands back the messages held for a handler (the consumer is stopping).
function Consumer:_drop_held()
  for entry in pop, self.held do
    self.in_flight[entry.id] = nil
    self.acks:abandon(entry.id, entry.n)
  end
end

-- Seconds to sleep after a claim found nothing: until the next lease or
-- backoff ends, at most wait; overdue spaces out the looks that find a due
-- row yet claim none.  nil when the subscription is gone.
function Consumer:_idle_wait(wait, overdue)
  local ctx = self.ctx
  local ok, row = pcall(ctx.pool.one, ctx.pool, ctx.ordered and sql.next_due_head
    or sql.next_due, ctx.subscription_id)
  if ok and not row.subscribed then return nil end
  local next_in = ok and row.next_in
  -- due, yet not claimed: another consumer is claiming it, or a fenced
  -- transaction holds it; look again soon, less often each time
  if next_in and next_in <= 0 then
    wait = math.min(wait, overdue:next())
  elseif next_in then
    overdue:reset()
    wait = math.min(wait, math.max(next_in, 0.01))
  else
    overdue:reset()
  end
  return wait
end

-- The second claim on its way beside the loop's, while there is a
-- backlog: the server works on both at once, as it would for two
-- consumers.  One task sends them all, one after another (a task a claim
-- cost more than the claim's handlers), until the consumer stops.
function Consumer:_companion_loop()
  while true do
    local n = self.companion_rows
    if n > 0 then
      local ok, rows = pcall(self._claim, self, n)
      self.companion_rows = 0
      if ok then
        self.backlog = #rows == n
        self:_start(rows)
      else
        log.warn("queue claim failed", self.ctx:fields({ error = error_text(rows) }))
      end
      self.wakeup:notify()
    elseif self.state ~= "running" then
      return
    else
      self.companion_go:wait()
    end
  end
end

-- Sends the companion claim of n rows (their room is spoken for at once).
function Consumer:_send_companion(n)
  self.companion_rows = n
  if self.companion then
    self.companion_go:notify()
  else
    self.companion = task.spawn(self._companion_loop, self)
  end
end

-- Whether a companion claim of n rows is worth sending: a backlog, none on
-- its way yet, enough rows for two claims, never for an ordered
-- subscription (it has one message in flight).
function Consumer:_companion_due(n)
  return self.backlog and self.companion_rows == 0 and not self.ctx.ordered
    and self.state == "running" and n >= math.max(MIN_SPLIT, self.claim_at)
end

-- A handler ended, leaving room (at least claim_at) for a claim: it wakes
-- the loop.  While the loop's own
-- claim is on its way during a backlog, a companion claim goes out at once
-- beside it instead: the loop, woken as soon as the room reaches claim_at,
-- claims that much alone and sends the next only once it came back, so
-- without this the handlers would wait on one claim after another (a
-- drain had two claims on their way 0.02 s of 6 s).
function Consumer:_room_freed(room)
  if self.loop_rows > 0 and self:_companion_due(room) then
    self:_send_companion(math.min(room, CLAIM_BATCH))
  else
    self.wakeup:notify()
  end
end

-- The claim loop: claim while handlers are free, then sleep until a
-- handler ends, a notification or a reconnection comes, the next lease or
-- backoff ends, or poll_interval passes.
function Consumer:_loop()
  local ctx, o = self.ctx, self.o
  local failed = backoff.new({ base = 0.1, cap = o.poll_interval })
  local overdue = backoff.new({ base = 0.02, cap = 2.56, jitter = false })
  local by_timer = false
  while self.state == "running" do
    local free = self:_room()
    local wait = o.poll_interval
    if free >= self.claim_at then
      -- wake-ups that came before this claim are answered by it
      self.wakeup:clear()
      local asked = math.min(free, CLAIM_BATCH)
      if self:_companion_due(free // 2) then
        asked = math.min(free // 2, CLAIM_BATCH)
        self:_send_companion(math.min(free - asked, CLAIM_BATCH))
      end
      self.loop_rows = asked
      local ok, rows = pcall(self._claim, self, asked)
      self.loop_rows = 0
      self.backlog = ok and #rows == asked
      if not ok then
        wait = failed:next()
        log.warn("queue claim failed", ctx:fields({ error = error_text(rows) }))
      else
        failed:reset()
        local fresh = self:_start(rows)
        -- first deliveries found by the timer: no notification announced them
        if by_timer and fresh > 0 then self.fan:polled(fresh) end
        -- a full batch: there may be more, claim again at once
        if #rows == asked and asked < free then self.wakeup:notify() end
        if #rows > 0 then
          overdue:reset()
          -- the runners take these first, so that the next claim is sized
          -- by the room they leave: handlers that never wait free it all,
          -- and one claim of capacity replaces claims of the one or two
          -- rows freed while this one was on its way
          task.pass()
        end
        if #rows == 0 then
          wait = self:_idle_wait(wait, overdue)
          if not wait then
            log.warn("queue subscription dropped, consumer stopping", ctx:fields())
            task.spawn(self.stop, self)
            return
          end
        elseif self.next_due then
          wait = math.min(wait, math.max(self.next_due - core.now(), 0.01))
        end
        if self.next_due and self.next_due <= core.now() + wait then self.next_due = nil end
      end
    end
    -- by_timer: only the timer ended the sleep (see fan:polled above)
    if self.state == "running" then by_timer = not self.wakeup:wait(wait) end
  end
end

-- ---- handling ------------------------------------------------------------------

-- Requeues a delivery that failed (reason: why), with backoff.
function Consumer:_failed(row, entry, reason)
  entry.outcome = "requeue"
  self.ctx.counters.failed = self.ctx.counters.failed + 1
  local delay = retry.exponential(self.o.retry_delay, self.o.max_retry_delay, entry.n)
  local due = core.now() + delay
  if not self.next_due or due < self.next_due then self.next_due = due end
  self.acks:requeue(row.id, entry.n, reason, delay)
end

-- A handler, on its runner: decodes the payload, runs fn, then acks or
-- requeues.  The runner gives the slot back (see Slot, for a cancel).
function Consumer:_handle(row, entry)
  local ctx = self.ctx
  local decoded, payload = pcall(json_decode, row.payload)
  if not decoded then
    -- a poison message: a delivery that failed, so max_deliveries ends it
    local reason = "the payload cannot be decoded: " .. error_text(payload)
    log.error("queue message payload cannot be decoded", ctx:fields({ message = row.id,
      deliveries = row.deliveries, error = reason }))
    return self:_failed(row, entry, reason)
  end
  local msg = setmetatable({ id = row.id, payload = payload, published_at = row.published_at,
                deliveries = row.deliveries, last_error = row.last_error }, entry)
  entry.msg = msg
  local ok, res = xpcall(self.fn, task.traced, msg)
  ctx.counters.handled = ctx.counters.handled + 1
  if ok and res ~= false then
    entry.outcome = "ack"
    if not ctx.ordered then
      self.acks:push(row.id, entry.n)
    elseif self.state == "running" then
      -- the next claim must see this ack: write it before the slot frees,
      -- and claim the next head with it
      local next_head = self.acks:ack_head(row.id, entry.n)
      if next_head then self:_start({ next_head }) end
    else
      self.acks:ack_one(row.id, entry.n)
    end
    return
  end
  if not ok and task.is_cancelled(res) then error(res, 0) end
  local reason
  if ok then
    reason = "the handler returned false"
  else
    reason = error_text(res.err)
    log.error("queue handler failed", ctx:fields({ message = row.id,
      deliveries = row.deliveries, error = reason, traceback = res.trace }))
  end
  self:_failed(row, entry, reason)
end

-- ---- fencing -------------------------------------------------------------------

-- The error of a refused fence: SQLSTATE 55P03 (lock_not_available).
local function fence_error(ctx, entry, why)
  return core.error("55P03", ("msg:fence: message %d (delivery %d) of queue %q, subscription %q:"
    .. " %s; the transaction must not commit"):format(entry.id, entry.n, ctx.queue,
      ctx.subscription, why))
end

-- Raises (55P03) unless the delivery is still current; otherwise its row
-- stays locked until tx ends.
function Consumer:_fence(tx, entry)
  local ctx = self.ctx
  if entry.outcome or self.in_flight[entry.id] ~= entry then
    error(fence_error(ctx, entry, "its handler has ended"), 0)
  end
  if not tx:one(sql.fence, ctx.subscription_id, entry.id, entry.n) then
    ctx.counters.fenced = ctx.counters.fenced + 1
    log.warn("queue fence refused a write: the lease was lost", ctx:fields({
      message = entry.id, deliveries = entry.n }))
    error(fence_error(ctx, entry, "its lease was lost (another consumer has the message,"
      .. " or it was acked or dead-lettered)"), 0)
  end
end

-- In the handler's transaction tx (on the queue's database): raises
-- unless this delivery is still the current one, and keeps it current
-- until tx ends, so the writes in tx commit only while the lease holds.
function Message:fence(tx)
  local entry = get_entry(self)
  if type(entry) ~= "table" or entry.__index ~= Message or entry.msg ~= self then
    options.raise("msg:fence: expected a message given to a queue handler")
  end
  if type(tx) ~= "table" or type(tx.query) ~= "function" or tx.size ~= nil then
    local got = type(tx) == "table" and tx.size ~= nil and "a pool" or type(tx)
    options.raise("msg:fence: expected a transaction (the tx of db:tx), got %s: a fence holds"
      .. " only until its transaction ends", got)
  end
  return entry.consumer:_fence(tx, entry)
end

-- ---- stopping ------------------------------------------------------------------

function Consumer:_shutdown(timeout)
  local ctx = self.ctx
  self.wakeup:notify()
  self.waker:remove(self)
  self.loop_task:wait()
  if self.companion then
    self.companion_go:notify()
    self.companion:wait()
  end
  -- held messages go back first, for other consumers to take at once
  self:_drop_held()
  self.acks:release()
  -- idle runners end (the others once their handlers have)
  for _, wake in ipairs(self.idle) do wake:notify() end
  self.idle = {}
  local deadline = timeout and core.now() + timeout
  local handlers = {}
  for id, entry in pairs(self.in_flight) do handlers[id] = entry.task end
  for id, t in pairs(handlers) do
    if not t:wait(deadline and math.max(0, deadline - core.now())) then
      log.warn("queue handler still running at the stop deadline, cancelling",
        ctx:fields({ message = id }))
      t:cancel()
    end
  end
  -- a handler cancelled before it started never gave its slot back
  for id, entry in pairs(self.in_flight) do
    self.in_flight[id] = nil
    self.running = self.running - 1
    self.acks:abandon(id, entry.n)
  end
  self.acks:stop()
  self.keeper:stop()
  self.state = "stopped"
  local c = ctx.counters
  log.info("queue consumer stopped", ctx:fields({ handled = c.handled, failed = c.failed,
    dead = c.dead }))
  self.done:signal()
end

local check_stop_timeout = { "number", min = 0, max = math.huge }

-- Stops taking messages, lets the running handlers finish (cancelling
-- them after timeout seconds, if given: their messages are handed back at
-- once), writes their acks, unregisters its stop handler, and returns
-- once all that is done.
function Consumer:stop(timeout)
  if timeout ~= nil then options.check("consumer:stop", "timeout", check_stop_timeout, timeout) end
  if self.state == "running" then
    self.state = "stopping"
    self.remove_stop()
    -- part of the process's stop: past its deadline, this task gets the
    -- moment stop handlers get, to hand back what was cancelled
    task.spawn(self._shutdown, self, timeout).cleanup = true
  end
  -- a handler that stops its own consumer cannot wait for itself
  local current = task.current()
  for _, entry in pairs(self.in_flight) do
    if entry.task == current then return end
  end
  while self.state ~= "stopped" do self.done:wait() end
end

function Consumer:stats()
  local c = self.ctx.counters
  return { state = self.state, running = self.running, handled = c.handled, failed = c.failed,
           acked = c.acked,
           requeued = c.requeued, dead = c.dead, lost = c.lost, fenced = c.fenced,
           unacked = self.acks:count(), held = self:_held() }
end

return consumer

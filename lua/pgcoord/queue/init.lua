-- Durable queues with subscriptions: at-least-once, optionally ordered.
--
-- A queue is a named topic.  q:publish copies a message, in one statement
-- and in the caller's transaction, to every subscription that exists at
-- that moment (sql/003_queue.sql has the tables and why they look as they
-- do).  A consumer claims a subscription's deliveries by setting a lease,
-- visible_at = now() + visibility_timeout, in the same UPDATE that claims
-- them; it renews the lease while the handler runs, and acknowledges or
-- requeues when the handler ends.  A consumer that dies stops renewing:
-- once its lease runs out, the message is claimed again by another.  The
-- delivery count doubles as the lease's fencing token, so a consumer that
-- lost its lease cannot ack or requeue on top of the next one, and
-- msg:fence(tx) lets a handler's own transaction check it too.
--
-- Unordered subscriptions claim FOR UPDATE SKIP LOCKED, as many rows as
-- there are free handlers; acks are written in batches by one task.
-- Ordered subscriptions only ever claim the oldest pending delivery (the
-- head), and only once its lease or backoff is over, so at most one
-- message is in flight across every consumer, and a requeued message
-- holds back the ones behind it.
--
-- Consumers wake on a NOTIFY that publish sends on pgcoord_queue_<id>, on
-- every (re)connection of the LISTEN connection, and on a poll timer; an
-- idle consumer sleeps until the earliest lease or backoff of its
-- subscription ends, so redelivery after a crash is as prompt as the lease.
--
-- The parts: this file is the public object (the queue handle, its
-- subscriptions, publishing, dead letters); sql.lua has every statement;
-- consumer.lua the consume service (claims and handlers), acks.lua the
-- writer of its outcomes, keeper.lua the renewal of its leases and the
-- sweep, wakeups.lua the notifications that wake consumers.  Part of the
-- primitives layer.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local db = require "pgcoord.db"
local json = require "pgcoord.json"
local log = require "pgcoord.log"
local options = require "pgcoord.options"
local sql = require "pgcoord.queue.sql"
local consumer = require "pgcoord.queue.consumer"
local keeper = require "pgcoord.queue.keeper"
local wakeups = require "pgcoord.queue.wakeups"
local metrics = require "pgcoord.metrics"

local queue = {}

local Queue = {}
Queue.__index = Queue

-- The statements, for benchmarks that run the same SQL through pgbench.
queue.sql = sql
queue.sweep = keeper.sweep

local SWEEP_BATCH = keeper.SWEEP_BATCH
local MAX_SECONDS = consumer.MAX_SECONDS

-- (counted when the statement returns: a transaction that rolls back
-- after it still counts)
local published = metrics.counter("pgcoord_queue_published_total",
  "Messages published to at least one subscription, per queue.", { "queue" })

local error_text = task.error_text
local int_array = db.int_array

-- ---- checks ----------------------------------------------------------------------

local function check_name(where, what, name)
  if type(name) ~= "string" or name == "" then
    options.raise("%s: %s must be a non-empty string, got %s", where, what, options.show(name))
  end
end

local function check_conn(where, conn)
  if type(conn) ~= "table" or type(conn.query) ~= "function" then
    options.raise("%s: expected a pool or a transaction, got %s", where, type(conn))
  end
end

-- Encodes one payload; raises naming the queue (and the value's position).
local function encode(self, where, value, index)
  local which = index and ("value #%d"):format(index) or "the value"
  if value == nil then
    options.raise("%s: %s for queue %q is nil (publish pgcoord.null for a JSON null)",
      where, which, self.name)
  end
  local ok, payload = pcall(json.encode, value)
  if not ok then
    options.raise("%s: %s for queue %q cannot be encoded as JSON: %s",
      where, which, self.name, error_text(payload))
  end
  return payload
end

local queue_options = options.spec("pgcoord.queue", {
  ordered = { "boolean" },   -- nil: as the subscription was created
  retention = { "number", default = 300, min = 0, max = MAX_SECONDS },
  subscriber = { "table" },
})

-- Epoch seconds of years 1 to 9999, as for a job's run_at.
local MIN_TIME, MAX_TIME = -62135596800, 253402300799
local function publish_options(where)
  local check = options.spec(where, {
    delay = { "number", min = 0, max = MAX_SECONDS },
    visible_at = { "number", min = MIN_TIME, max = MAX_TIME },
  })
  return function(opts)
    local o = check(opts)
    if o.delay and o.visible_at then
      options.raise("%s: give delay or visible_at, not both", where)
    end
    return o
  end
end
local check_publish = publish_options("q:publish")
local check_publish_many = publish_options("q:publish_many")
-- (the options of a publish without any, checked once: read, never changed)
local NO_PUBLISH_OPTIONS = check_publish(nil)
local dead_options = options.spec("q:dead", {
  limit = { "integer", default = 1000, min = 1, max = 100000 },
})

-- ---- the queue -----------------------------------------------------------------

function queue.new(pool, name, opts)
  if type(pool) ~= "table" or type(pool.query) ~= "function" or not pool.size then
    options.raise("pgcoord.queue: expected a pool from pgcoord.connect, got %s", type(pool))
  end
  check_name("pgcoord.queue", "name", name)
  local o = queue_options(opts)
  local sub = o.subscriber
  if sub ~= nil and type(sub.add) ~= "function" then
    options.raise("pgcoord.queue: option subscriber must be a pgcoord.subscriber")
  end
  return setmetatable({
    pool = pool,
    name = name,
    ordered = o.ordered,
    retention = o.retention,
    sub = nil,                  -- the subscriber consumers listen through, once one runs
    wakeups = wakeups.new(pool, sub),
    published = published:with(name), -- (the series, its key built once: a publish counts)
  }, Queue)
end

-- Creates subscription `name` if it does not exist; true when it was
-- created.  Only messages published after this are copied to it.
function Queue:subscribe(name)
  check_name("q:subscribe", "subscription name", name)
  local pool = self.pool
  pool:exec(sql.queue_create, self.name)
  local qid = pool:one(sql.queue_id, self.name).id
  local row = pool:one(sql.subscribe, qid, name, self.ordered == true)
  if row then
    log.info("queue subscription created", { queue = self.name, subscription = name,
      ordered = row.ordered })
    return true
  end
  local existing = pool:one(sql.subscription, self.name, name)
  if existing and self.ordered ~= nil and existing.ordered ~= self.ordered then
    options.raise("q:subscribe: subscription %q of queue %q exists and is %s; this queue handle"
      .. " says ordered = %s", name, self.name,
        existing.ordered and "ordered" or "unordered", tostring(self.ordered))
  end
  return false
end

-- Looks up a subscription; raises naming it when it does not exist.
function Queue:_subscription(where, name)
  check_name(where, "subscription name", name)
  local row = self.pool:one(sql.subscription, self.name, name)
  if not row then
    options.raise("%s: queue %q has no subscription %q (q:subscribe creates it)",
      where, self.name, name)
  end
  return row
end

-- Drops subscription `name` with every delivery it holds; true if it existed.
function Queue:unsubscribe(name)
  check_name("q:unsubscribe", "subscription name", name)
  local removed = self.pool:tx(function(tx)
    local row = tx:one(sql.subscription, self.name, name)
    if not row then return false end
    tx:query(sql.sweep_wait_lock, sql.SWEEP_LOCK, row.queue_id)
    -- Waits for publishers that hold the row FOR KEY SHARE; the ones that
    -- come after no longer see it.
    tx:exec(sql.drop_subscription, row.id)
    local total = 0
    while true do
      local gone = tx:query(sql.unsubscribe_batch, row.id, SWEEP_BATCH)
      if #gone == 0 then break end
      total = total + #gone
      local ids = {}
      for i, r in ipairs(gone) do ids[i] = r.id end
      tx:exec(sql.drop_messages, int_array(ids), row.queue_id)
    end
    return total
  end)
  if not removed then return false end
  log.info("queue subscription dropped", { queue = self.name, subscription = name,
    deliveries = removed })
  return true
end

-- ---- publishing ------------------------------------------------------------------

-- A deadlock that involves the publish lock of ordered queues (one lock
-- for all of them, so two publishers can never deadlock on it alone: the
-- other lock is the caller's, a row it updated say), reported by the
-- server as advisory lock [db,PUBLISH_LOCK,0,2], comes back as an error
-- that says what to do.  Other errors pass.
local function publish_error(self, where, err)
  if not (db.is_error(err) and err.sqlstate == "40P01") then return err end
  local ours = false
  for key in tostring(err.detail or ""):gmatch("advisory lock %[%d+,(%d+),%d+,2%]") do
    ours = ours or tonumber(key) == sql.PUBLISH_LOCK
  end
  if not ours then return err end
  local e = core.error("40P01", ("%s: deadlock publishing to ordered queue %q: the publish"
    .. " lock of ordered queues (one for all, held until commit) and another lock were taken in"
    .. " opposite orders by two transactions. Publish to ordered queues before taking other"
    .. " locks in the transaction; this one is aborted, run it again"):format(where, self.name))
  e.detail = err.detail
  return e
end

-- Runs a publish statement; o: its checked options (a delay or not).
local function run_publish(self, where, db_or_tx, statements, payload, o)
  local ok, row
  if o.delay or o.visible_at then
    ok, row = pcall(db_or_tx.one, db_or_tx, statements.delayed, self.name, payload, o.delay,
      o.visible_at)
  else
    ok, row = pcall(db_or_tx.one, db_or_tx, statements.now, self.name, payload)
  end
  if not ok then error(publish_error(self, where, row), 0) end
  return row
end

local ONE = { now = sql.publish, delayed = sql.publish_delayed }
local MANY = { now = sql.publish_many, delayed = sql.publish_many_delayed }

-- Publishes value to every current subscription, in db_or_tx's
-- transaction; returns the message id (nil when there was no
-- subscription) and the number of copies.  opts: delay (seconds) or
-- visible_at (epoch seconds): when the message may first be delivered.
function Queue:publish(db_or_tx, value, opts)
  check_conn("q:publish", db_or_tx)
  local o = opts == nil and NO_PUBLISH_OPTIONS or check_publish(opts)
  local payload = encode(self, "q:publish", value)
  local row = run_publish(self, "q:publish", db_or_tx, ONE, payload, o)
  if row.id then self.published:inc(1) end
  return row.id, row.copies
end

-- Publishes a list of values in one statement; returns their ids in order
-- (empty when there was no subscription) and the number of copies of each.
-- opts: as for q:publish, for every value.
function Queue:publish_many(db_or_tx, values, opts)
  check_conn("q:publish_many", db_or_tx)
  if type(values) ~= "table" then
    options.raise("q:publish_many: expected a list of values, got %s", type(values))
  end
  local o = check_publish_many(opts)
  local n = values.n or #values
  if n == 0 then return {}, 0 end
  local parts = {}
  for i = 1, n do parts[i] = encode(self, "q:publish_many", values[i], i) end
  local row = run_publish(self, "q:publish_many", db_or_tx, MANY,
    "[" .. table.concat(parts, ",") .. "]", o)
  if row.ids then self.published:inc(#row.ids) end
  return row.ids or {}, row.copies
end

-- ---- dead letters and counts -------------------------------------------------------

-- Dead letters of a subscription, oldest first: { id, payload,
-- published_at, deliveries, last_error, last_delivered_at }; a payload
-- that cannot be decoded is absent, and payload_error says why.
function Queue:dead(name, opts)
  local o = dead_options(opts)
  local sub = self:_subscription("q:dead", name)
  local rows = self.pool:query(sql.dead, sub.id, o.limit)
  rows.affected = nil
  for _, r in ipairs(rows) do
    local ok, payload = pcall(json.decode, r.payload)
    if ok then r.payload = payload else r.payload, r.payload_error = nil, error_text(payload) end
  end
  return rows
end

-- Moves dead letters (all, or those with the given message ids) back to
-- pending with a fresh delivery count; returns how many.
function Queue:requeue_dead(name, ids)
  local list
  if ids ~= nil then
    if type(ids) ~= "table" then ids = { ids } end
    for i, id in ipairs(ids) do
      if math.type(id) ~= "integer" then
        options.raise("q:requeue_dead: ids must be integers, got %s at position %d",
          options.show(id), i)
      end
    end
    list = int_array(ids)
  end
  local sub = self:_subscription("q:requeue_dead", name)
  local row = self.pool:one(sql.requeue_dead, sub.id, list, sub.queue_id)
  if row.requeued > 0 then
    log.info("queue dead letters requeued", { queue = self.name, subscription = name,
      messages = row.requeued })
  end
  return row.requeued
end

-- Counts for a subscription: pending (delayed: leased or backing off),
-- dead, acked (still retained); last_delivered_at and last_acked_at.
function Queue:stats(name)
  local sub = self:_subscription("q:stats", name)
  local row = self.pool:one(sql.stats, sub.id)
  row.ordered = sub.ordered
  return row
end

-- ---- consuming -------------------------------------------------------------------

-- Starts consuming subscription `name`: fn(msg) with msg = { id, payload,
-- published_at, deliveries, last_error }; returning acks, returning false
-- or raising requeues.  Returns the consumer (consumer:stop()).
function Queue:consume(name, fn, opts)
  local where = "q:consume"
  check_name(where, "subscription name", name)
  if type(fn) ~= "function" then
    options.raise("%s: handler must be a function, got %s", where, type(fn))
  end
  local o = consumer.options(opts)
  local sub = self:_subscription(where, name)
  if self.ordered ~= nil and sub.ordered ~= self.ordered then
    options.raise("%s: subscription %q of queue %q is %s; this queue handle says ordered = %s",
      where, name, self.name, sub.ordered and "ordered" or "unordered", tostring(self.ordered))
  end
  if sub.ordered and o.concurrency ~= 1 then
    options.raise("%s: subscription %q of queue %q is ordered, which allows one message in"
      .. " flight: concurrency must be 1, got %d", where, name, self.name, o.concurrency)
  end
  local c = consumer.start({
    pool = self.pool, queue = self.name, subscription = name, subscription_id = sub.id,
    queue_id = sub.queue_id, ordered = sub.ordered, retention = self.retention,
  }, fn, o, self.wakeups)
  self.sub = self.wakeups:subscriber()
  return c
end

return queue

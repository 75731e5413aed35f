-- The transactional outbox: a service writes a domain change and the
-- messages announcing it in one transaction; a relay hands pending
-- messages to a publisher function until each is published.
--
-- A message is pending until a relay claims it (FOR UPDATE SKIP LOCKED,
-- so concurrent relays never take the same one) and marks it processing
-- with visible_at = now() + visibility_timeout.  Published, it becomes
-- processed; refused, it goes back to pending after a growing retry delay,
-- or to failed once max_retries attempts have failed.  A relay that dies
-- leaves its batch in processing: past visible_at, any relay claims it
-- again.  Delivery is therefore at least once; consumers get exactly-once
-- effects with the processed-messages store (pgcoord.processed).
--
-- A save sends a NOTIFY on the outbox's channel in the same transaction,
-- so relays wake at commit; they also poll every poll_interval.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local json = require "pgcoord.json"
local log = require "pgcoord.log"
local store = require "pgcoord.store"

local outbox = {}

local Outbox = {}
Outbox.__index = Outbox
local Relay = {}
Relay.__index = Relay

local WHERE = "pgcoord.outbox"
local KNOWN = { table = true, max_retries = true, visibility_timeout = true, retry_delay = true,
                retry_delay_max = true, notify = true, channel = true }
local RELAY_KNOWN = { poll_interval = true, batch_size = true, retention = true,
                      cleanup_interval = true, subscriber = true, listen = true }
local PUBLISHER_KNOWN = { db = true, prefix = true, queue_options = true }
local MESSAGE_FIELDS = { topic = true, key = true, payload = true, headers = true }

local MAX_ERROR_TEXT = 4000
local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

-- ---- SQL ------------------------------------------------------------------------

local function ddl(q)
  return {
    ([[CREATE TABLE %s (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  seq bigint GENERATED ALWAYS AS IDENTITY,
  topic text NOT NULL CHECK (topic <> ''),
  key text,
  payload jsonb,
  headers jsonb NOT NULL DEFAULT '{}',
  status text NOT NULL DEFAULT 'pending'
    CHECK (status IN ('pending', 'processing', 'processed', 'failed')),
  retries integer NOT NULL DEFAULT 0,
  last_error text,
  created_at timestamptz NOT NULL DEFAULT now(),
  visible_at timestamptz NOT NULL DEFAULT now(),
  processed_at timestamptz
)]]):format(q),
    -- claiming pending messages in creation order
    ("CREATE INDEX ON %s (seq) WHERE status = 'pending'"):format(q),
    -- claiming again what a dead relay left in processing
    ("CREATE INDEX ON %s (visible_at) WHERE status = 'processing'"):format(q),
    -- retention cleanup
    ("CREATE INDEX ON %s (processed_at) WHERE status = 'processed'"):format(q),
  }
end

-- The claim: up to $1 messages, pending ones in creation order and those
-- whose claim expired, locked with SKIP LOCKED and marked processing for
-- $2 seconds; `final` selects from the CTE `claimed`.
local function claim_sql(q, final)
  return ([[WITH stale AS (
  SELECT id, seq FROM %s
  WHERE status = 'processing' AND visible_at <= now()
  ORDER BY visible_at LIMIT $1 FOR UPDATE SKIP LOCKED
), fresh AS (
  SELECT id, seq FROM %s
  WHERE status = 'pending' AND visible_at <= now()
  ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED
), picked AS (
  SELECT id, seq FROM stale UNION ALL SELECT id, seq FROM fresh ORDER BY seq LIMIT $1
), claimed AS (
  UPDATE %s AS m SET status = 'processing', visible_at = now() + make_interval(secs => $2)
  FROM picked WHERE m.id = picked.id
  RETURNING m.id, m.seq, m.topic, m.key, m.payload, m.headers, m.retries, m.created_at
)
]]):format(q, q, q) .. final
end
outbox._claim_sql = claim_sql

-- Rows named by a JSON list of ids, matched as id = ANY(ARRAY(...)): an
-- index probe per id whatever plan the statement caches (a join against
-- the function can become a scan of the table per id once it is analyzed).
local IDS = "SELECT value::uuid FROM jsonb_array_elements_text($1::jsonb)"

local function statements(q, notify)
  local wake, from = "", ""
  if notify then
    -- A CTE runs once, however many rows the INSERT returns.
    wake = ", wake AS MATERIALIZED (SELECT pg_notify(%s, ''))"
    from = ", wake"
  end
  return {
    save_one = notify
      and ("WITH ins AS (INSERT INTO %s (topic, key, payload, headers)"
        .. " VALUES ($1, $2, $3::jsonb, $4::jsonb) RETURNING id)%s SELECT ins.id FROM ins%s")
        :format(q, wake:format("$5"), from)
      or ("INSERT INTO %s (topic, key, payload, headers) VALUES ($1, $2, $3::jsonb, $4::jsonb)"
        .. " RETURNING id"):format(q),
    save_many = ("WITH ins AS (INSERT INTO %s (topic, key, payload, headers)"
      .. " SELECT m->>'t', m->>'k', NULLIF(m->'p', 'null'), m->'h'"
      .. " FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS x(m, n) ORDER BY n"
      .. " RETURNING id, seq)%s SELECT ins.id FROM ins%s ORDER BY ins.seq")
      :format(q, wake:format("$2"), from),
    claim = claim_sql(q, "SELECT id, topic, key, payload, headers, retries, created_at"
      .. " FROM claimed ORDER BY seq"),
    processed = ("UPDATE %s SET status = 'processed', processed_at = now()"
      .. " WHERE id = ANY(ARRAY(%s)) AND status <> 'processed'"):format(q, IDS),
    failed = ("UPDATE %s SET retries = retries + 1, last_error = $2,"
      .. " status = CASE WHEN retries + 1 >= $3 THEN 'failed' ELSE 'pending' END,"
      .. " visible_at = now() + make_interval(secs => least($4 * power(2, least(retries, 30)), $5))"
      .. " WHERE id = $1 AND status IN ('pending', 'processing') RETURNING status, retries")
      :format(q),
    extend = ("UPDATE %s SET visible_at = now() + make_interval(secs => $2)"
      .. " WHERE id = ANY(ARRAY(%s)) AND status = 'processing'"):format(q, IDS),
    delete_before = ("DELETE FROM %s WHERE id IN (SELECT id FROM %s WHERE status = 'processed'"
      .. " AND processed_at < to_timestamp($1) LIMIT $2 FOR UPDATE SKIP LOCKED)"):format(q, q),
    delete_older = ("DELETE FROM %s WHERE id IN (SELECT id FROM %s WHERE status = 'processed'"
      .. " AND processed_at < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED)")
      :format(q, q),
  }
end

-- ---- construction -----------------------------------------------------------------

local function check_channel(channel)
  if type(channel) ~= "string" or channel == "" or #channel > 63
    or store.text_problem(channel) then
    error(("%s: option channel must be a non-empty string of at most 63 bytes, got %s")
      :format(WHERE, tostring(channel)), 3)
  end
  return channel
end

-- pgcoord.outbox(db, { table = "outbox_messages", max_retries = 5,
--   visibility_timeout = 30, retry_delay = 1, retry_delay_max = 300,
--   notify = true, channel = <table name> })
function outbox.new(pool, opts)
  store.check_pool(WHERE, pool)
  opts = store.check_options(WHERE, opts, KNOWN)
  local name, quoted = store.table_name(WHERE, opts.table or "outbox_messages")
  local notify = opts.notify
  if notify == nil then notify = true end
  if type(notify) ~= "boolean" then
    error(("%s: option notify must be a boolean, got %s"):format(WHERE, type(notify)), 2)
  end
  local self = setmetatable({
    db = pool,
    name = name,
    quoted = quoted,
    notify = notify,
    channel = check_channel(opts.channel or name),
    max_retries = store.integer(WHERE, opts, "max_retries", 5, 1),
    visibility_timeout = store.number(WHERE, opts, "visibility_timeout", 30, 0),
    retry_delay = store.number(WHERE, opts, "retry_delay", 1, 0, true),
    retry_delay_max = store.number(WHERE, opts, "retry_delay_max", 300, 0, true),
    sql = statements(quoted, notify),
  }, Outbox)
  return self
end

store.table_methods(Outbox, ddl)

-- ---- saving -----------------------------------------------------------------------

local check_text = store.check_text

-- A message checked and encoded: { topic, key, payload (JSON or nil), headers (JSON) }.
local function check_message(msg, i)
  local where = ("ob:save: message %d"):format(i)
  if type(msg) ~= "table" then
    error(("%s must be a table { topic =, key =, payload =, headers = }, got %s")
      :format(where, type(msg)), 3)
  end
  for k in pairs(msg) do
    if not MESSAGE_FIELDS[k] then
      error(("%s: unknown field %q (the fields are topic, key, payload and headers)")
        :format(where, tostring(k)), 3)
    end
  end
  local topic = msg.topic
  if type(topic) ~= "string" or topic == "" then
    error(("%s: topic must be a non-empty string, got %s"):format(where, tostring(topic)), 3)
  end
  check_text(where, "topic", topic, 3)
  local key = msg.key
  if math.type(key) == "integer" then key = tostring(key) end
  if key ~= nil and type(key) ~= "string" then
    error(("%s: key must be a string or an integer, got %s"):format(where, type(key)), 3)
  end
  if key then check_text(where, "key", key, 3) end
  local headers = msg.headers
  if headers == nil or (type(headers) == "table" and next(headers) == nil) then
    headers = "{}"
  elseif type(headers) ~= "table" then
    error(("%s: headers must be a table of strings to strings, got %s")
      :format(where, type(headers)), 3)
  else
    for k, v in pairs(headers) do
      if type(k) ~= "string" or type(v) ~= "string" then
        error(("%s: headers must map strings to strings, got %s = %s (%s to %s)")
          :format(where, tostring(k), tostring(v), type(k), type(v)), 3)
      end
      check_text(where, ("header %q"):format(k), k, 3)
      check_text(where, ("header %q"):format(k), v, 3)
    end
    headers = json.encode(headers)
  end
  local payload = msg.payload
  if payload ~= nil then
    payload = store.encode(where, "payload", payload, 3)
    if payload == "null" then payload = nil end
  end
  return { topic = topic, key = key, payload = payload, headers = headers }
end

local function json_string(s)
  return s and json.encode(s) or "null"
end

-- ob:save(tx, msg, ...) writes the messages in tx's transaction (nil: a
-- transaction of its own) and returns their ids, in order.  Every message
-- is checked before anything is written.
function Outbox:save(conn, ...)
  local msgs = table.pack(...)
  if msgs.n == 0 then error("ob:save: no message given", 2) end
  if conn == nil then conn = self.db else store.check_conn("ob:save", conn) end
  local rows = {}
  for i = 1, msgs.n do rows[i] = check_message(msgs[i], i) end
  local sql = self.sql
  if msgs.n == 1 then
    local m = rows[1]
    local result
    if self.notify then
      result = conn:query(sql.save_one, m.topic, m.key, m.payload, m.headers, self.channel)
    else
      result = conn:query(sql.save_one, m.topic, m.key, m.payload, m.headers)
    end
    return result[1].id
  end
  local parts = {}
  for i, m in ipairs(rows) do
    parts[i] = ('{"t":%s,"k":%s,"p":%s,"h":%s}')
      :format(json.encode(m.topic), json_string(m.key), m.payload or "null", m.headers)
  end
  local list = "[" .. table.concat(parts, ",") .. "]"
  local result
  if self.notify then
    result = conn:query(sql.save_many, list, self.channel)
  else
    result = conn:query(sql.save_many, list)
  end
  local ids = {}
  for i, r in ipairs(result) do ids[i] = r.id end
  return table.unpack(ids, 1, #ids)
end

-- ---- the relay's primitives ---------------------------------------------------------

-- Claims up to limit messages: { id, topic, key, payload, headers, retries,
-- created_at } in creation order, now in processing.
function Outbox:fetch_pending(limit)
  if limit == nil then limit = 100 end
  if math.type(limit) ~= "integer" or limit < 1 then
    error(("ob:fetch_pending: limit must be a positive integer, got %s"):format(tostring(limit)), 2)
  end
  local rows = self.db:query(self.sql.claim, limit, self.visibility_timeout)
  rows.affected = nil
  return rows
end

-- ids from (id, ...) or ({ id, ... }), checked.
local function id_list(where, ...)
  local ids = ...
  if type(ids) ~= "table" then ids = table.pack(...) end
  local n = ids.n or #ids
  local out = {}
  for i = 1, n do
    local id = ids[i]
    if type(id) ~= "string" or not id:match(UUID) then
      error(("%s: id %d is not a message id (a UUID string), got %s")
        :format(where, i, tostring(id)), 3)
    end
    out[i] = id
  end
  return out
end

-- Marks messages processed; returns how many changed.
function Outbox:mark_processed(...)
  local ids = id_list("ob:mark_processed", ...)
  if #ids == 0 then return 0 end
  return self.db:exec(self.sql.processed, ids)
end

-- Records a failed attempt: pending again after the retry delay, or
-- failed once max_retries attempts have failed.  Returns the new status
-- ("pending" or "failed") and retries, or nil when the message is not
-- pending or processing.
function Outbox:mark_failed(id, err)
  id = id_list("ob:mark_failed", id)[1]
  local text = store.clean_text(err == nil and "failed" or tostring(err), MAX_ERROR_TEXT)
  local row = self.db:one(self.sql.failed, id, text, self.max_retries, self.retry_delay,
    self.retry_delay_max)
  if not row then return nil end
  return row.status, row.retries
end

-- Keeps claimed messages in processing for another visibility_timeout.
function Outbox:_extend(ids)
  if #ids == 0 then return 0 end
  return self.db:exec(self.sql.extend, ids, self.visibility_timeout)
end

local function check_time(where, t)
  if type(t) ~= "number" or t ~= t then
    error(("%s: time must be epoch seconds (a number), got %s"):format(where, tostring(t)), 3)
  end
end

-- Deletes processed messages processed before t (epoch seconds); returns
-- how many.
function Outbox:delete_processed_before(t)
  check_time("ob:delete_processed_before", t)
  return store.delete_chunked(self.db, self.sql.delete_before, t)
end

-- Deletes processed messages older than `age` seconds by the server's clock.
function Outbox:_delete_processed_older_than(age)
  return store.delete_chunked(self.db, self.sql.delete_older, age)
end

-- ---- ready-made publishers --------------------------------------------------------------

-- What the ready-made publishers send: the message with its id, so that
-- consumers can use the processed-messages store.
local function envelope(msg)
  return { id = msg.id, topic = msg.topic, key = msg.key, payload = msg.payload,
           headers = msg.headers, created_at = msg.created_at }
end

local function publisher_options(self, where, opts)
  opts = store.check_options(where, opts, PUBLISHER_KNOWN, 3)
  local target = opts.db or self.db
  store.check_conn(where, target, 3)
  local prefix = opts.prefix or ""
  if type(prefix) ~= "string" then
    error(("%s: option prefix must be a string, got %s"):format(where, type(prefix)), 3)
  end
  return target, prefix, opts
end

-- A publish_fn that NOTIFYs channel prefix .. msg.topic with the message
-- (JSON: id, topic, key, payload, headers, created_at).
function Outbox:notify_publisher(opts)
  local target, prefix = publisher_options(self, "ob:notify_publisher", opts)
  local publish = require("pgcoord").publish
  return function(msg)
    publish(target, prefix .. msg.topic, envelope(msg))
    return true
  end
end

-- A publish_fn that publishes the message (as notify_publisher's) to the
-- pgcoord queue named prefix .. msg.topic.
function Outbox:queue_publisher(opts)
  local target, prefix, o = publisher_options(self, "ob:queue_publisher", opts)
  local queue_options = o.queue_options
  if queue_options ~= nil and type(queue_options) ~= "table" then
    error(("ob:queue_publisher: option queue_options must be a table, got %s")
      :format(type(queue_options)), 2)
  end
  local ok, queue = pcall(require, "pgcoord.queue")
  if not ok then
    error(("ob:queue_publisher: pgcoord.queue is not available: %s"):format(tostring(queue)), 2)
  end
  local queues = {}
  return function(msg)
    local name = prefix .. msg.topic
    local q = queues[name]
    if not q then
      q = queue.new(target, name, queue_options)
      queues[name] = q
    end
    q:publish(target, envelope(msg))
    return true
  end
end

-- ---- the relay --------------------------------------------------------------------------

local error_text = task.error_text

-- ob:relay(publish_fn, { poll_interval = 1, batch_size = 100, retention = 0,
--   cleanup_interval = 3600, listen = ob.notify, subscriber = sub })
-- publish_fn(msg) publishes one message; it may wait (yield).  Returning
-- false (with an optional reason) or raising marks the attempt failed.
function Outbox:relay(publish, opts)
  if type(publish) ~= "function" then
    error(("ob:relay: publish_fn must be a function, got %s"):format(type(publish)), 2)
  end
  local where = "ob:relay"
  opts = store.check_options(where, opts, RELAY_KNOWN)
  local listen = opts.listen
  if listen == nil then listen = self.notify end
  if type(listen) ~= "boolean" then
    error(("ob:relay: option listen must be a boolean, got %s"):format(type(listen)), 2)
  end
  local sub = opts.subscriber
  if sub ~= nil and (type(sub) ~= "table" or type(sub.add) ~= "function"
    or type(sub.fans) ~= "table") then
    error("ob:relay: option subscriber must be a subscriber from pgcoord.subscriber", 2)
  end
  local r = setmetatable({
    outbox = self,
    publish = publish,
    poll_interval = store.number(where, opts, "poll_interval", 1, 0),
    batch_size = store.integer(where, opts, "batch_size", 100, 1),
    retention = store.number(where, opts, "retention", 0),
    cleanup_interval = store.number(where, opts, "cleanup_interval", 3600, 0),
    stopped = false,
    wake = task.cond(),
    counters = { published = 0, failed = 0, gave_up = 0, batches = 0, fetch_errors = 0 },
  }, Relay)
  local pgcoord = require "pgcoord"
  if listen then
    if not sub then
      sub = pgcoord.subscriber(self.db)
      r.own_subscriber = true
    end
    r.unhook = sub:hook_reconnect(function() r:poke() end)
    local fan = sub:channel(self.channel)
    r.subscriber, r.fan = sub, fan
    r.listener = fan:listen({ buffer = 1 }) -- a wake-up flag: more would add nothing
    sub:start()
  end
  r.cleanup = store.cleanup_loop(r.retention, r.cleanup_interval, function()
    return self:_delete_processed_older_than(r.retention)
  end, { table = self.name, what = "outbox" })
  r.task = task.spawn(Relay._loop, r)
  pgcoord.on_stop(function() r:stop() end)
  log.info("outbox relay started", { table = self.name, batch_size = r.batch_size,
    poll_interval = r.poll_interval, listen = listen and self.channel or false })
  return r
end

-- Waits up to timeout seconds for a notification, a poke or a stop; true
-- unless the wait timed out.
function Relay:_wait(timeout)
  if self.stopped then return true end
  local l = self.listener
  if not l then
    if self.poked then
      self.poked = false
      return true
    end
    local woken = self.wake:wait(timeout) ~= nil
    self.poked = false
    return woken
  end
  local got = l:receive(timeout)
  while l:_pop() ~= nil do end -- notifications that came meanwhile say the same
  return got ~= nil
end

-- Makes the relay look for messages now (or once its batch is done).
function Relay:poke()
  if self.listener and not self.listener.closed then
    self.listener:_offer(true)
  else
    self.poked = true
    self.wake:signal()
  end
end

function Relay:_loop()
  local failures = 0
  local notified = true
  while not self.stopped do
    local ok, batch = pcall(self.outbox.fetch_pending, self.outbox, self.batch_size)
    if ok then
      failures = 0
      if #batch > 0 then
        if not notified and self.fan then self.fan:polled(#batch) end
        self:_publish_batch(batch)
      end
      notified = true
      if #batch < self.batch_size then notified = self:_wait(self.poll_interval) end
    elseif task.is_cancelled(batch) then
      error(batch, 0)
    else
      failures = failures + 1
      self.counters.fetch_errors = self.counters.fetch_errors + 1
      local delay = math.min(30, 0.1 * 2 ^ (failures - 1))
      log.error("outbox relay cannot fetch messages", { table = self.outbox.name,
        error = error_text(batch), retry_in = ("%.1f"):format(delay) })
      self:_wait(delay)
    end
  end
end

function Relay:_failed(msg, text, trace)
  self.counters.failed = self.counters.failed + 1
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
  elseif task.is_cancelled(err) then
    error(err, 0)
  else
    log.error("outbox relay cannot mark messages processed; they will be published again",
      { table = self.outbox.name, messages = #ids, error = error_text(err) })
  end
end

-- Publishes every message of the batch (a stop waits for this), then
-- marks those published.  A batch that outlasts half the visibility
-- timeout has its finished part marked and the rest of its claim extended.
function Relay:_publish_batch(batch)
  self.counters.batches = self.counters.batches + 1
  local ob = self.outbox
  local done = {}
  local claimed = core.now()
  local half = ob.visibility_timeout / 2
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
      local rest = {}
      for j = i + 1, n do rest[#rest + 1] = batch[j].id end
      local eok, err = pcall(ob._extend, ob, rest)
      if not eok then
        if task.is_cancelled(err) then error(err, 0) end
        log.warn("outbox relay cannot extend its claim", { table = ob.name,
          error = error_text(err) })
      end
      claimed = core.now()
    end
  end
  self:_mark(done)
end

-- Stops the relay: the batch in hand is published and marked first.
-- Waits for that (unless called from the relay's own publish_fn).
function Relay:stop()
  if not self.stopped then
    self.stopped = true
    if self.listener then self.listener:close() end
    self.wake:signal()
  end
  local t = self.task
  if t and t ~= task.current() then pcall(t.join, t) end
  if self.cleanup then self.cleanup:stop() end
  if self.unhook then
    self.unhook()
    self.unhook = nil
  end
  if self.own_subscriber and self.subscriber then
    self.subscriber:stop()
    self.subscriber = nil
  end
  if not self.logged_stop and (t == nil or t:status() ~= "running") then
    self.logged_stop = true
    local c = self.counters
    log.info("outbox relay stopped", { table = self.outbox.name, published = c.published,
      failed = c.failed })
  end
end

function Relay:running()
  return not self.stopped
end

function Relay:stats()
  local c = self.counters
  return { running = not self.stopped, published = c.published, failed = c.failed,
           gave_up = c.gave_up, batches = c.batches, fetch_errors = c.fetch_errors,
           cleaned = self.cleanup and self.cleanup.deleted or 0,
           listening = self.subscriber ~= nil and self.subscriber:connected() }
end

return outbox

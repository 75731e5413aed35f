-- The transactional outbox: a service writes a domain change and the
-- messages announcing it in one transaction; a relay (outbox/relay.lua)
-- hands pending messages to a publisher function until each is published.
--
-- A message is pending until a relay claims it (FOR UPDATE SKIP LOCKED,
-- so concurrent relays never take the same one) and marks it processing
-- with visible_at = now() + visibility_timeout.  Published, it becomes
-- processed; refused, it goes back to pending after a growing retry delay,
-- or to failed once its max_retries retries have failed too.  A relay that dies
-- leaves its batch in processing: past visible_at, any relay claims it
-- again.  Delivery is therefore at least once; consumers get exactly-once
-- effects with the processed-messages store (outbox/processed.lua).
--
-- A save sends a NOTIFY on the outbox's channel in the same transaction,
-- so relays wake at commit; they also poll every poll_interval.
--
-- The folder: init.lua (this object), sql.lua (the statements),
-- relay.lua, publishers.lua, processed.lua.
local json = require "pgcoord.json"
local options = require "pgcoord.options"
local retry = require "pgcoord.retry"
local tables = require "pgcoord.tables"
local sql = require "pgcoord.outbox.sql"
local relay = require "pgcoord.outbox.relay"
local publishers = require "pgcoord.outbox.publishers"

local outbox = {}

local Outbox = {}
Outbox.__index = Outbox

local MAX_ERROR_TEXT = 4000
local MAX_CHANNEL = 63
local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"
local MESSAGE_FIELDS = { topic = true, key = true, payload = true, headers = true }

local function channel_problem(channel)
  if #channel > MAX_CHANNEL or json.text_problem(channel) then
    return "must be a non-empty string of at most 63 bytes, valid UTF-8 without NUL"
  end
  return nil
end

local check_options = options.spec("pgcoord.outbox", {
  table = tables.option("outbox_messages"),
  -- max_retries counts retries, as a job's retry.max does: 0 fails a
  -- message at its first failed attempt, 5 at its sixth
  max_retries = { "integer", default = 5, min = 0, max = 2147483647 },
  visibility_timeout = { "number", default = 30, above = 0 },
  retry_delay = { "number", default = 1, min = 0 },
  retry_delay_max = { "number", default = 300, min = 0 },
  notify = { "boolean", default = true },
  channel = { "string", check = channel_problem },
})

-- The retry delay after the 1st, 2nd, ... failed attempt, as JSON for the
-- statement `failed`: pgcoord.retry's rule, listed until it reaches its
-- cap, or 64 entries (the statement takes the last one after that).
local function retry_delays(delay, cap, max_retries)
  local list = json.array()
  for n = 1, math.max(1, math.min(max_retries, 64)) do
    list[n] = retry.exponential(delay, cap, n)
    if list[n] >= cap or list[n] == 0 then break end
  end
  return json.encode(list)
end

-- pgcoord.outbox(db, { table = "outbox_messages", max_retries = 5,
--   visibility_timeout = 30, retry_delay = 1, retry_delay_max = 300,
--   notify = true, channel = <table name> })
function outbox.new(pool, opts)
  options.pool("pgcoord.outbox", pool)
  local o = check_options(opts)
  local quoted = tables.quote(o.table)
  return setmetatable({
    db = pool,
    name = o.table,
    quoted = quoted,
    notify = o.notify,
    channel = o.channel or sql.default_channel(o.table),
    max_retries = o.max_retries,
    visibility_timeout = o.visibility_timeout,
    retry_delays = retry_delays(o.retry_delay, o.retry_delay_max, o.max_retries),
    sql = sql.outbox(quoted, o.notify),
  }, Outbox)
end

function Outbox:create_table_sql()
  return tables.script(sql.outbox_ddl(self.quoted, self.name))
end

-- Creates the table unless it exists; true when it did.  A table made by
-- an earlier release gets the indexes added since.
function Outbox:migrate()
  if tables.create(self.db, self.name, self.quoted, sql.outbox_ddl(self.quoted, self.name)) then
    return true
  end
  tables.add_indexes(self.db, self.name, self.quoted,
    sql.outbox_added_indexes(self.quoted, self.name))
  return false
end

-- ---- saving -----------------------------------------------------------------------

local check_text = json.check_text

local function check_headers(where, headers)
  if headers == nil or (type(headers) == "table" and next(headers) == nil) then return "{}" end
  if type(headers) ~= "table" then
    options.raise("%s: headers must be a table of strings to strings, got %s", where,
      type(headers))
  end
  for k, v in pairs(headers) do
    if type(k) ~= "string" or type(v) ~= "string" then
      options.raise("%s: headers must map strings to strings, got %s = %s (%s to %s)", where,
        tostring(k), tostring(v), type(k), type(v))
    end
    check_text(where, ("header %q"):format(k), k)
    check_text(where, ("header %q"):format(k), v)
  end
  return json.encode(headers)
end

-- A message checked and encoded: { topic, key, payload (JSON or nil), headers (JSON) }.
local function check_message(msg, i)
  local where = ("ob:save: message %d"):format(i)
  if type(msg) ~= "table" then
    options.raise("%s must be a table { topic =, key =, payload =, headers = }, got %s", where,
      type(msg))
  end
  for k in pairs(msg) do
    if not MESSAGE_FIELDS[k] then
      options.raise("%s: unknown field %q (the fields are topic, key, payload and headers)",
        where, tostring(k))
    end
  end
  local topic = msg.topic
  if type(topic) ~= "string" or topic == "" then
    options.raise("%s: topic must be a non-empty string, got %s", where, tostring(topic))
  end
  check_text(where, "topic", topic)
  local key = msg.key
  if math.type(key) == "integer" then key = tostring(key) end
  if key ~= nil and type(key) ~= "string" then
    options.raise("%s: key must be a string or an integer, got %s", where, type(key))
  end
  if key then check_text(where, "key", key) end
  local headers = check_headers(where, msg.headers)
  local payload = msg.payload
  if payload ~= nil then
    payload = json.encode_jsonb(where, "payload", payload)
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
  local n = select("#", ...)
  if n == 0 then options.raise("ob:save: no message given") end
  if conn == nil then conn = self.db else options.conn("ob:save", conn) end
  local rows = {}
  for i = 1, n do rows[i] = check_message((select(i, ...)), i) end
  local statements = self.sql
  if n == 1 then
    local m = rows[1]
    local result
    if self.notify then
      result = conn:query(statements.save_one, m.topic, m.key, m.payload, m.headers, self.channel)
    else
      result = conn:query(statements.save_one, m.topic, m.key, m.payload, m.headers)
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
    result = conn:query(statements.save_many, list, self.channel)
  else
    result = conn:query(statements.save_many, list)
  end
  local ids = {}
  for i, r in ipairs(result) do ids[i] = r.id end
  return table.unpack(ids, 1, #ids)
end

-- ---- claiming and marking -----------------------------------------------------------

-- Claims up to limit messages: { id, topic, key, payload, headers, retries,
-- created_at } in creation order, now in processing.
function Outbox:fetch_pending(limit)
  if limit == nil then limit = 100 end
  if math.type(limit) ~= "integer" or limit < 1 then
    options.raise("ob:fetch_pending: limit must be a positive integer, got %s", tostring(limit))
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
      options.raise("%s: id %d is not a message id (a UUID string), got %s", where, i,
        tostring(id))
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
-- failed when it was the last retry (attempt max_retries + 1).  Returns the new status
-- ("pending" or "failed") and retries, or nil when the message is not
-- pending or processing.
function Outbox:mark_failed(id, err)
  id = id_list("ob:mark_failed", id)[1]
  local text = json.clean_text(err == nil and "failed" or tostring(err), MAX_ERROR_TEXT)
  local row = self.db:one(self.sql.failed, id, text, self.max_retries, self.retry_delays)
  if not row then return nil end
  return row.status, row.retries
end

-- Messages whose retries ran out, oldest first (at most opts.limit, 100):
-- { id, topic, key, payload, headers, retries, last_error, created_at }.
local check_failed = options.spec("ob:failed", {
  limit = { "integer", default = 100, min = 1, max = 100000 },
})

function Outbox:failed(opts)
  local o = check_failed(opts)
  local rows = self.db:query(self.sql.failed_list, o.limit)
  rows.affected = nil
  return rows
end

-- Failed messages (id, ... or { id, ... }) back to pending with a fresh
-- retry count, relays woken; returns how many were failed and now are not.
function Outbox:retry(...)
  local ids = id_list("ob:retry", ...)
  if #ids == 0 then return 0 end
  return self.db:one(self.sql.retry_failed, ids, self.notify and self.channel or nil).retried
end

-- Keeps claimed messages (a list of ids) in processing for another
-- visibility_timeout; returns how many.  (For relays with long batches.)
function Outbox:extend(ids)
  if #ids == 0 then return 0 end
  return self.db:exec(self.sql.extend, ids, self.visibility_timeout)
end

local function check_time(where, t)
  if type(t) ~= "number" or t ~= t then
    options.raise("%s: time must be epoch seconds (a number), got %s", where, tostring(t))
  end
end

local function check_age(where, age)
  if type(age) ~= "number" or age ~= age then
    options.raise("%s: age must be a number of seconds, got %s", where, tostring(age))
  end
end

-- Deletes processed messages processed before t (epoch seconds); returns
-- how many.
function Outbox:delete_processed_before(t)
  check_time("ob:delete_processed_before", t)
  return tables.delete_chunked(self.db, self.sql.delete_before, t)
end

-- Deletes processed messages older than `age` seconds by the server's
-- clock (the relay's retention); returns how many.
function Outbox:delete_processed_older_than(age)
  check_age("ob:delete_processed_older_than", age)
  return tables.delete_chunked(self.db, self.sql.delete_older, age)
end

-- ---- publishers and relays ------------------------------------------------------------

-- A publish_fn that NOTIFYs channel prefix .. msg.topic with the message.
function Outbox:notify_publisher(opts)
  return publishers.notify(self, opts)
end

-- A publish_fn that publishes to the pgcoord queue named prefix .. msg.topic.
function Outbox:queue_publisher(opts)
  return publishers.queue(self, opts)
end

-- ob:relay(publish_fn, opts): see outbox/relay.lua.
function Outbox:relay(publish, opts)
  return relay.new(self, publish, opts)
end

return outbox

-- The processed-messages store: at-least-once delivery with exactly-once
-- effects.  A consumer marks (group, message id) in the same transaction
-- as the effect of the message; the mark is new the first time only, so a
-- redelivered message is recognised and skipped:
--
--   db:tx(function(tx)
--     if not done:mark(tx, "billing", msg.id) then return end -- seen before
--     tx:exec("UPDATE accounts SET ...")                       -- the effect
--   end)
--
-- Marks of the same message racing in two transactions are absorbed by
-- ON CONFLICT DO NOTHING: the second waits for the first and, once it
-- commits, finds the mark there; if it rolls back, the second one wins.
local json = require "pgcoord.json"
local store = require "pgcoord.store"

local processed = {}

local Processed = {}
Processed.__index = Processed

local WHERE = "pgcoord.processed"
local KNOWN = { table = true }
local CLEANUP_KNOWN = { retention = true, interval = true }
local DEFAULT_RETENTION = 7 * 24 * 3600

local function ddl(q)
  return {
    ([[CREATE TABLE %s (
  consumer_group text NOT NULL,
  message_id text NOT NULL,
  processed_at timestamptz NOT NULL DEFAULT now(),
  metadata jsonb,
  PRIMARY KEY (consumer_group, message_id)
)]]):format(q),
    ("CREATE INDEX ON %s (processed_at)"):format(q),
  }
end

local function statements(q)
  local purge = "DELETE FROM %s WHERE (consumer_group, message_id) IN"
    .. " (SELECT consumer_group, message_id FROM %s WHERE processed_at < %s"
    .. " LIMIT %s FOR UPDATE SKIP LOCKED)"
  return {
    mark = ("INSERT INTO %s (consumer_group, message_id, metadata) VALUES ($1, $2, $3::jsonb)"
      .. " ON CONFLICT DO NOTHING"):format(q),
    is_processed = ("SELECT EXISTS (SELECT 1 FROM %s WHERE consumer_group = $1"
      .. " AND message_id = $2) AS found"):format(q),
    purge_before = purge:format(q, q, "to_timestamp($1)", "$2"),
    purge_older = purge:format(q, q, "now() - make_interval(secs => $1)", "$2"),
  }
end

-- pgcoord.processed(db, { table = "processed_messages" })
function processed.new(pool, opts)
  store.check_pool(WHERE, pool)
  opts = store.check_options(WHERE, opts, KNOWN)
  local name, quoted = store.table_name(WHERE, opts.table or "processed_messages")
  return setmetatable({ db = pool, name = name, quoted = quoted, sql = statements(quoted) },
    Processed)
end

store.table_methods(Processed, ddl)

-- ---- arguments --------------------------------------------------------------------

local function connection(self, where, conn)
  if conn == nil then return self.db end
  store.check_conn(where, conn, 3)
  return conn
end

local function check_key(where, group, id)
  if type(group) ~= "string" or group == "" then
    error(("%s: group must be a non-empty string, got %s"):format(where, tostring(group)), 3)
  end
  if math.type(id) == "integer" then id = tostring(id) end
  if type(id) ~= "string" or id == "" then
    error(("%s: id must be a non-empty string or an integer, got %s")
      :format(where, tostring(id)), 3)
  end
  store.check_text(where, "group", group, 3)
  store.check_text(where, "id", id, 3)
  return group, id
end

-- metadata as JSON text for the jsonb column (nil for NULL).
local function encode_metadata(where, metadata)
  if metadata == nil or metadata == json.null then return nil end
  if type(metadata) == "string" then
    local problem = store.json_problem(metadata)
    if problem then
      error(("%s: metadata is a string, so it must be JSON text, and it is not: %s")
        :format(where, problem), 3)
    end
    return metadata
  end
  local tm = type(metadata)
  if tm ~= "table" and tm ~= "number" and tm ~= "boolean" then
    error(("%s: metadata must be a table, a JSON string, a number or a boolean, got %s")
      :format(where, tm), 3)
  end
  return store.encode(where, "metadata", metadata, 3)
end

-- ---- the store ----------------------------------------------------------------------

-- Records that group has processed message id, in tx's transaction (nil:
-- a transaction of its own).  True the first time, false after.
function Processed:mark(tx, group, id, metadata)
  local where = "done:mark"
  local conn = connection(self, where, tx)
  group, id = check_key(where, group, id)
  local meta = encode_metadata(where, metadata)
  return conn:exec(self.sql.mark, group, id, meta) == 1
end

-- True when group has processed message id.
function Processed:is_processed(conn, group, id)
  local where = "done:is_processed"
  conn = connection(self, where, conn)
  group, id = check_key(where, group, id)
  return conn:one(self.sql.is_processed, group, id).found
end

-- Deletes the marks made before t (epoch seconds): done:purge_before(db, t)
-- or done:purge_before(t).  Returns how many.
function Processed:purge_before(conn, t)
  if t == nil and type(conn) == "number" then conn, t = nil, conn end
  conn = connection(self, "done:purge_before", conn)
  if type(t) ~= "number" or t ~= t then
    error(("done:purge_before: time must be epoch seconds (a number), got %s")
      :format(tostring(t)), 2)
  end
  return store.delete_chunked(conn, self.sql.purge_before, t)
end

-- Deletes the marks older than age seconds by the server's clock.
function Processed:_purge_older_than(age)
  return store.delete_chunked(self.db, self.sql.purge_older, age)
end

-- Deletes marks older than retention seconds (default 7 days) now and
-- every interval seconds (default 3600) until handle:stop() or pgcoord
-- stops.  A retention that is not positive disables it (and says so in
-- the log).  Keep marks longer than a message can be redelivered.
function Processed:start_cleanup(opts)
  local where = "done:start_cleanup"
  opts = store.check_options(where, opts, CLEANUP_KNOWN)
  local retention = store.number(where, opts, "retention", DEFAULT_RETENTION)
  local interval = store.number(where, opts, "interval", 3600, 0)
  return store.cleanup_loop(retention, interval, function()
    return self:_purge_older_than(retention)
  end, { table = self.name, what = "processed messages" })
end

return processed

-- The processed-messages store (pgcoord.processed): at-least-once
-- delivery with exactly-once effects.  A consumer marks (group, message
-- id) in the same transaction as the effect of the message; the mark is
-- new the first time only, so a redelivered message is recognised and
-- skipped:
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
local options = require "pgcoord.options"
local tables = require "pgcoord.tables"
local sql = require "pgcoord.outbox.sql"

local processed = {}

local Processed = {}
Processed.__index = Processed

local DEFAULT_RETENTION = 7 * 24 * 3600

local check_options = options.spec("pgcoord.processed", {
  table = tables.option("processed_messages"),
})

local check_cleanup = options.spec("done:start_cleanup", {
  retention = { "number", default = DEFAULT_RETENTION },
  interval = { "number", default = 3600, above = 0 },
})

-- pgcoord.processed(db, { table = "processed_messages" })
function processed.new(pool, opts)
  options.pool("pgcoord.processed", pool)
  local o = check_options(opts)
  local quoted = tables.quote(o.table)
  return setmetatable({ db = pool, name = o.table, quoted = quoted, sql = sql.processed(quoted) },
    Processed)
end

function Processed:create_table_sql()
  return tables.script(sql.processed_ddl(self.quoted))
end

-- Creates the table unless it exists; true when it did.
function Processed:migrate()
  return tables.create(self.db, self.name, self.quoted, sql.processed_ddl(self.quoted))
end

-- ---- arguments --------------------------------------------------------------------

local function connection(self, where, conn)
  if conn == nil then return self.db end
  return options.conn(where, conn)
end

local function check_key(where, group, id)
  if type(group) ~= "string" or group == "" then
    options.raise("%s: group must be a non-empty string, got %s", where, tostring(group))
  end
  if math.type(id) == "integer" then id = tostring(id) end
  if type(id) ~= "string" or id == "" then
    options.raise("%s: id must be a non-empty string or an integer, got %s", where, tostring(id))
  end
  json.check_text(where, "group", group)
  json.check_text(where, "id", id)
  return group, id
end

-- metadata as JSON text for the jsonb column (nil for NULL).
local function encode_metadata(where, metadata)
  if metadata == nil or metadata == json.null then return nil end
  if type(metadata) == "string" then
    local problem = json.problem(metadata)
    if problem then
      options.raise("%s: metadata is a string, so it must be JSON text, and it is not: %s",
        where, problem)
    end
    return metadata
  end
  local tm = type(metadata)
  if tm ~= "table" and tm ~= "number" and tm ~= "boolean" then
    options.raise("%s: metadata must be a table, a JSON string, a number or a boolean, got %s",
      where, tm)
  end
  return json.encode_jsonb(where, "metadata", metadata)
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
    options.raise("done:purge_before: time must be epoch seconds (a number), got %s",
      tostring(t))
  end
  return tables.delete_chunked(conn, self.sql.purge_before, t)
end

-- Deletes the marks older than age seconds by the server's clock; returns
-- how many.
function Processed:purge_older_than(age)
  if type(age) ~= "number" or age ~= age then
    options.raise("done:purge_older_than: age must be a number of seconds, got %s", tostring(age))
  end
  return tables.delete_chunked(self.db, self.sql.purge_older, age)
end

-- Deletes marks older than retention seconds (default 7 days) now and
-- every interval seconds (default 3600) until handle:stop([timeout]) or
-- pgcoord stops.  A retention that is not positive disables it (and says
-- so in the log).  Keep marks longer than a message can be redelivered.
function Processed:start_cleanup(opts)
  local o = check_cleanup(opts)
  return tables.cleanup(o.retention, o.interval, function()
    return self:purge_older_than(o.retention)
  end, { table = self.name, what = "processed messages" })
end

return processed

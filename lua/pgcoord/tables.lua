-- Tables that a primitive creates under a name from its options (the
-- outbox, the processed-messages store): the name's checks and quoting,
-- creating the table once, deleting in chunks, and the retention cleanup
-- service.  Internal: not part of the public API.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local json = require "pgcoord.json"
local options = require "pgcoord.options"
local lifecycle = require "pgcoord.lifecycle"

local tables = {}

-- PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
local MAX_IDENT = 63

-- pg_advisory_xact_lock key shared with pgcoord.migrate: all of pgcoord's
-- DDL is serialised by one lock.
local LOCK_KEY = 0x7067636f6f7264

-- Rows a retention DELETE removes per statement: short transactions, and
-- no long lock on a table that is written to meanwhile.
local DELETE_CHUNK = 5000

-- ---- names ----------------------------------------------------------------------

-- Why name (a string) cannot name the table, or nil: for an option rule's
-- check (options.spec).
function tables.name_problem(name)
  if #name > MAX_IDENT then
    return ("is %d bytes; PostgreSQL names take at most %d"):format(#name, MAX_IDENT)
  end
  if name:find(".", 1, true) then
    return "contains a dot: give an unqualified name, the schema comes from the"
      .. " connection's search_path"
  end
  return json.text_problem(name)
end

-- The option rule of a table name.
function tables.option(default)
  return { "string", default = default, check = tables.name_problem }
end

-- name double quoted, for SQL text.
function tables.quote(name)
  return '"' .. name:gsub('"', '""') .. '"'
end

-- name quoted, once checked as where's option table.
function tables.checked(where, name)
  return tables.quote(options.check(where, "table", tables.option(), name))
end

-- ---- creating ---------------------------------------------------------------------

-- The statements as one script, each ended by a semicolon.
function tables.script(statements)
  local parts = {}
  for i, sql in ipairs(statements) do parts[i] = sql .. ";\n" end
  return table.concat(parts)
end

-- Creates the table unless to_regclass finds it (then nothing else is
-- done); statements run in one transaction under pgcoord's DDL lock.
-- Returns true when it created the table.
function tables.create(pool, name, quoted, statements)
  local function present(conn)
    return conn:one("SELECT to_regclass($1) IS NOT NULL AS present", quoted).present
  end
  if present(pool) then return false end
  return pool:tx(function(tx)
    tx:query("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
    if present(tx) then return false end
    for _, sql in ipairs(statements) do tx:exec(sql) end
    log.info("table created", { table = name })
    return true
  end)
end

-- Adds each of indexes ({ name =, ddl = its CREATE INDEX }) that the
-- table's schema has no relation of that name for, under the DDL lock.
-- (Looked up in the catalog without locking the table; a build blocks
-- writes to the table while it reads it.)
function tables.add_indexes(pool, name, quoted, indexes)
  local function present(conn, index)
    return conn:one([[SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = $2
        AND relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = $1::regclass))
        AS present]], quoted, index.name).present
  end
  local missing = {}
  for _, index in ipairs(indexes) do
    if not present(pool, index) then missing[#missing + 1] = index end
  end
  if #missing == 0 then return end
  pool:tx(function(tx)
    tx:query("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
    for _, index in ipairs(missing) do
      if not present(tx, index) then
        tx:exec(index.ddl)
        log.info("index added", { table = name, index = index.name })
      end
    end
  end)
end

-- ---- deleting -----------------------------------------------------------------------

-- Runs a DELETE whose LIMIT is its last parameter until it deletes fewer
-- rows than the limit; returns the total.
function tables.delete_chunked(conn, sql, ...)
  local args = table.pack(...)
  args.n = args.n + 1
  args[args.n] = DELETE_CHUNK
  local total = 0
  while true do
    local n = conn:exec(sql, table.unpack(args, 1, args.n))
    total = total + n
    if n < DELETE_CHUNK then return total end
  end
end

-- ---- the retention cleanup ----------------------------------------------------------

-- A service: state is "running", then "stopping" and "stopped" (at once
-- "stopped" when disabled); task, its loop.
local Cleanup = {}
Cleanup.__index = Cleanup

local function with(fields, extra)
  local t = {}
  for k, v in pairs(fields) do t[k] = v end
  for k, v in pairs(extra) do t[k] = v end
  return t
end

function Cleanup:_loop()
  local _ <close> = setmetatable({}, { __close = function() self.state = "stopped" end })
  while self.state == "running" do
    local t0 = core.now()
    local ok, n = pcall(self.purge)
    if ok then
      self.runs = self.runs + 1
      self.deleted = self.deleted + n
      if n > 0 then
        log.info("retention cleanup", with(self.fields, { deleted = n, retention = self.retention,
          seconds = ("%.3f"):format(core.now() - t0) }))
      end
    elseif task.is_cancelled(n) then
      error(n, 0)
    else
      log.error("retention cleanup failed", with(self.fields, { error = task.error_text(n) }))
    end
    if self.state ~= "running" then break end
    self.wake:wait(self.interval)
  end
end

-- Calls purge() (which returns the number of rows deleted) now and every
-- interval seconds until stopped or pgcoord stops.  A retention that is
-- not positive disables it, which is logged.  fields go into log lines.
function tables.cleanup(retention, interval, purge, fields)
  local self = setmetatable({ state = "stopped", retention = retention, interval = interval,
                              purge = purge, fields = fields, wake = task.signal(),
                              runs = 0, deleted = 0 }, Cleanup)
  if retention <= 0 then
    log.info("retention cleanup disabled (retention is not positive)",
      with(fields, { retention = retention }))
    return self
  end
  self.state = "running"
  self.task = task.spawn(Cleanup._loop, self)
  self.unregister = lifecycle.on_stop(function() self:stop() end,
    ("%s retention cleanup %s"):format(fields.what or "", fields.table or fields.group or ""))
  return self
end

-- Ends the loop, letting a cleanup in progress finish: within timeout
-- seconds (nil: however long it takes), else it is cancelled.  Returns
-- true unless it had to be cancelled.
function Cleanup:stop(timeout)
  options.timeout("cleanup:stop", timeout)
  if self.state == "running" then
    self.state = "stopping"
    self.unregister()
    self.wake:notify()
  end
  local t = self.task
  local finished = true
  if t and t ~= task.current() then
    finished = t:wait(timeout)
    if not finished then t:cancel() end
    self.state = "stopped"
  end
  return finished
end

function Cleanup:running()
  return self.state == "running"
end

function Cleanup:stats()
  return { running = self:running(), runs = self.runs, deleted = self.deleted }
end

return tables

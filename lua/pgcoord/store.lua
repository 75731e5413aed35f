-- Helpers shared by the outbox and the processed-messages store: option
-- checks, table names, creating a table once, deleting in chunks and the
-- retention cleanup loop.  Internal: not part of the public API.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local json = require "pgcoord.json"
local log = require "pgcoord.log"

local store = {}

-- PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
local MAX_IDENT = 63

-- pg_advisory_xact_lock key shared with pgcoord.migrate: all of pgcoord's
-- DDL is serialised by one lock.
local LOCK_KEY = 0x7067636f6f7264

-- ---- options ------------------------------------------------------------------

-- Raises for a key of opts that is not in known; returns opts or {}.
function store.check_options(where, opts, known, level)
  level = (level or 2) + 1
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(("%s: options must be a table, got %s"):format(where, type(opts)), level)
  end
  for k in pairs(opts) do
    if not known[k] then
      error(("%s: unknown option %q"):format(where, tostring(k)), level)
    end
  end
  return opts
end

-- opts[name] as a number (default when absent); min: the lowest value
-- allowed, exclusive unless inclusive is true.
function store.number(where, opts, name, default, min, inclusive, level)
  local v = opts[name]
  if v == nil then return default end
  local ok = type(v) == "number" and v == v and v ~= math.huge
  if ok and min then ok = inclusive and v >= min or (not inclusive and v > min) end
  if not ok then
    local want = min and (inclusive and ">= " or "> ") .. tostring(min) or "finite"
    error(("%s: option %s must be a number %s, got %s"):format(where, name, want, tostring(v)),
      (level or 2) + 1)
  end
  return v
end

-- opts[name] as an integer >= min (default when absent).
function store.integer(where, opts, name, default, min, level)
  local v = opts[name]
  if v == nil then return default end
  if math.type(v) ~= "integer" or v < min then
    error(("%s: option %s must be an integer >= %d, got %s"):format(where, name, min, tostring(v)),
      (level or 2) + 1)
  end
  return v
end

-- Raises unless pool looks like a pool from pgcoord.connect.
function store.check_pool(where, pool, level)
  if type(pool) ~= "table" or type(pool.query) ~= "function" or type(pool.tx) ~= "function"
    or not pool.size then
    error(("%s: expected a pool from pgcoord.connect, got %s"):format(where, type(pool)),
      (level or 2) + 1)
  end
end

-- Raises unless conn is a pool or a transaction (something with :query).
function store.check_conn(where, conn, level)
  if type(conn) ~= "table" or type(conn.query) ~= "function" then
    error(("%s: expected a pool or a transaction, got %s"):format(where, type(conn)),
      (level or 2) + 1)
  end
end

-- ---- text -----------------------------------------------------------------------

-- Why s cannot be stored in a text column, or nil when it can.
function store.text_problem(s)
  if s:find("\0", 1, true) then return "contains a NUL byte" end
  if not utf8.len(s) then return "is not valid UTF-8" end
  return nil
end

-- Raises, naming what s is, unless s can be stored in a text column.
function store.check_text(where, what, s, level)
  local problem = store.text_problem(s)
  if problem then error(("%s: %s %s"):format(where, what, problem), (level or 2) + 1) end
  return s
end

-- s made storable in a text column: at most max bytes, no NUL, valid UTF-8.
function store.clean_text(s, max)
  s = tostring(s):gsub("%z", "\\0")
  if #s > max then s = s:sub(1, max) end
  local out, i = {}, 1
  while true do
    local ok, bad = utf8.len(s, i)
    if ok then
      out[#out + 1] = s:sub(i)
      break
    end
    out[#out + 1] = s:sub(i, bad - 1)
    out[#out + 1] = "?"
    i = bad + 1
  end
  return table.concat(out)
end

-- Why the JSON text s cannot be stored as jsonb, or nil when it can.  Our
-- encoder writes NUL as \u0000, which jsonb refuses, and copies strings
-- byte for byte, so invalid UTF-8 would reach the server.
function store.jsonb_problem(s)
  if not utf8.len(s) then return "contains a string that is not valid UTF-8" end
  for slashes in s:gmatch("(\\+)u0000") do
    if #slashes % 2 == 1 then return "contains a NUL character (\\u0000), which jsonb refuses" end
  end
  return nil
end

-- ---- JSON text ------------------------------------------------------------------

-- A strict JSON validator (RFC 8259, plus what jsonb refuses: \u0000 and
-- unpaired surrogates), so that bad JSON text is refused before the
-- server sees it and aborts the caller's transaction.
local MAX_DEPTH = 1000
local ESCAPES = '"\\/bfnrt'

local function skip_ws(s, i)
  return s:find("[^ \t\n\r]", i) or #s + 1
end

local function string_end(s, i) -- s:byte(i) is '"'
  i = i + 1
  while true do
    local j = s:find('[%z\1-\31"\\]', i)
    if not j then return nil, "unterminated string" end
    local c = s:byte(j)
    if c == 34 then return j + 1 end
    if c < 32 then return nil, ("control character in a string at byte %d"):format(j) end
    local e = s:sub(j + 1, j + 1)
    if e == "u" then
      local hex = s:match("^%x%x%x%x", j + 2)
      if not hex then return nil, ("bad \\u escape at byte %d"):format(j) end
      local cp = tonumber(hex, 16)
      if cp == 0 then return nil, ("\\u0000 at byte %d, which jsonb refuses"):format(j) end
      i = j + 6
      if cp >= 0xDC00 and cp <= 0xDFFF then
        return nil, ("unpaired surrogate at byte %d"):format(j)
      elseif cp >= 0xD800 and cp <= 0xDBFF then
        local lo = tonumber(s:match("^\\u(%x%x%x%x)", i) or "", 16)
        if not lo or lo < 0xDC00 or lo > 0xDFFF then
          return nil, ("unpaired surrogate at byte %d"):format(j)
        end
        i = i + 6
      end
    elseif e ~= "" and ESCAPES:find(e, 1, true) then
      i = j + 2
    else
      return nil, ("bad escape at byte %d"):format(j)
    end
  end
end

local function number_end(s, i)
  local j = i
  if s:byte(j) == 45 then j = j + 1 end -- '-'
  if s:byte(j) == 48 then -- '0'
    j = j + 1
  else
    local _, b = s:find("^[1-9]%d*", j)
    if not b then return nil end
    j = b + 1
  end
  if s:byte(j) == 46 then -- '.'
    local _, b = s:find("^%d+", j + 1)
    if not b then return nil end
    j = b + 1
  end
  if s:find("^[eE]", j) then
    local _, b = s:find("^[+-]?%d+", j + 1)
    if not b then return nil end
    j = b + 1
  end
  return j
end

local value_end

local function container_end(s, i, depth, close, keyed)
  if depth > MAX_DEPTH then return nil, "nested too deep" end
  i = skip_ws(s, i + 1)
  if s:sub(i, i) == close then return i + 1 end
  while true do
    local err
    if keyed then
      if s:byte(i) ~= 34 then return nil, ("expected a string key at byte %d"):format(i) end
      i, err = string_end(s, i)
      if not i then return nil, err end
      i = skip_ws(s, i)
      if s:byte(i) ~= 58 then return nil, ("expected ':' at byte %d"):format(i) end
      i = i + 1
    end
    i, err = value_end(s, i, depth + 1)
    if not i then return nil, err end
    i = skip_ws(s, i)
    local c = s:sub(i, i)
    if c == close then return i + 1 end
    if c ~= "," then return nil, ("expected ',' or '%s' at byte %d"):format(close, i) end
    i = skip_ws(s, i + 1)
  end
end

value_end = function(s, i, depth)
  i = skip_ws(s, i)
  local c = s:sub(i, i)
  if c == "{" then return container_end(s, i, depth, "}", true) end
  if c == "[" then return container_end(s, i, depth, "]", false) end
  if c == '"' then return string_end(s, i) end
  for _, word in ipairs({ "true", "false", "null" }) do
    if s:find(word, i, true) == i then return i + #word end
  end
  local j = number_end(s, i)
  if j then return j end
  if c == "" then return nil, "unexpected end" end
  if c:find("[-%d]") then return nil, ("bad number at byte %d"):format(i) end
  return nil, ("unexpected %q at byte %d"):format(c, i)
end

-- Why the text s is not JSON that jsonb takes, or nil when it is.
function store.json_problem(s)
  if not utf8.len(s) then return "is not valid UTF-8" end
  local i, err = value_end(s, 1, 0)
  if not i then return err end
  i = skip_ws(s, i)
  if i <= #s then return ("unexpected text after the value at byte %d"):format(i) end
  return nil
end

-- value encoded as JSON for a jsonb column, or raises naming `what`.
function store.encode(where, what, value, level)
  local ok, s = pcall(json.encode, value)
  if not ok then
    error(("%s: %s cannot be encoded as JSON: %s"):format(where, what, tostring(s)),
      (level or 2) + 1)
  end
  local problem = store.jsonb_problem(s)
  if problem then error(("%s: %s %s"):format(where, what, problem), (level or 2) + 1) end
  return s
end

-- ---- table names ----------------------------------------------------------------

-- Checks an unqualified table name; returns it and its quoted form.
function store.table_name(where, name, level)
  level = (level or 2) + 1
  if type(name) ~= "string" or name == "" then
    error(("%s: option table must be a non-empty string, got %s"):format(where, tostring(name)),
      level)
  end
  if #name > MAX_IDENT then
    error(("%s: table name %q is %d bytes; PostgreSQL names take at most %d")
      :format(where, name, #name, MAX_IDENT), level)
  end
  if name:find(".", 1, true) then
    error(("%s: table name %q contains a dot: give an unqualified name, the schema comes"
      .. " from the connection's search_path"):format(where, name), level)
  end
  local problem = store.text_problem(name)
  if problem then error(("%s: table name %q %s"):format(where, name, problem), level) end
  return name, '"' .. name:gsub('"', '""') .. '"'
end

-- Creates the table unless to_regclass finds it (then nothing else is
-- done); statements run in one transaction under pgcoord's DDL lock.
-- Returns true when it created the table.
function store.migrate(pool, name, quoted, statements)
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

-- The statements as one script, each ended by a semicolon.
function store.script(statements)
  local parts = {}
  for i, sql in ipairs(statements) do parts[i] = sql .. ";\n" end
  return table.concat(parts)
end

-- Rows a retention DELETE removes per statement: short transactions, and
-- no long lock on a table that is written to meanwhile.
local DELETE_CHUNK = 5000

-- Runs a DELETE whose LIMIT is its last parameter until it deletes fewer
-- rows than the limit; returns the total.
function store.delete_chunked(conn, sql, ...)
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

-- create_table_sql() and migrate() for class, whose objects hold db, name
-- and quoted (the table's name), from ddl(quoted).
function store.table_methods(class, ddl)
  function class:create_table_sql()
    return store.script(ddl(self.quoted))
  end
  -- Creates the table unless it exists; true when it did.
  function class:migrate()
    return store.migrate(self.db, self.name, self.quoted, ddl(self.quoted))
  end
end

-- ---- the cleanup loop -----------------------------------------------------------

local Cleanup = {}
Cleanup.__index = Cleanup

-- Calls purge() (which returns the number of rows deleted) now and every
-- interval seconds until stopped or pgcoord stops.  A retention that is
-- not positive disables it, which is logged.  fields go into log lines.
function store.cleanup_loop(retention, interval, purge, fields)
  local self = setmetatable({ stopped = false, wake = task.cond(), deleted = 0, runs = 0,
                              fields = fields }, Cleanup)
  local function with(extra)
    local t = {}
    for k, v in pairs(fields) do t[k] = v end
    for k, v in pairs(extra or {}) do t[k] = v end
    return t
  end
  if retention <= 0 then
    self.stopped = true
    log.info("retention cleanup disabled (retention is not positive)",
      with({ retention = retention }))
    return self
  end
  self.task = task.spawn(function()
    while not self.stopped do
      local t0 = core.now()
      local ok, n = pcall(purge)
      if ok then
        self.runs = self.runs + 1
        self.deleted = self.deleted + n
        if n > 0 then
          log.info("retention cleanup", with({ deleted = n, retention = retention,
            seconds = ("%.3f"):format(core.now() - t0) }))
        end
      elseif task.is_cancelled(n) then
        error(n, 0)
      else
        log.error("retention cleanup failed", with({ error = tostring(n) }))
      end
      if self.stopped then break end
      self.wake:wait(interval)
    end
  end)
  require("pgcoord").on_stop(function() self:stop() end)
  return self
end

-- Ends the loop, letting a cleanup in progress finish.
function Cleanup:stop()
  if self.stopped and not self.task then return end
  self.stopped = true
  self.wake:signal()
  local t = self.task
  self.task = nil
  if t and t ~= task.current() then pcall(t.join, t) end
end

function Cleanup:running()
  return not self.stopped
end

function Cleanup:stats()
  return { running = not self.stopped, runs = self.runs, deleted = self.deleted }
end

return store

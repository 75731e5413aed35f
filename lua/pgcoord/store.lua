-- Shim until queue and subscriber move to pgcoord.options: the old option
-- and text checks (with their hand-counted error levels) that queue.lua,
-- subscriber.lua and joblock.lua still call.  Nothing new uses this; the
-- checks now live in pgcoord.options, the text checks in pgcoord.json and
-- the table helpers in pgcoord.tables.
local json = require "pgcoord.json"

local store = {}

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

store.clean_text = json.clean_text

return store

-- Option tables checked once, the same way everywhere.
--
--   local check = options.spec("jobs:worker", {
--     group = { "string", default = "default" },
--     concurrency = { "integer", default = 10, min = 1, max = 10000 },
--     flush_age = { "number", default = 1, min = 0.001 },
--     handle_error = { "function" },
--   })
--   local o = check(opts)   -- a new table: defaults filled in, opts untouched
--
-- Kinds: "number" (finite unless max = math.huge), "integer", "string"
-- (non-empty unless empty = true), "boolean", "function", "table", "pool"
-- (from pgcoord.connect), "conn" (a pool or a transaction), or a list of
-- the strings allowed.  min and max are inclusive; above = x means > x.
-- check = fn(v) -> why or nil: a further test once v is of its kind (a
-- table name the server would refuse, say).
-- Every error names the function, the option and the value, and points at
-- the caller's line: the first frame outside pgcoord's own modules, found
-- by walking the stack as luaL_argerror does, so no module counts levels.
-- Part of the runtime layer.
local options = {}

local own_dir = debug.getinfo(1, "S").source:match("^@(.*/)[^/]*$")

local function internal(info)
  return own_dir ~= nil and info.source:sub(1, #own_dir + 1) == "@" .. own_dir
end

-- The error level, for error() called by the function that called this,
-- of the first frame outside pgcoord's modules.
function options.caller_level()
  local level = 3
  while true do
    local info = debug.getinfo(level, "S")
    if info == nil then return 1 end
    if not internal(info) then return level - 1 end
    level = level + 1
  end
end

-- "file:line" of the first Lua frame outside pgcoord's modules, or nil
-- when there is none (a task pgcoord itself runs).  For errors raised
-- with level 0, which carry no position of their own.
function options.caller_where()
  local level = 2
  while true do
    local info = debug.getinfo(level, "Sl")
    if info == nil then return nil end
    if info.currentline > 0 and not internal(info) then
      return ("%s:%d"):format(info.short_src, info.currentline)
    end
    level = level + 1
  end
end

-- Raises message at the caller's line.
function options.raise(fmt, ...)
  error(fmt:format(...), options.caller_level())
end

local function show(v)
  if type(v) == "string" then return ("%q"):format(v) end
  if math.type(v) == "float" then return ("%.14g"):format(v) end
  return tostring(v)
end
options.show = show

local function range_text(rule)
  local lo = rule.above and ("> " .. rule.above) or (rule.min and (">= " .. rule.min))
  local hi = rule.max and rule.max ~= math.huge and ("<= " .. rule.max)
  if lo and hi then return " " .. lo .. " and " .. hi end
  if lo or hi then return " " .. (lo or hi) end
  return ""
end

-- Why v is not of rule's kind, or nil when it is.
local function kind_problem(rule, v)
  local kind = rule[1]
  if type(kind) == "table" then
    for _, allowed in ipairs(kind) do if v == allowed then return nil end end
    local names = {}
    for i, allowed in ipairs(kind) do names[i] = show(allowed) end
    return "must be one of " .. table.concat(names, ", ")
  end
  if kind == "number" or kind == "integer" then
    local ok
    if kind == "integer" then
      ok = math.type(v) == "integer"
    else -- finite, unless max = math.huge lets math.huge through
      ok = type(v) == "number" and v == v and v ~= -math.huge
        and (v ~= math.huge or rule.max == math.huge)
    end
    ok = ok and not (rule.min and v < rule.min) and not (rule.above and v <= rule.above)
      and not (rule.max and v > rule.max)
    if not ok then
      return ("must be %s%s"):format(kind == "integer" and "an integer" or "a number",
        range_text(rule))
    end
    return nil
  end
  if kind == "pool" then
    if type(v) == "table" and type(v.query) == "function" and type(v.tx) == "function"
       and v.size then return nil end
    return "must be a pool from pgcoord.connect"
  end
  if kind == "conn" then
    if type(v) == "table" and type(v.query) == "function" then return nil end
    return "must be a pool or a transaction"
  end
  if type(v) ~= kind then return "must be a " .. kind end
  if kind == "string" and v == "" and not rule.empty then return "must be a non-empty string" end
  return nil
end

-- Why v does not fit rule, or nil when it does.
local function problem(rule, v)
  local why = kind_problem(rule, v)
  if why == nil and rule.check then why = rule.check(v) end
  return why
end

-- Checks one value against a rule of the spec form; raises naming it.
function options.check(where, name, rule, v)
  local why = problem(rule, v)
  if why then
    error(("%s: option %s %s, got %s"):format(where, name, why, show(v)), options.caller_level())
  end
  return v
end

-- Arguments that are not options: raise unless v is a pool from
-- pgcoord.connect / a pool or a transaction.
function options.pool(where, v)
  if kind_problem({ "pool" }, v) then
    error(("%s: expected a pool from pgcoord.connect, got %s"):format(where, type(v)),
      options.caller_level())
  end
  return v
end

function options.conn(where, v)
  if kind_problem({ "conn" }, v) then
    error(("%s: expected a pool or a transaction, got %s"):format(where, type(v)),
      options.caller_level())
  end
  return v
end

-- A service's stop(timeout): nil, or a number of seconds > 0 (math.huge:
-- no deadline).
function options.timeout(where, v)
  if v ~= nil and (type(v) ~= "number" or v ~= v or v <= 0) then
    error(("%s: timeout must be a number of seconds > 0, got %s"):format(where, show(v)),
      options.caller_level())
  end
  return v
end

-- A checker for where's option table: check(opts) -> a new table.
function options.spec(where, rules)
  return function(opts)
    if opts == nil then opts = {} end
    if type(opts) ~= "table" then
      error(("%s: options must be a table, got %s"):format(where, type(opts)),
        options.caller_level())
    end
    for k in pairs(opts) do
      if rules[k] == nil then
        error(("unknown option %s for %s"):format(show(k), where), options.caller_level())
      end
    end
    local out = {}
    for name, rule in pairs(rules) do
      local v = opts[name]
      if v == nil then
        out[name] = rule.default
      else
        out[name] = options.check(where, name, rule, v)
      end
    end
    return out
  end
end

return options

-- One line per event, logfmt (default) or JSON, on stderr unless a sink
-- is set.  Secrets never reach a line: password-like fields are masked and
-- conninfo strings lose their passwords.
local core = require "pgcoord.core"
local cjson = require "cjson"

local log = {}

local LEVELS = { debug = 10, info = 20, warn = 30, error = 40 }
local threshold = LEVELS.info
local format = "logfmt"
local sink = function(line) io.stderr:write(line, "\n") end

local SECRET_KEYS = { password = true, passwd = true, secret = true, api_key = true }

-- Masks the password of a URI or key=value conninfo.
function log.redact(s)
  if type(s) ~= "string" then return s end
  s = s:gsub("(%w+://[^:/@]*:)[^@]*@", "%1***@")
  s = s:gsub("([Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]%s*=%s*)'[^']*'", "%1***")
  s = s:gsub("([Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]%s*=%s*)[^%s']+", "%1***")
  s = s:gsub("([?&]password=)[^&]*", "%1***")
  return s
end

local function timestamp()
  local t = core.time()
  local ms = math.floor((t % 1) * 1000)
  return os.date("!%Y-%m-%dT%H:%M:%S", math.floor(t)) .. (".%03dZ"):format(ms)
end

local function text(v)
  local tv = type(v)
  if tv == "string" then return log.redact(v) end
  if tv == "table" and getmetatable(v) == nil then
    local ok, s = pcall(cjson.encode, v)
    return ok and s or tostring(v)
  end
  return tostring(v)
end

local function logfmt_value(s)
  if s ~= "" and not s:find('[%s="\\]') then return s end
  return '"' .. s:gsub('[\\"]', "\\%0"):gsub("\n", "\\n"):gsub("\t", "\\t") .. '"'
end

local function sorted_keys(fields)
  local keys = {}
  for k in pairs(fields) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  return keys
end

local function field_text(k, v)
  if SECRET_KEYS[k:lower()] then return "***" end
  return text(v)
end

local function render(level, msg, fields)
  local keys = fields and sorted_keys(fields) or {}
  if format == "json" then
    local obj = { time = timestamp(), level = level, msg = text(msg) }
    for _, k in ipairs(keys) do
      local v = fields[k]
      obj[k] = (type(v) == "number" or type(v) == "boolean") and v or field_text(k, v)
    end
    return cjson.encode(obj)
  end
  local parts = { "time=" .. timestamp(), "level=" .. level, "msg=" .. logfmt_value(text(msg)) }
  for _, k in ipairs(keys) do
    parts[#parts + 1] = k .. "=" .. logfmt_value(field_text(k, fields[k]))
  end
  return table.concat(parts, " ")
end

local function emitter(level)
  local rank = LEVELS[level]
  return function(msg, fields)
    if rank < threshold then return end
    sink(render(level, msg, fields))
  end
end

log.debug = emitter("debug")
log.info = emitter("info")
log.warn = emitter("warn")
log.error = emitter("error")

function log.set_level(level)
  if not LEVELS[level] then
    error(("pgcoord.log: unknown level %q (debug, info, warn, error)"):format(tostring(level)), 2)
  end
  threshold = LEVELS[level]
end

function log.set_format(name)
  if name ~= "logfmt" and name ~= "json" then
    error(("pgcoord.log: unknown format %q (logfmt, json)"):format(tostring(name)), 2)
  end
  format = name
end

-- sink(line) receives each rendered line; nil restores stderr.
function log.set_sink(fn)
  sink = fn or function(line) io.stderr:write(line, "\n") end
end

function log.enabled(level)
  return (LEVELS[level] or 0) >= threshold
end

return log

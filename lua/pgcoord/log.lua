-- One line per event, logfmt (default) or JSON, on stderr unless a sink
-- is set.  Secrets never reach a line: password-like fields are masked and
-- conninfo strings lose their passwords.
local core = require "pgcoord.core"
local cjson = require "cjson"

local log = {}

local LEVELS = { debug = 10, info = 20, warn = 30, error = 40 }
local threshold = LEVELS.info
local format = "logfmt"
-- One write(2) per line: processes sharing stderr (a --workers
-- supervisor and its children) then never splice their lines together.
local function stderr_sink(line) io.stderr:write(line .. "\n") end
local sink = stderr_sink

local SECRET_KEYS = { password = true, passwd = true, secret = true, api_key = true }

-- ---- redaction ---------------------------------------------------------------
--
-- log.redact masks passwords in text of any size in time linear in its
-- length: it looks for "://" and "password" with plain finds and scans
-- forward from each hit, never backwards (a pattern that starts with %w+,
-- retried at every position of a long alphanumeric run, was quadratic: a
-- 64 KB hex field blocked the loop for 20 s).  It masks
--   scheme://user:PASSWORD@host          up to the first '@' (same line)
--   password=VALUE, password = 'VAL\'UE'  libpq conninfo: unquoted up to
--                                        whitespace, or single-quoted;
--                                        backslash escapes either way
--   ?password=VALUE&, &password=VALUE    URI parameters, up to '&'
--   "password":"VALUE"                   JSON
-- Unsure where a password ends, it masks more rather than less.

local QUOTE, BACKSLASH, AT, COLON, DQUOTE = 39, 92, 64, 58, 34

-- Adds {first, last} for each URI password in s.
local function uri_passwords(s, spans)
  local pos = 1
  local no_at_until = 0 -- s[..no_at_until] has no '@' reachable from a password
  while true do
    local scheme_end = s:find("://", pos, true)
    if not scheme_end then return end
    pos = scheme_end + 3
    local user_end = s:find("[:/@\n]", pos)
    if user_end and s:byte(user_end) == COLON and user_end + 1 > no_at_until then
      local stop = s:find("[@\n]", user_end + 1)
      if stop and s:byte(stop) == AT then
        spans[#spans + 1] = { user_end + 1, stop - 1 }
        pos = stop + 1
      else
        no_at_until = stop or #s + 1
      end
    end
  end
end

-- The last byte of a value: scanning from i for a byte of class stop
-- (which includes the backslash), skipping each backslash and the byte it
-- escapes; the stop byte itself is in the value when `inclusive`.
local function scan_end(s, i, stop, inclusive)
  while true do
    local j = s:find(stop, i)
    if not j then return #s end
    if s:byte(j) ~= BACKSLASH then return inclusive and j or j - 1 end
    i = j + 2
  end
end

-- The last byte of the value that starts at v after "password" and
-- `before` (the byte before that key).
local function value_end(s, v, before)
  if before == "?" or before == "&" then return (s:find("&", v, true) or #s + 1) - 1 end
  if s:byte(v) == QUOTE then return scan_end(s, v + 1, "[\\']", true) end
  return scan_end(s, v, "[\\%s]", false)
end

-- Adds {first, last} for each password=value (and JSON "password":) in s.
local function key_passwords(s, spans)
  local lower = s:lower()
  local pos = 1
  while true do
    local k = lower:find("password", pos, true)
    if not k then return end
    pos = k + 8
    local before = s:sub(k - 1, k - 1)
    local v, last
    if before == '"' and s:byte(pos) == DQUOTE then
      v = s:match('^"%s*:%s*()"', pos)
      if v then last = scan_end(s, v + 1, '[\\"]', true) end
    else
      v = s:match("^%s*=%s*()", pos)
      if v and v <= #s then last = value_end(s, v, before) end
    end
    if last and last >= v then
      spans[#spans + 1] = { v, last }
      pos = last + 1
    end
  end
end

-- Masks the passwords of URIs, conninfo strings and JSON in s.
function log.redact(s)
  if type(s) ~= "string" then return s end
  local spans = {}
  uri_passwords(s, spans)
  key_passwords(s, spans)
  if #spans == 0 then return s end
  table.sort(spans, function(x, y) return x[1] < y[1] end)
  local out, pos = {}, 1
  for _, span in ipairs(spans) do
    local first, last = span[1], span[2]
    if first >= pos then
      out[#out + 1] = s:sub(pos, first - 1)
      out[#out + 1] = "***"
    end
    if last >= pos then pos = last + 1 end
  end
  out[#out + 1] = s:sub(pos)
  return table.concat(out)
end

-- Logged values longer than this many bytes are cut, at a character
-- boundary, and end in "…(N bytes)": one line stays cheap to render and
-- to ship, however large the error a job raised.
log.MAX_VALUE = 4096

local function capped(s)
  local n = #s
  if n <= log.MAX_VALUE then return s end
  local cut = log.MAX_VALUE
  -- back off over UTF-8 continuation bytes (at most 3 in valid text)
  for _ = 1, 3 do
    if s:byte(cut + 1) & 0xC0 ~= 0x80 then break end
    cut = cut - 1
  end
  return ("%s…(%d bytes)"):format(s:sub(1, cut), n)
end

local function timestamp()
  local t = core.time()
  local ms = math.floor((t % 1) * 1000)
  return os.date("!%Y-%m-%dT%H:%M:%S", math.floor(t)) .. (".%03dZ"):format(ms)
end

-- A value as it is logged: text, redacted, capped.
local function text(v)
  local s
  if type(v) == "table" and getmetatable(v) == nil then
    local ok, encoded = pcall(cjson.encode, v)
    s = ok and encoded or tostring(v)
  else
    s = tostring(v)
  end
  return capped(log.redact(s))
end

local ESCAPES = { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

local function logfmt_value(s)
  if s ~= "" and not s:find('[%s="\\]') then return s end
  return '"' .. s:gsub('[\\"\n\r\t]', ESCAPES) .. '"'
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

-- ---- failures ----------------------------------------------------------------
--
-- One shape for every failure: error= is the first line of the message
-- (with the file:line it was raised at, when it has one); the rest, a
-- stack traceback mostly, goes to traceback=, which only a debug log
-- shows.  A job that fails is one short line at info, not the whole
-- traceback.

local function error_value_text(v)
  if type(v) == "table" and getmetatable(v) == nil then return text(v) end
  return tostring(v)
end

local function failure_fields(fields)
  if fields == nil or (fields.error == nil and fields.traceback == nil) then return fields end
  local out = {}
  for k, v in pairs(fields) do out[k] = v end
  if fields.error ~= nil then
    local full = error_value_text(fields.error)
    local first = full:match("^\n*([^\n]*)")
    out.error = first
    if #first + 1 < #full and out.traceback == nil then out.traceback = full end
  end
  if threshold > LEVELS.debug then out.traceback = nil end
  return out
end

local function render(level, msg, fields)
  fields = failure_fields(fields)
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

-- Signals by name in logs (Linux numbering, which core.wait_child and
-- core.signal use): "SIGTERM", not 15.
local SIGNAL_NAMES = {
  [1] = "SIGHUP", [2] = "SIGINT", [3] = "SIGQUIT", [4] = "SIGILL", [5] = "SIGTRAP",
  [6] = "SIGABRT", [7] = "SIGBUS", [8] = "SIGFPE", [9] = "SIGKILL", [10] = "SIGUSR1",
  [11] = "SIGSEGV", [12] = "SIGUSR2", [13] = "SIGPIPE", [14] = "SIGALRM", [15] = "SIGTERM",
  [17] = "SIGCHLD", [24] = "SIGXCPU", [25] = "SIGXFSZ", [31] = "SIGSYS",
}

function log.signal_name(signum)
  return SIGNAL_NAMES[signum] or ("signal %s"):format(tostring(signum))
end

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
  sink = fn or stderr_sink
end

function log.enabled(level)
  return (LEVELS[level] or 0) >= threshold
end

return log

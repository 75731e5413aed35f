-- JSON for parameters, payloads and json columns, both directions in
-- pgcoord.core (src/json.c): integers stay exact Lua integers, which
-- lua-cjson 2.1 does not keep.  null is cjson.null, so values mix freely
-- with code that uses cjson.
--
-- Also the checks for what a text or jsonb column takes, so that a value
-- the server would refuse is refused at the call, before it can abort the
-- caller's transaction.  Part of the runtime layer.
local core = require "pgcoord.core"
local cjson = require "cjson"
local options = require "pgcoord.options"

local json = {}

json.null = cjson.null
json.encode = core.json_encode
json.decode = core.json_decode
-- A notification's payload: its value, or the string as it is when it is
-- not JSON (nil and "" too).
json.decode_payload = core.json_decode_payload

local ARRAY = { __jsonarray = true }

-- Marks t as a list, so that it encodes as [] even when empty.
function json.array(t)
  return setmetatable(t or {}, ARRAY)
end

-- Like decode, but returns nil and the error instead of raising.
function json.try_decode(s)
  local ok, v = pcall(core.json_decode, s)
  if ok then return v end
  return nil, v
end

-- ---- text columns ---------------------------------------------------------

-- Why s cannot be stored in a text column, or nil when it can.
function json.text_problem(s)
  if s:find("\0", 1, true) then return "contains a NUL byte" end
  if not utf8.len(s) then return "is not valid UTF-8" end
  return nil
end

-- Raises at the caller's line, naming what s is, unless s can be stored in
-- a text column.
function json.check_text(where, what, s)
  local problem = json.text_problem(s)
  if problem then options.raise("%s: %s %s", where, what, problem) end
  return s
end

-- s made storable in a text column: at most max bytes, no NUL, valid UTF-8.
function json.clean_text(s, max)
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

-- ---- jsonb columns --------------------------------------------------------

-- Why the escapes of the JSON text s are not what jsonb takes, or nil:
-- jsonb refuses \u0000 and a surrogate escape that is not half of a pair.
-- (Each match is a whole escape, so an escaped backslash is skipped.)
local function escape_problem(s)
  local low_at -- where the low half of a pair must be
  for at, e in s:gmatch("()\\(.)") do
    local unit = e == "u" and tonumber(s:sub(at + 2, at + 5), 16)
    if low_at and at ~= low_at then return ("unpaired surrogate at byte %d"):format(low_at - 6) end
    if unit == 0 then return ("\\u0000 at byte %d, which jsonb refuses"):format(at) end
    if unit and unit >= 0xDC00 and unit <= 0xDFFF then
      if not low_at then return ("unpaired surrogate at byte %d"):format(at) end
      low_at = nil
    elseif unit and unit >= 0xD800 and unit <= 0xDBFF then
      if low_at then return ("unpaired surrogate at byte %d"):format(low_at - 6) end
      low_at = at + 6
    elseif low_at then
      return ("unpaired surrogate at byte %d"):format(low_at - 6)
    end
  end
  if low_at then return ("unpaired surrogate at byte %d"):format(low_at - 6) end
  return nil
end

-- Why the text s is not JSON that jsonb takes, or nil when it is.  The C
-- decoder judges the structure and the number grammar (01, 1. and .5 are
-- refused there); what it lets through and jsonb refuses is checked here:
-- invalid UTF-8 and the escapes above (it reads a lone surrogate as
-- U+FFFD).
function json.problem(s)
  if not utf8.len(s) then return "is not valid UTF-8" end
  local ok, err = pcall(core.json_decode, s)
  if not ok then return tostring(err) end
  return escape_problem(s)
end

-- value encoded as JSON text for a jsonb column; raises at the caller's
-- line, naming `what`, when it cannot be.  Our encoder writes NUL as
-- \u0000, which jsonb refuses, and copies strings byte for byte, so
-- invalid UTF-8 would reach the server.
function json.encode_jsonb(where, what, value)
  local ok, s = pcall(core.json_encode, value)
  if not ok then
    options.raise("%s: %s cannot be encoded as JSON: %s", where, what, tostring(s))
  end
  if not utf8.len(s) then
    options.raise("%s: %s contains a string that is not valid UTF-8", where, what)
  end
  for slashes in s:gmatch("(\\+)u0000") do
    if #slashes % 2 == 1 then
      options.raise("%s: %s contains a NUL character (\\u0000), which jsonb refuses", where, what)
    end
  end
  return s
end

return json

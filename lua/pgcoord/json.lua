-- JSON for parameters, payloads and json columns, both directions in
-- pgcoord.core (src/json.c): integers stay exact Lua integers, which
-- lua-cjson 2.1 does not keep.  null is cjson.null, so values mix freely
-- with code that uses cjson.
local core = require "pgcoord.core"
local cjson = require "cjson"

local json = {}

json.null = cjson.null
json.encode = core.json_encode
json.decode = core.json_decode

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

return json

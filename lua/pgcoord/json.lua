-- JSON for parameters, payloads and json columns.
--
-- Encoding is pgcoord.core's (exact integers); decoding is lua-cjson's,
-- whose numbers are all floats: integral ones are turned back into Lua
-- integers so that 42 stays 42 and not 42.0.
local core = require "pgcoord.core"
local cjson = require "cjson"

local json = {}

json.null = cjson.null
json.encode = core.json_encode

local tointeger = math.tointeger

local function integers(v)
  for k, x in pairs(v) do
    local tx = type(x)
    if tx == "number" then
      local i = tointeger(x)
      if i and i > -2^53 and i < 2^53 then v[k] = i end
    elseif tx == "table" then
      integers(x)
    end
  end
  return v
end

function json.decode(s)
  local v = cjson.decode(s)
  local tv = type(v)
  if tv == "table" then return integers(v) end
  if tv == "number" then return tointeger(v) or v end
  return v
end

-- Like decode, but returns nil and the error instead of raising.
function json.try_decode(s)
  local ok, v = pcall(json.decode, s)
  if ok then return v end
  return nil, v
end

return json

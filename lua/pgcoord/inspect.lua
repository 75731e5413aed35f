-- How the prompt shows a table: a short Lua-like literal, as the inspect
-- library prints it,
--   { 1, 2, name = "x", nested = { deep = {...} }, ... (40 more) }
-- the sequence first, then the other keys sorted (numbers, strings, the
-- rest); strings quoted; a table inside itself marked <cycle>; tables
-- below DEPTH levels as {...}; ITEMS entries a table at most; a literal
-- wider than WIDTH one entry per line.  Anything but a plain table is
-- shown by tostring, as `lua -i` shows it.
local json = require "pgcoord.json"

local inspect = {}

local DEPTH = 3     -- levels of tables shown; a deeper one is {...}
local ITEMS = 20    -- entries shown of one table; the rest are counted
local STRING = 200  -- bytes shown of a string inside a table
local WIDTH = 80    -- columns one line may take

local KEYWORDS = {}
for word in ([[and break do else elseif end false for function goto if in local nil not or
    repeat return then true until while]]):gmatch("%a+") do KEYWORDS[word] = true end

local ESCAPES = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

local function quote(s)
  local cut = ""
  if #s > STRING then
    local stop = STRING
    -- not inside a UTF-8 sequence: continuation bytes are 10xxxxxx
    while stop > 0 and (s:byte(stop + 1) or 0) & 0xC0 == 0x80 do stop = stop - 1 end
    cut = ("...(%d bytes)"):format(#s)
    s = s:sub(1, stop)
  end
  return '"' .. s:gsub('[%c"\\]', function(c)
    return ESCAPES[c] or ("\\%03d"):format(c:byte())
  end) .. '"' .. cut
end

local function has_tostring(v)
  local mt = getmetatable(v)
  return type(mt) == "table" and rawget(mt, "__tostring") ~= nil
end

-- A value that is no plain table, inside a table.
local function scalar(v)
  local kind = type(v)
  if kind == "string" then return quote(v) end
  if kind == "number" or kind == "boolean" or kind == "nil" then return tostring(v) end
  if v == json.null then return "pgcoord.null" end
  if has_tostring(v) then return "<" .. tostring(v) .. ">" end
  return "<" .. kind .. ">"
end

local TYPE_ORDER = { number = 1, string = 2 }

local function key_before(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then
    local oa, ob = TYPE_ORDER[ta] or 3, TYPE_ORDER[tb] or 3
    if oa ~= ob then return oa < ob end
    return ta < tb
  end
  if ta == "number" or ta == "string" then return a < b end
  return tostring(a) < tostring(b)
end

local function key_text(k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") and not KEYWORDS[k] then return k end
  return "[" .. scalar(k) .. "]"
end

local render

-- The entries of t as text, each rendered at `indent`, and how many of
-- them lead without a key (the sequence).
local function entries(t, depth, indent, ancestors)
  local n = 0
  while rawget(t, n + 1) ~= nil do n = n + 1 end
  local keys = {}
  for k in next, t do
    if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
  end
  table.sort(keys, key_before)
  local items = {}
  local shown = math.min(n + #keys, ITEMS)
  for i = 1, shown do
    if i <= n then
      items[i] = render(rawget(t, i), depth, indent, ancestors)
    else
      local k = keys[i - n]
      items[i] = key_text(k) .. " = " .. render(rawget(t, k), depth, indent, ancestors)
    end
  end
  if n + #keys > shown then items[#items + 1] = ("... (%d more)"):format(n + #keys - shown) end
  return items, math.min(n, shown)
end

-- One entry a line, but the sequence's short ones side by side.
local function lines(items, unkeyed, indent)
  local pad = (" "):rep(indent)
  local out, current = {}, nil
  for i, item in ipairs(items) do
    local side_by_side = current and i <= unkeyed and not item:find("\n", 1, true)
      and #current + #item + 2 <= WIDTH
    if side_by_side then
      current = current .. ", " .. item
    else
      if current then out[#out + 1] = current .. "," end
      current = pad .. item
    end
  end
  out[#out + 1] = current
  return table.concat(out, "\n")
end

function render(v, depth, indent, ancestors)
  if type(v) ~= "table" or has_tostring(v) then return scalar(v) end
  if ancestors[v] then return "<cycle>" end
  if next(v) == nil then return "{}" end
  if depth >= DEPTH then return "{...}" end
  ancestors[v] = true
  local items, unkeyed = entries(v, depth + 1, indent + 2, ancestors)
  ancestors[v] = nil
  local line = "{ " .. table.concat(items, ", ") .. " }"
  if indent + #line <= WIDTH and not line:find("\n", 1, true) then return line end
  return "{\n" .. lines(items, unkeyed, indent + 2) .. "\n" .. (" "):rep(indent) .. "}"
end

-- The text the prompt shows for v.
function inspect.show(v)
  if type(v) ~= "table" or has_tostring(v) then return tostring(v) end
  return render(v, 0, 0, {})
end

return inspect

-- The dashboard's one way to make HTML: templates whose {{name}} slots
-- are filled with escaped values.  A value is escaped unless it is a
-- fragment this module made (html.render, html.join), so nothing from the
-- database, the URL or a form can reach a page unescaped.
local json = require "pgcoord.json"

local html = {}

local Fragment = {}
Fragment.__tostring = function(f) return f.text end

local function fragment(text) return setmetatable({ text = text }, Fragment) end

local ENTITIES = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;",
                   ["'"] = "&#39;" }

-- The text of any value, escaped for an element's content or a quoted
-- attribute.  Bytes that are not UTF-8 show as U+FFFD, so a page is
-- always valid UTF-8.
function html.escape(v)
  if v == nil then return "" end
  if type(v) ~= "string" then v = tostring(v) end
  if not utf8.len(v) then
    local out, i = {}, 1
    while i <= #v do
      if utf8.len(v, i, i) then
        local c = utf8.char(utf8.codepoint(v, i))
        out[#out + 1] = c
        i = i + #c
      else
        out[#out + 1] = "\u{FFFD}"
        i = i + 1
      end
    end
    v = table.concat(out)
  end
  return (v:gsub("[&<>\"']", ENTITIES))
end

local function slot(v)
  if getmetatable(v) == Fragment then return v.text end
  return html.escape(v)
end

-- template with each {{name}} replaced by vars.name (escaped, unless a
-- fragment); a fragment.
function html.render(template, vars)
  return fragment((template:gsub("{{([%w_]+)}}", function(name) return slot(vars[name]) end)))
end

-- Fragments (or values, escaped) one after another; a fragment.
function html.join(list, sep)
  local parts = {}
  for i, v in ipairs(list) do parts[i] = slot(v) end
  return fragment(table.concat(parts, sep or ""))
end

-- Each item of list rendered by fn(item) -> fragment, joined.
function html.each(list, fn)
  local parts = {}
  for i, item in ipairs(list or {}) do parts[i] = fn(item, i) end
  return html.join(parts)
end

-- Markup written here, not built from values (an SVG path, say).
function html.trusted(text) return fragment(text) end

function html.text(f) return slot(f) end

-- ---- values as people read them ---------------------------------------------

function html.when(t)
  if type(t) ~= "number" then return "-" end
  return os.date("!%Y-%m-%d %H:%M:%SZ", math.floor(t))
end

function html.age(seconds)
  if type(seconds) ~= "number" then return "-" end
  if seconds < 120 then return ("%.1fs"):format(seconds) end
  if seconds < 7200 then return ("%.1fm"):format(seconds / 60) end
  return ("%.1fh"):format(seconds / 3600)
end

-- A capped count: "10000+" at the cap.
function html.count(n, cap)
  if n == nil then return "-" end
  return n >= cap and ("%d+"):format(cap) or tostring(n)
end

function html.json(v)
  if v == nil then return "-" end
  local ok, s = pcall(json.encode, v)
  return ok and s or tostring(v)
end

-- A query string from a list of { name, value } (nil values left out).
function html.query(pairs_list)
  local parts = {}
  for _, p in ipairs(pairs_list) do
    if p[2] ~= nil then
      parts[#parts + 1] = p[1] .. "=" .. tostring(p[2]):gsub("[^%w%-%._~]", function(c)
        return ("%%%02X"):format(c:byte())
      end)
    end
  end
  return #parts > 0 and ("?" .. table.concat(parts, "&")) or ""
end

return html

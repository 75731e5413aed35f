-- Metrics in Prometheus' text exposition format.
--
-- Counters and histograms are updated where things happen (jobs, for
-- one); everything else is read at scrape time from the objects the
-- modules register with track(), which costs nothing between scrapes.
-- Figures that need the database (queue and group depths) are refreshed
-- by pgcoord.http on an interval, never per scrape.
local metrics = {}

local families = {}      -- name -> family, in registration order via `order`
local order = {}
local tracked = {}       -- kind -> weak set of objects
local collectors = {}    -- functions run before each render

local Family = {}
Family.__index = Family

local function family(kind, name, help, labels, buckets)
  local f = families[name]
  if f then return f end
  f = setmetatable({ kind = kind, name = name, help = help, labels = labels or {},
                     values = {}, buckets = buckets }, Family)
  families[name] = f
  order[#order + 1] = f
  return f
end

function metrics.counter(name, help, labels)
  return family("counter", name, help, labels)
end

function metrics.gauge(name, help, labels)
  return family("gauge", name, help, labels)
end

local DEFAULT_BUCKETS = { 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60 }

function metrics.histogram(name, help, labels, buckets)
  return family("histogram", name, help, labels, buckets or DEFAULT_BUCKETS)
end

local function escape(v)
  return (tostring(v):gsub("[\\\"\n]", { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end

-- The series key: label values in the family's label order.
local function key_of(f, values)
  local labels = f.labels
  local n = #labels
  if n == 0 then return "" end
  local parts = {}
  for i = 1, n do
    parts[i] = ('%s="%s"'):format(labels[i], escape(values[i] or ""))
  end
  return table.concat(parts, ",")
end

-- f:inc(n, label values...)
function Family:inc(n, ...)
  local key = key_of(self, { ... })
  self.values[key] = (self.values[key] or 0) + (n or 1)
end

-- f:set(v, label values...)
function Family:set(v, ...)
  self.values[key_of(self, { ... })] = v
end

-- f:add(n, label values...): adds n to the series (0 creates it), for
-- gauges summed over objects at scrape time.
Family.add = Family.inc

-- Drops every series (gauges rebuilt from scratch at each refresh).
function Family:reset()
  self.values = {}
end

-- f:observe(v, label values...) for histograms.
function Family:observe(v, ...)
  return self:with(...):observe(v)
end

-- A series with fixed label values, for hot paths: the key is built once.
local Series = {}
Series.__index = Series

function Family:with(...)
  return setmetatable({ family = self, key = key_of(self, { ... }) }, Series)
end

function Series:inc(n)
  local values = self.family.values
  values[self.key] = (values[self.key] or 0) + (n or 1)
end

function Series:observe(v)
  local f = self.family
  local h = f.values[self.key]
  if not h then
    h = { counts = {}, sum = 0, count = 0 }
    for i = 1, #f.buckets do h.counts[i] = 0 end
    f.values[self.key] = h
  end
  -- one count per bucket, made cumulative when rendered: an observation
  -- costs one increment however many buckets there are
  local buckets, counts = f.buckets, h.counts
  for i = 1, #buckets do
    if v <= buckets[i] then
      counts[i] = counts[i] + 1
      break
    end
  end
  h.sum = h.sum + v
  h.count = h.count + 1
end

-- Registers obj under kind, weakly: it goes when its owner drops it.
function metrics.track(kind, obj)
  local set = tracked[kind]
  if not set then
    set = setmetatable({}, { __mode = "k" })
    tracked[kind] = set
  end
  set[obj] = true
end

function metrics.each(kind)
  return pairs(tracked[kind] or {})
end

-- fn() runs before each render, to set gauges from tracked objects.
function metrics.collect(fn)
  collectors[#collectors + 1] = fn
end

local SHORTEST = { "%.15g", "%.16g" }

local function number(v)
  if v == math.huge then return "+Inf" end
  if v == -math.huge then return "-Inf" end
  if v ~= v then return "NaN" end
  if math.type(v) == "integer" then return tostring(v) end
  -- the shortest of these that reads back as v: 0.005, not 0.0050000000000000001
  for _, format in ipairs(SHORTEST) do
    local text = format:format(v)
    if tonumber(text) == v then return text end
  end
  return ("%.17g"):format(v)
end

local function series(name, key, extra)
  local labels = key
  if extra then labels = key == "" and extra or (key .. "," .. extra) end
  if labels == "" then return name end
  return name .. "{" .. labels .. "}"
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

function metrics.render()
  for _, fn in ipairs(collectors) do
    local ok, err = pcall(fn)
    if not ok then require("pgcoord.log").warn("metrics collector failed", { error = err }) end
  end
  local out = {}
  for _, f in ipairs(order) do
    out[#out + 1] = ("# HELP %s %s\n# TYPE %s %s\n"):format(f.name, f.help, f.name, f.kind)
    for _, key in ipairs(sorted_keys(f.values)) do
      local v = f.values[key]
      if f.kind == "histogram" then
        local cumulative = 0
        for i, bound in ipairs(f.buckets) do
          cumulative = cumulative + v.counts[i]
          out[#out + 1] = ("%s %d\n"):format(series(f.name .. "_bucket", key,
            ('le="%s"'):format(number(bound))), cumulative)
        end
        out[#out + 1] = ("%s %d\n"):format(series(f.name .. "_bucket", key, 'le="+Inf"'), v.count)
        out[#out + 1] = ("%s %s\n"):format(series(f.name .. "_sum", key), number(v.sum))
        out[#out + 1] = ("%s %d\n"):format(series(f.name .. "_count", key), v.count)
      else
        out[#out + 1] = ("%s %s\n"):format(series(f.name, key), number(v))
      end
    end
  end
  return table.concat(out)
end

return metrics

-- Inline SVG line charts of the last hour, one point a minute: the
-- numbers are formatted here (%.1f), never a value copied from the
-- database as text, and the labels go through html.escape.
local html = require "pgcoord.dashboard.html"

local charts = {}

local W, H, LEFT, BOTTOM, TOP = 360, 140, 36, 18, 8
local MINUTES = 60

-- series = { { class, values_by_minute_index (1..60) } ...}; ymax > 0.
local function plot(title, series, ymax, unit)
  local x_of = function(i) return LEFT + (i - 1) * (W - LEFT - 4) / (MINUTES - 1) end
  local y_of = function(v) return TOP + (H - TOP - BOTTOM) * (1 - v / ymax) end
  local lines = {}
  for _, s in ipairs(series) do
    local points = {}
    for i = 1, MINUTES do
      points[#points + 1] = ("%.1f,%.1f"):format(x_of(i), y_of(s[2][i] or 0))
    end
    lines[#lines + 1] = html.render('<polyline class="{{class}}" points="{{points}}"/>',
      { class = s[1], points = table.concat(points, " ") })
  end
  return html.render([[
<div class="chart"><div class="title">{{title}}</div>
<svg xmlns="http://www.w3.org/2000/svg" width="{{w}}" height="{{h}}" viewBox="0 0 {{w}} {{h}}" role="img" aria-label="{{title}}">
<line class="axis" x1="{{left}}" y1="{{top}}" x2="{{left}}" y2="{{base}}"/>
<line class="axis" x1="{{left}}" y1="{{base}}" x2="{{right}}" y2="{{base}}"/>
<text x="2" y="{{ytop}}">{{ymax}}</text><text x="2" y="{{base}}">0</text>
<text x="{{left}}" y="{{h}}">-60 min</text><text x="{{now_x}}" y="{{h}}">now</text>
{{lines}}
</svg></div>]], { title = title, w = W, h = H, left = LEFT, top = TOP, base = H - BOTTOM,
    right = W - 4, ytop = TOP + 8, ymax = ("%g%s"):format(ymax, unit), now_x = W - 24,
    lines = html.join(lines) })
end

local function nice_max(v)
  if v <= 0 then return 1 end
  local p = 10 ^ math.floor(math.log(v, 10))
  for _, m in ipairs({ 1, 2, 5, 10 }) do
    if v <= m * p then return m * p end
  end
  return 10 * p
end

-- rows: the CHART statement's (minute, completed, failed, p50, p99);
-- now: the database's clock.  Two charts: throughput and duration.
function charts.group(rows, now)
  local start = math.floor(now / 60) * 60 - (MINUTES - 1) * 60
  local completed, failed, p50, p99 = {}, {}, {}, {}
  local top_count, top_seconds = 0, 0
  for _, r in ipairs(rows) do
    local i = math.floor((r.minute - start) / 60 + 0.5) + 1
    if i >= 1 and i <= MINUTES then
      completed[i], failed[i] = r.completed, r.failed
      p50[i], p99[i] = r.p50 or 0, r.p99 or 0
      top_count = math.max(top_count, r.completed, r.failed)
      top_seconds = math.max(top_seconds, p99[i], p50[i])
    end
  end
  return html.render([[
<div class="charts">{{throughput}}{{duration}}</div>
<div class="legend"><span class="completed">&#9632; completed/min</span><span class="failed">&#9632; failed/min</span><span class="p50">&#9632; p50 s</span><span class="p99">&#9632; p99 s</span></div>]],
    { throughput = plot("Runs per minute", { { "completed", completed }, { "failed", failed } },
        nice_max(top_count), ""),
      duration = plot("Run duration (s)", { { "p50", p50 }, { "p99", p99 } },
        nice_max(top_seconds), "s") })
end

return charts

-- The dashboard's only assets, served by pgcoord itself: a small style
-- sheet, a script that reloads pages marked for it, an icon.  No inline
-- style or script anywhere (the Content-Security-Policy forbids both).
local static = {}

static["/static/dashboard.css"] = { "text/css; charset=utf-8", [[
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { background: #1d2330; color: #fff; padding: 8px 16px; display: flex; gap: 16px;
         align-items: center; }
header a { color: #cfd8ff; text-decoration: none; }
header .brand { font-weight: 600; color: #fff; }
header form { margin-left: auto; }
main { padding: 12px 16px; max-width: 1200px; }
h1 { font-size: 20px; margin: 8px 0 12px; }
h2 { font-size: 16px; margin: 20px 0 8px; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e3e6ea;
         vertical-align: top; }
th { background: #eef0f3; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #fff; border: 1px solid #e3e6ea; padding: 8px; overflow: auto;
      white-space: pre-wrap; word-break: break-all; margin: 0; }
.notice { background: #e7f6ea; border: 1px solid #9fd4aa; padding: 6px 10px; margin: 8px 0; }
.problem { background: #fdecea; border: 1px solid #f1a99f; padding: 6px 10px; margin: 8px 0; }
.bad { color: #b3261e; }
.good { color: #1e7b34; }
.muted { color: #69707d; }
.paused { background: #fff3cd; padding: 0 6px; border-radius: 3px; }
form.inline { display: inline; }
button { font: inherit; padding: 2px 10px; cursor: pointer; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dt { font-weight: 600; }
dd { margin: 0; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.chart { background: #fff; border: 1px solid #e3e6ea; padding: 6px; }
.chart .title { font-weight: 600; font-size: 13px; }
svg text { font-size: 10px; fill: #69707d; }
svg .axis { stroke: #c5cad3; stroke-width: 1; }
svg .completed { fill: none; stroke: #1e7b34; stroke-width: 1.5; }
svg .failed { fill: none; stroke: #b3261e; stroke-width: 1.5; }
svg .p50 { fill: none; stroke: #2f5fd0; stroke-width: 1.5; }
svg .p99 { fill: none; stroke: #c77700; stroke-width: 1.5; }
.legend span { margin-right: 10px; font-size: 12px; }
.legend .completed { color: #1e7b34; } .legend .failed { color: #b3261e; }
.legend .p50 { color: #2f5fd0; } .legend .p99 { color: #c77700; }
nav.pager { margin: 8px 0; }
]] }

-- Reloads a page whose body has data-refresh="seconds", unless the user
-- is typing in a form.
static["/static/dashboard.js"] = { "text/javascript; charset=utf-8", [[
(function () {
  var s = Number(document.body.getAttribute("data-refresh"));
  if (!s) return;
  setInterval(function () {
    var a = document.activeElement;
    if (a && (a.tagName === "INPUT" || a.tagName === "SELECT")) return;
    location.reload();
  }, s * 1000);
})();
]] }

static["/static/favicon.svg"] = { "image/svg+xml", [[
<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#1d2330"/><circle cx="8" cy="8" r="4" fill="#cfd8ff"/></svg>
]] }

return static

-- The dashboard's pages: each view(data, ctx) -> a fragment of HTML,
-- wrapped by views.layout.  Every value goes through html.render's
-- escaping; ctx carries the CSRF field, whether actions are allowed, and
-- the one-line notice of the last action.
local html = require "pgcoord.dashboard.html"
local charts = require "pgcoord.dashboard.charts"

local views = {}

local render, each, when, age, q = html.render, html.each, html.when, html.age, html.query

function views.layout(title, body, ctx)
  ctx = ctx or {}
  local logout = ctx.session and render([[
<form class="inline" method="post" action="/logout" id="logout-form"><input type="hidden" name="csrf" value="{{csrf}}"><button name="action" value="logout">Log out</button></form>]],
    { csrf = ctx.csrf }) or (ctx.login_link and html.trusted('<a href="/login" id="login-link">Log in</a>')) or ""
  return render([[
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} · pgcoord</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/dashboard.css">
</head>
<body data-refresh="{{refresh}}">
<header><a class="brand" href="/">pgcoord</a><a href="/">Overview</a><a href="/periodic">Periodic</a>{{logout}}</header>
<main>
{{notice}}<h1>{{title}}</h1>
{{body}}
</main>
<script src="/static/dashboard.js"></script>
</body></html>
]], { title = title, body = body, refresh = ctx.refresh or "",
      notice = ctx.notice and render('<p class="notice" id="notice">{{n}}</p>', { n = ctx.notice })
        or "", logout = logout })
end

-- A POST form of one or more buttons: action path, hidden fields, and
-- buttons { value, label }; nothing when actions are not allowed.
local function form(ctx, id, action, fields, buttons)
  if not ctx.can_act then return "" end
  local hidden = { html.render('<input type="hidden" name="csrf" value="{{v}}">',
    { v = ctx.csrf }) }
  for _, f in ipairs(fields) do
    hidden[#hidden + 1] = render('<input type="hidden" name="{{n}}" value="{{v}}">',
      { n = f[1], v = f[2] })
  end
  for _, b in ipairs(buttons) do
    hidden[#hidden + 1] = render('<button name="action" value="{{v}}">{{l}}</button>',
      { v = b[1], l = b[2] })
  end
  return render('<form class="inline" method="post" action="{{a}}" id="{{id}}">{{f}}</form>',
    { a = action, id = id, f = html.join(hidden, " ") })
end
views.form = form

local function none(cols, text)
  return render('<tr><td colspan="{{c}}" class="muted">{{t}}</td></tr>', { c = cols, t = text })
end

local function rows_or(list, cols, text, fn)
  if not list or #list == 0 then return none(cols, text) end
  return each(list, fn)
end

local function missing(rows, text)
  return rows == nil and render('<p class="muted">{{t}}</p>', { t = text }) or nil
end

-- ---- overview ---------------------------------------------------------------

local function group_link(g)
  return render('<a href="/group{{q}}">{{g}}</a>', { q = q({ { "name", g } }), g = g })
end
views.group_link = group_link

local function state_link(g, state, n, cap)
  if n == 0 then return html.render('<span class="muted">0</span>', {}) end
  return render('<a href="/jobs{{q}}">{{n}}</a>',
    { q = q({ { "group", g }, { "state", state } }), n = html.count(n, cap) })
end

local function limits_text(g)
  local parts = {}
  if g.concurrency then parts[#parts + 1] = ("concurrency %d"):format(g.concurrency) end
  if g.rate then parts[#parts + 1] = ("%g/s"):format(g.rate) end
  return #parts > 0 and table.concat(parts, ", ") or "-"
end

local STATE_COLUMNS = { "ready", "scheduled", "running", "failed", "cancelled" }

local function group_row(g, cap)
  local cells = {}
  for i, s in ipairs(STATE_COLUMNS) do
    cells[i] = render('<td class="num">{{v}}</td>', { v = state_link(g.group, s, g[s], cap) })
  end
  return render([[<tr><td>{{name}}</td>{{cells}}<td>{{paused}}</td><td>{{limits}}</td><td class="num">{{workers}}</td></tr>]],
    { name = group_link(g.group), cells = html.join(cells),
      paused = g.paused and html.trusted('<span class="paused">paused</span>') or "no",
      limits = limits_text(g), workers = g.workers })
end

local function groups_table(groups, cap)
  return render([[
<table id="groups"><thead><tr><th>Group</th><th class="num">Ready</th><th class="num">Scheduled</th><th class="num">Running</th><th class="num">Failed</th><th class="num">Cancelled</th><th>Paused</th><th>Limits</th><th class="num">Workers</th></tr></thead>
<tbody>{{rows}}</tbody></table>]],
    { rows = rows_or(groups, 9, "no job groups", function(g) return group_row(g, cap) end) })
end

function views.overview(d)
  local health = render('<p id="health" class="{{c}}">Database: {{why}}</p>',
    { c = d.health_ok and "good" or "bad", why = d.health_why })
  local subs = missing(d.subscriptions, "no queue tables") or render([[
<table id="subscriptions"><thead><tr><th>Queue</th><th>Subscription</th><th>Ordered</th><th class="num">Pending</th><th class="num">Dead</th></tr></thead>
<tbody>{{rows}}</tbody></table>]], { rows = rows_or(d.subscriptions, 5, "no subscriptions", function(s)
      return render([[<tr><td>{{queue}}</td><td>{{sub}}</td><td>{{ordered}}</td><td class="num">{{pending}}</td><td class="num">{{dead}}</td></tr>]],
        { queue = s.queue, sub = s.subscription, ordered = s.ordered and "yes" or "no",
          pending = html.count(s.pending, d.cap),
          dead = s.dead > 0 and render('<a href="/queues/dead{{q}}">{{n}}</a>',
            { q = q({ { "queue", s.queue }, { "subscription", s.subscription } }),
              n = html.count(s.dead, d.cap) }) or "0" })
    end) })
  local locks = missing(d.locks, "no pgcoord.job_locks table") or render([[
<table id="locks"><thead><tr><th>Lock</th><th>Holder</th><th class="num">Token</th><th>Held for</th><th>Renewed</th></tr></thead>
<tbody>{{rows}}</tbody></table>]], { rows = rows_or(d.locks, 5, "no locks", function(l)
      return render([[<tr><td>{{name}}</td><td>{{holder}}</td><td class="num">{{token}}</td><td>{{held}}</td><td>{{renewed}}</td></tr>]],
        { name = l.name, holder = l.holder or "(released)", token = l.token,
          held = l.holder and age(l.held_for) or "-", renewed = age(l.renewed_ago) .. " ago" })
    end) })
  local outbox = missing(d.outbox, "no outbox table") or render([[
<table id="outbox"><thead><tr><th>Table</th><th class="num">Pending</th><th class="num">Failed</th></tr></thead>
<tbody>{{rows}}</tbody></table>]], { rows = rows_or(d.outbox, 3, "no outbox table", function(o)
      return render([[<tr><td>{{t}}</td><td class="num">{{pending}}</td><td class="num">{{failed}}</td></tr>]],
        { t = o.table, pending = html.count(o.pending, d.cap),
          failed = o.failed > 0 and render('<a href="/outbox/failed{{q}}">{{n}}</a>',
            { q = q({ { "table", o.table } }), n = html.count(o.failed, d.cap) }) or "0" })
    end) })
  local subscribers = render([[
<table id="subscribers"><thead><tr><th>Subscriber</th><th>State</th><th>Channels</th><th class="num">Reconnects</th><th>Last ping</th></tr></thead>
<tbody>{{rows}}</tbody></table>]], { rows = rows_or(d.subscribers, 5,
      "no subscriber in this process", function(s)
      return render([[<tr><td>{{name}}</td><td>{{state}}</td><td>{{channels}}</td><td class="num">{{reconnects}}</td><td>{{ping}}</td></tr>]],
        { name = s.name, state = s.state, channels = table.concat(s.channels or {}, ", "),
          reconnects = s.reconnects, ping = s.last_ping_age and (age(s.last_ping_age) .. " ago")
            or "-" })
    end) })
  return render([[
{{health}}
<h2>Job groups</h2>
{{groups}}
<h2>Queue subscriptions</h2>
{{subs}}
<h2>Locks</h2>
{{locks}}
<h2>Outbox</h2>
{{outbox}}
<h2>Subscribers</h2>
{{subscribers}}]], { health = health,
    groups = missing(d.groups, "no pgcoord.jobs table: run pgcoord-run --migrate")
      or groups_table(d.groups, d.cap),
    subs = subs, locks = locks, outbox = outbox, subscribers = subscribers })
end

-- ---- a group ------------------------------------------------------------------

function views.group(d, ctx)
  local g = d.group
  local actions = form(ctx, "group-actions", "/group", { { "name", g.group } }, {
    g.paused and { "resume", "Resume" } or { "pause", "Pause" },
    g.failed > 0 and { "retry-failed", "Retry all failed" } or nil,
  })
  return render([[
<p>{{paused}} Limits: {{limits}} · workers: {{workers}} {{actions}}</p>
{{table}}
<h2>The last hour</h2>
{{charts}}]], { paused = g.paused and html.trusted('<span class="paused" id="paused">paused</span>')
      or html.trusted('<span id="paused">running</span>'),
    limits = limits_text(g), workers = g.workers, actions = actions,
    table = groups_table({ g }, d.cap), charts = charts.group(d.chart, d.now) })
end

-- ---- job lists ------------------------------------------------------------------

function views.jobs(d)
  local next_link = d.next and render('<a id="next-page" href="/jobs{{q}}">Next page &rarr;</a>',
    { q = q({ { "group", d.group }, { "state", d.state }, { "type", d.type },
              { "after", d.next } }) }) or html.trusted('<span class="muted">last page</span>')
  return render([[
<p>Group {{group}} · state {{state}}</p>
<form method="get" action="/jobs" id="type-filter"><input type="hidden" name="group" value="{{g}}"><input type="hidden" name="state" value="{{state}}"><label>Type <input name="type" value="{{type}}"></label> <button>Filter</button></form>
<table id="jobs"><thead><tr><th class="num">ID</th><th>Type</th><th class="num">Priority</th><th class="num">Errors</th><th>Run at</th><th>Inserted</th><th>Last error</th></tr></thead>
<tbody>{{rows}}</tbody></table>
<nav class="pager">{{first}} {{next}}</nav>]], {
    group = group_link(d.group), g = d.group, state = d.state, type = d.type or "",
    rows = rows_or(d.rows, 7, "no jobs", function(j)
      return render([[<tr><td class="num"><a href="/jobs/{{id}}">{{id}}</a></td><td>{{type}}</td><td class="num">{{priority}}</td><td class="num">{{errors}}</td><td>{{run_at}}</td><td>{{inserted}}</td><td>{{err}}</td></tr>]],
        { id = j.id, type = j.type, priority = j.priority, errors = j.error_count,
          run_at = when(j.run_at), inserted = when(j.inserted_at),
          err = j.last_error and j.last_error:match("^[^\n]*"):sub(1, 120) or "" })
    end),
    first = d.after and render('<a href="/jobs{{q}}">&larr; First page</a>',
      { q = q({ { "group", d.group }, { "state", d.state }, { "type", d.type } }) }) or "",
    next = next_link })
end

-- ---- one job ----------------------------------------------------------------------

function views.job(job, ctx)
  local buttons = {}
  if job.state == "failed" then buttons[#buttons + 1] = { "retry", "Retry" } end
  if job.state == "ready" or job.state == "scheduled" or job.state == "running"
    or job.state == "failed" then
    buttons[#buttons + 1] = { "cancel", "Cancel" }
  end
  if job.state == "failed" or job.state == "cancelled" then
    buttons[#buttons + 1] = { "delete", "Delete" }
  end
  local actions = #buttons > 0 and form(ctx, "job-actions", "/jobs/" .. job.id, {}, buttons) or ""
  local runs = render([[
<table id="runs"><thead><tr><th class="num">Attempt</th><th>OK</th><th>Started</th><th class="num">Seconds</th><th class="num">Worker</th><th>Error</th></tr></thead>
<tbody>{{rows}}</tbody></table>]], { rows = rows_or(job.runs, 6, "no runs logged", function(r)
      return render([[<tr><td class="num">{{attempt}}</td><td class="{{c}}">{{ok}}</td><td>{{started}}</td><td class="num">{{secs}}</td><td class="num">{{worker}}</td><td>{{err}}</td></tr>]],
        { attempt = r.attempt, c = r.ok and "good" or "bad", ok = r.ok and "yes" or "no",
          started = when(r.started_at),
          secs = r.finished_at and r.started_at and ("%.3f"):format(r.finished_at - r.started_at)
            or "-", worker = r.worker_id or "-",
          err = r.error and render("<pre>{{e}}</pre>", { e = r.error }) or "" })
    end) })
  return render([[
<p>{{actions}}</p>
<dl id="job">
<dt>Group</dt><dd>{{group}}</dd><dt>Type</dt><dd>{{type}}</dd><dt>State</dt><dd id="state">{{state}}</dd>
<dt>Priority</dt><dd>{{priority}}</dd><dt>Errors</dt><dd>{{errors}}</dd><dt>Run at</dt><dd>{{run_at}}</dd>
<dt>Inserted</dt><dd>{{inserted}}</dd><dt>Key</dt><dd>{{key}}</dd>
<dt>Params</dt><dd><pre id="params">{{params}}</pre></dd>
<dt>Progress</dt><dd><pre id="progress">{{progress}}</pre></dd>
<dt>Last error</dt><dd><pre id="last-error">{{last_error}}</pre></dd>
</dl>
<h2>Runs</h2>
{{runs}}]], { actions = actions, group = job.group and group_link(job.group) or "-",
    type = job.type, state = job.state, priority = job.priority or "-",
    errors = job.error_count or "-", run_at = when(job.run_at), inserted = when(job.inserted_at),
    key = job.key or "-", params = job.params_error or html.json(job.params),
    progress = job.progress_error or html.json(job.progress),
    last_error = job.last_error or "-", runs = runs })
end

-- ---- periodic, dead letters, outbox -------------------------------------------------

function views.periodic(rows)
  return render([[
<table id="periodic"><thead><tr><th>Name</th><th>Spec</th><th>Group</th><th>Type</th><th>Time zone</th><th>Next run</th><th>Last run</th></tr></thead>
<tbody>{{rows}}</tbody></table>]], { rows = rows_or(rows, 7, "no periodic jobs", function(p)
      return render([[<tr><td>{{name}}</td><td>{{spec}}</td><td>{{group}}</td><td>{{type}}</td><td>{{tz}}</td><td>{{next}}</td><td>{{last}}</td></tr>]],
        { name = p.name, spec = p.spec, group = group_link(p.group), type = p.type,
          tz = p.timezone, next = when(p.next_run), last = when(p.last_run) })
    end) })
end

function views.dead(d, ctx)
  local fields = { { "queue", d.queue }, { "subscription", d.subscription } }
  return render([[
<p>Queue {{queue}} · subscription {{sub}} {{all}}</p>
<table id="dead"><thead><tr><th class="num">ID</th><th class="num">Deliveries</th><th>Published</th><th>Last delivered</th><th>Last error</th><th>Payload</th><th></th></tr></thead>
<tbody>{{rows}}</tbody></table>]], { queue = d.queue, sub = d.subscription,
    all = #d.rows > 0 and form(ctx, "requeue-all", "/queues/dead", fields,
      { { "requeue", "Requeue all" } }) or "",
    rows = rows_or(d.rows, 7, "no dead letters", function(m)
      local mine = { fields[1], fields[2], { "id", m.id } }
      return render([[<tr><td class="num">{{id}}</td><td class="num">{{n}}</td><td>{{pub}}</td><td>{{last}}</td><td><pre>{{err}}</pre></td><td><pre>{{payload}}</pre></td><td>{{act}}</td></tr>]],
        { id = m.id, n = m.deliveries, pub = when(m.published_at), last = when(m.last_delivered_at),
          err = m.last_error or "", payload = m.payload_error or html.json(m.payload),
          act = form(ctx, "requeue-" .. m.id, "/queues/dead", mine, { { "requeue", "Requeue" } }) })
    end) })
end

function views.outbox_failed(d, ctx)
  return render([[
<p>Table {{t}}</p>
<table id="outbox-failed"><thead><tr><th>ID</th><th>Topic</th><th>Key</th><th class="num">Retries</th><th>Created</th><th>Last error</th><th></th></tr></thead>
<tbody>{{rows}}</tbody></table>]], { t = d.table, rows = rows_or(d.rows, 7, "no failed messages",
    function(m)
      return render([[<tr><td>{{id}}</td><td>{{topic}}</td><td>{{key}}</td><td class="num">{{retries}}</td><td>{{created}}</td><td><pre>{{err}}</pre></td><td>{{act}}</td></tr>]],
        { id = m.id, topic = m.topic, key = m.key or "-", retries = m.retries,
          created = when(m.created_at), err = m.last_error or "",
          act = form(ctx, "retry-" .. m.id, "/outbox/failed",
            { { "table", d.table }, { "id", m.id } }, { { "retry", "Retry" } }) })
    end) })
end

-- ---- login and problems ---------------------------------------------------------------

function views.login(ctx, problem)
  return render([[
{{problem}}<form method="post" action="/login" id="login-form">
<input type="hidden" name="csrf" value="{{csrf}}">
<label>Token <input type="password" name="token" autocomplete="current-password"></label>
<button name="action" value="login">Log in</button></form>]],
    { csrf = ctx.csrf, problem = problem and render('<p class="problem">{{p}}</p>', { p = problem })
      or "" })
end

function views.problem(message)
  return render('<p class="problem" id="problem">{{m}}</p><p><a href="/">Back to the overview</a></p>',
    { m = message })
end

return views

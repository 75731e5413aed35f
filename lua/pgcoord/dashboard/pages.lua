-- What each page reads: page(d, args, ctx) -> title, body fragment [,
-- refresh seconds].  d is the dashboard (d.db, d.jobs, d:health(),
-- d.outbox_tables); args the checked query parameters; a missing thing
-- raises d.problem(404, ...).
local json = require "pgcoord.json"
local metrics = require "pgcoord.metrics"
local tables = require "pgcoord.tables"
local queue_module = require "pgcoord.queue"
local outbox_module = require "pgcoord.outbox"
local sql = require "pgcoord.dashboard.sql"
local views = require "pgcoord.dashboard.views"

local pages = {}

local PAGE_SIZE = 50
local MAX_ROWS = 100
local CAP = sql.CAP
-- (the overview counts every group: a lower cap keeps it as fast as one
-- group's page with a million jobs in ten groups)
local OVERVIEW_CAP = 1000

local function present(d)
  return d.db:one(sql.PRESENT, json.array(d.outbox_tables))
end

local function subscribers()
  local list, n = {}, 0
  for sub in metrics.each("subscriber") do
    n = n + 1
    local s = sub:stats()
    s.name = "subscriber" .. n
    list[n] = s
  end
  return list
end

function pages.overview(d)
  local db, p = d.db, present(d)
  local data = { cap = OVERVIEW_CAP, subscribers = subscribers() }
  data.health_ok, data.health_why = d:health()
  if p.jobs then data.groups = db:query(sql.GROUPS, MAX_ROWS, OVERVIEW_CAP) end
  if p.queues then data.subscriptions = db:query(sql.SUBSCRIPTIONS, MAX_ROWS, CAP) end
  if p.locks then data.locks = db:query(sql.LOCKS, MAX_ROWS) end
  if p.outboxes then
    data.outbox = {}
    for i, name in ipairs(p.outboxes) do
      local row = db:one(sql.outbox_counts(tables.checked("pgcoord.dashboard", name)), CAP)
      row.table = name
      data.outbox[i] = row
    end
  end
  return "Overview", views.overview(data), 5
end

function pages.group(d, args, ctx)
  local name = d.required(args, "name")
  local g = d.db:one(sql.GROUP, name, CAP)
  local any = false
  for _, s in ipairs(sql.STATES) do any = any or g[s] > 0 end
  if not (g.known or any) then d.problem(404, ("no job group named %q"):format(name)) end
  local data = { group = g, cap = CAP, chart = d.db:query(sql.CHART, name),
                 now = d.db:one(sql.NOW).now }
  return "Group " .. name, views.group(data, ctx), 10
end

local KEYED = { ready = true, scheduled = true }

-- The cursor of a page after the first: "key:id" for states paged by a key
-- and an id, "id" for the others.
local function cursor(d, state, after)
  if after == nil then return nil, nil end
  local key, id
  if KEYED[state] then
    key, id = after:match("^(%-?%d+):(%d+)$")
  else
    id = after:match("^%d+$")
    key = id
  end
  key, id = math.tointeger(tonumber(key)), math.tointeger(tonumber(id))
  if not key or not id then
    d.problem(400, ("after must be a cursor from a Next page link, got %q"):format(after))
  end
  return key, id
end

function pages.jobs(d, args)
  local group = d.required(args, "group")
  local state = d.required(args, "state")
  if not sql.LIST[state] then
    d.problem(400, ("state must be one of %s, got %q")
      :format(table.concat(sql.STATES, ", "), state))
  end
  local jtype = args.type ~= "" and args.type or nil
  local key, id = cursor(d, state, args.after)
  local rows = d.db:query(sql.LIST[state], group, jtype, key, id, PAGE_SIZE + 1)
  local data = { group = group, state = state, type = jtype, after = args.after, rows = {} }
  for i = 1, math.min(#rows, PAGE_SIZE) do data.rows[i] = rows[i] end
  if #rows > PAGE_SIZE then
    local last = rows[PAGE_SIZE]
    data.next = KEYED[state] and ("%d:%d"):format(last.key, last.id) or tostring(last.id)
  end
  return ("%s jobs of %s"):format(state, group), views.jobs(data)
end

function pages.job(d, args, ctx)
  local job = d.jobs:get(d.id(args.id))
  if not job then d.problem(404, ("no job %d"):format(args.id)) end
  return ("Job %d"):format(job.id), views.job(job, ctx)
end

function pages.periodic(d)
  local p = present(d)
  if not p.periodic then
    d.problem(404, "no pgcoord.job_periodic table: run pgcoord-run --migrate")
  end
  return "Periodic jobs", views.periodic(d.db:query(sql.PERIODIC, 500))
end

-- A queue handle for a subscription that exists, else a 404.
function pages.subscription(d, args)
  local name, sub = d.required(args, "queue"), d.required(args, "subscription")
  local q = queue_module.new(d.db, name)
  local ok, err = pcall(q.stats, q, sub)
  if not ok then
    if tostring(err):find("has no subscription", 1, true) then
      d.problem(404, ("queue %q has no subscription %q"):format(name, sub))
    end
    error(err, 0)
  end
  return q, name, sub
end

function pages.dead(d, args, ctx)
  local q, name, sub = pages.subscription(d, args)
  local rows = q:dead(sub, { limit = MAX_ROWS })
  return ("Dead letters of %s / %s"):format(name, sub),
    views.dead({ queue = name, subscription = sub, rows = rows }, ctx)
end

-- The outbox of a table the dashboard was told about, else a 404: a name
-- from the URL never picks any other table.
function pages.outbox(d, args)
  local name = d.required(args, "table")
  for _, t in ipairs(d.outbox_tables) do
    if t == name then return outbox_module.new(d.db, { table = name }), name end
  end
  d.problem(404, ("no outbox table %q (the dashboard knows %s)"):format(name,
    table.concat(d.outbox_tables, ", ")))
end

function pages.outbox_failed(d, args, ctx)
  local ob, name = pages.outbox(d, args)
  return "Failed messages of " .. name,
    views.outbox_failed({ table = name, rows = ob:failed({ limit = MAX_ROWS }) }, ctx)
end

return pages

-- The coordination state as the database holds it: job groups, queue
-- subscriptions, lock holders, outbox backlog.  Read by
-- `pgcoord-run --status` and by the metrics refresher; a database with
-- none, some or all of the tables answers with what it has.
local json = require "pgcoord.json"
local tables = require "pgcoord.tables"

local status = {}

-- Which tables exist; outboxes: those of the outbox tables $1 (a JSON list).
local PRESENT = [[
SELECT to_regclass('pgcoord.jobs') IS NOT NULL AS jobs,
       to_regclass('pgcoord.queue_deliveries') IS NOT NULL AS queues,
       to_regclass('pgcoord.job_locks') IS NOT NULL AS locks,
       (SELECT json_agg(t) FROM json_array_elements_text($1::json) t
         WHERE to_regclass(quote_ident(t)) IS NOT NULL) AS outboxes]]

local JOBS = [[
SELECT group_name AS "group",
       count(*) FILTER (WHERE state = 'ready') AS ready,
       count(*) FILTER (WHERE state = 'scheduled') AS scheduled,
       count(*) FILTER (WHERE state = 'running') AS running,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       extract(epoch FROM now() - min(run_at) FILTER (WHERE state = 'ready'))::float8
         AS oldest_ready_age
  FROM pgcoord.jobs GROUP BY group_name ORDER BY group_name]]

local QUEUES = [[
SELECT q.name AS queue, s.name AS subscription, s.ordered,
       count(d.message_id) FILTER (WHERE d.state = 'pending') AS pending,
       count(d.message_id) FILTER (WHERE d.state = 'dead') AS dead
  FROM pgcoord.queue_subscriptions s
  JOIN pgcoord.queues q ON q.id = s.queue_id
  LEFT JOIN pgcoord.queue_deliveries d ON d.subscription_id = s.id
 GROUP BY q.name, s.name, s.ordered ORDER BY q.name, s.name]]

local LOCKS = [[
SELECT name, holder, token,
       extract(epoch FROM now() - acquired_at)::float8 AS held_for,
       extract(epoch FROM now() - renewed_at)::float8 AS renewed_ago
  FROM pgcoord.job_locks ORDER BY name]]

local function outbox_counts(db, name)
  local quoted = tables.checked("pgcoord.status", name)
  -- (processed rows, however many are kept, are not read)
  local row = db:one(([[SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
      count(*) FILTER (WHERE status = 'processing') AS processing,
      count(*) FILTER (WHERE status = 'failed') AS failed
    FROM %s WHERE status <> 'processed']]):format(quoted))
  row.table = name
  return row
end

-- { jobs = {...} | nil, queues = ..., locks = ..., outbox = ... }: nil
-- where the table does not exist.  outbox_tables defaults to the default
-- outbox table name.
function status.collect(db, outbox_tables)
  outbox_tables = outbox_tables or { "outbox_messages" }
  local present = db:one(PRESENT, json.array(outbox_tables))
  local s = {}
  if present.jobs then s.jobs = db:query(JOBS) end
  if present.queues then s.queues = db:query(QUEUES) end
  if present.locks then s.locks = db:query(LOCKS) end
  if present.outboxes then
    s.outbox = {}
    for i, name in ipairs(present.outboxes) do s.outbox[i] = outbox_counts(db, name) end
  end
  return s
end

local function age(seconds)
  if not seconds then return "-" end
  if seconds < 120 then return ("%.1fs"):format(seconds) end
  if seconds < 7200 then return ("%.1fm"):format(seconds / 60) end
  return ("%.1fh"):format(seconds / 3600)
end

local function plain(rows)
  -- drop the `affected` field a result carries, for JSON output
  local out = json.array()
  for i, r in ipairs(rows or {}) do out[i] = r end
  return out
end

function status.json(s)
  return json.encode({
    jobs = s.jobs and plain(s.jobs) or json.null,
    queues = s.queues and plain(s.queues) or json.null,
    locks = s.locks and plain(s.locks) or json.null,
    outbox = s.outbox or json.null,
  })
end

-- Each section: title, field of s, what to say when the table is missing,
-- the header and row formats, and the row's values.
local SECTIONS = {
  { "job groups", "jobs", "no pgcoord.jobs table: run pgcoord-run --migrate",
    "  %-20s %8s %10s %8s %8s  %s", "  %-20s %8d %10d %8d %8d  %s",
    { "group", "ready", "scheduled", "running", "failed", "oldest ready" },
    function(g)
      return g.group, g.ready, g.scheduled, g.running, g.failed, age(g.oldest_ready_age)
    end },
  { "queue subscriptions", "queues", "no queue tables",
    "  %-20s %-20s %8s %8s %8s", "  %-20s %-20s %8s %8d %8d",
    { "queue", "subscription", "ordered", "pending", "dead" },
    function(q)
      return q.queue, q.subscription, q.ordered and "yes" or "no", q.pending, q.dead
    end },
  { "job locks", "locks", "no pgcoord.job_locks table",
    "  %-24s %-30s %8s %10s %10s", "  %-24s %-30s %8d %10s %10s",
    { "lock", "holder", "token", "held for", "renewed" },
    function(l)
      return l.name, l.holder or "(released)", l.token, l.holder and age(l.held_for) or "-",
        age(l.renewed_ago)
    end },
  { "outbox", "outbox", "no outbox table",
    "  %-24s %8s %10s %8s", "  %-24s %8d %10d %8d",
    { "table", "pending", "processing", "failed" },
    function(o) return o.table, o.pending, o.processing, o.failed end },
}

-- One screen of text.
function status.text(s)
  local out = {}
  for _, sec in ipairs(SECTIONS) do
    local title, field, missing, head, row, names, values = table.unpack(sec)
    local rows = s[field]
    out[#out + 1] = title
    if not rows then
      out[#out + 1] = "  (" .. missing .. ")"
    elseif #rows == 0 then
      out[#out + 1] = "  (none)"
    else
      out[#out + 1] = head:format(table.unpack(names))
      for _, r in ipairs(rows) do out[#out + 1] = row:format(values(r)) end
    end
  end
  return table.concat(out, "\n") .. "\n"
end

return status

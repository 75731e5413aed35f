-- The coordination state as the database holds it: job groups, queue
-- subscriptions, lock holders, outbox backlog.  Read by
-- `pgcoord-run --status` and by the metrics refresher; a database with
-- none, some or all of the tables answers with what it has.
local json = require "pgcoord.json"
local tables = require "pgcoord.tables"

local status = {}

-- Which tables exist; outboxes: those of the outbox tables $1 (a JSON list);
-- worker_running: whether workers record their running handlers (sql/010).
-- (the dashboard asks the same)
status.PRESENT = [[
SELECT to_regclass('pgcoord.jobs') IS NOT NULL AS jobs,
       to_regclass('pgcoord.queue_deliveries') IS NOT NULL AS queues,
       to_regclass('pgcoord.job_locks') IS NOT NULL AS locks,
       to_regclass('pgcoord.job_periodic') IS NOT NULL AS periodic,
       (SELECT json_agg(t) FROM json_array_elements_text($1::json) t
         WHERE to_regclass(quote_ident(t)) IS NOT NULL) AS outboxes,
       EXISTS (SELECT 1 FROM pg_attribute
                WHERE attrelid = to_regclass('pgcoord.job_workers') AND attname = 'running'
                  AND NOT attisdropped) AS worker_running]]

-- in_hand: the jobs workers claimed (state 'running'), split below into
-- those whose handler runs and those claimed and not started.
local JOBS = [[
SELECT group_name AS "group",
       count(*) FILTER (WHERE state = 'ready') AS ready,
       count(*) FILTER (WHERE state = 'scheduled') AS scheduled,
       count(*) FILTER (WHERE state = 'running') AS in_hand,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       extract(epoch FROM now() - min(run_at) FILTER (WHERE state = 'ready'))::float8
         AS oldest_ready_age
  FROM pgcoord.jobs GROUP BY group_name ORDER BY group_name]]

-- The handlers in progress per group, as of each worker's last heartbeat.
local RUNNING = [[
SELECT group_name AS "group", sum(running)::bigint AS running
  FROM pgcoord.job_workers GROUP BY group_name]]

local QUEUES = [[
SELECT q.name AS queue, s.name AS subscription, s.ordered,
       count(d.message_id) FILTER (WHERE d.state = 'pending') AS pending,
       count(d.message_id) FILTER (WHERE d.state = 'dead') AS dead
  FROM pgcoord.queue_subscriptions s
  JOIN pgcoord.queues q ON q.id = s.queue_id
  LEFT JOIN pgcoord.queue_deliveries d ON d.subscription_id = s.id
 GROUP BY q.name, s.name, s.ordered ORDER BY q.name, s.name]]

-- (the dashboard reads it with a LIMIT)
status.LOCKS = [[
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

-- The groups' counts; running: jobs whose handler runs (by the workers'
-- heartbeats, so at most in_hand), claimed: the rest of those in hand.
-- A schema before sql/010 cannot tell them apart: all count as running.
local function job_groups(db, split)
  local rows = db:query(JOBS)
  local running = {}
  if split then
    for _, r in ipairs(db:query(RUNNING)) do running[r.group] = r.running end
  end
  for _, g in ipairs(rows) do
    g.running = split and math.min(g.in_hand, running[g.group] or 0) or g.in_hand
    g.claimed = g.in_hand - g.running
    g.in_hand = nil
  end
  return rows
end

-- { jobs = {...} | nil, queues = ..., locks = ..., outbox = ... }: nil
-- where the table does not exist.  outbox_tables defaults to the default
-- outbox table name.
function status.collect(db, outbox_tables)
  outbox_tables = outbox_tables or { "outbox_messages" }
  local present = db:one(status.PRESENT, json.array(outbox_tables))
  local s = {}
  if present.jobs then s.jobs = job_groups(db, present.worker_running) end
  if present.queues then s.queues = db:query(QUEUES) end
  if present.locks then s.locks = db:query(status.LOCKS) end
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

local function yes_no(v) return v and "yes" or "no" end

-- Each section: title, field of s, what to say when the table is missing,
-- and its columns: header, the row's cell, ">" for right-aligned (counts).
local SECTIONS = {
  { "job groups", "jobs", "no pgcoord.jobs table: run pgcoord-run --migrate", {
    { "GROUP", "group" }, { "READY", "ready", ">" }, { "SCHEDULED", "scheduled", ">" },
    { "RUNNING", "running", ">" }, { "CLAIMED", "claimed", ">" }, { "FAILED", "failed", ">" },
    { "OLDEST READY", function(g) return age(g.oldest_ready_age) end } } },
  { "queue subscriptions", "queues", "no queue tables", {
    { "QUEUE", "queue" }, { "SUBSCRIPTION", "subscription" },
    { "ORDERED", function(q) return yes_no(q.ordered) end },
    { "PENDING", "pending", ">" }, { "DEAD", "dead", ">" } } },
  { "job locks", "locks", "no pgcoord.job_locks table", {
    { "LOCK", "name" }, { "HOLDER", function(l) return l.holder or "(released)" end },
    { "TOKEN", "token", ">" },
    { "HELD FOR", function(l) return l.holder and age(l.held_for) or "-" end, ">" },
    { "RENEWED", function(l) return age(l.renewed_ago) end, ">" } } },
  { "outbox", "outbox", "no outbox table", {
    { "TABLE", "table" }, { "PENDING", "pending", ">" }, { "PROCESSING", "processing", ">" },
    { "FAILED", "failed", ">" } } },
}

-- The rows as lines of columns, each as wide as its widest cell (names
-- of any length stay aligned), two spaces apart, indented by two.
local function columns(rows, cols)
  local cells, widths = {}, {}
  for j, col in ipairs(cols) do widths[j] = #col[1] end
  for i, r in ipairs(rows) do
    cells[i] = {}
    for j, col in ipairs(cols) do
      local get = col[2]
      local v
      if type(get) == "function" then v = get(r) else v = r[get] end
      local text = tostring(v == nil and "-" or v)
      cells[i][j] = text
      widths[j] = math.max(widths[j], #text)
    end
  end
  local function line(values)
    local parts = {}
    for j, text in ipairs(values) do
      local pad = (" "):rep(widths[j] - #text)
      if cols[j][3] == ">" then
        parts[j] = pad .. text
      else
        parts[j] = j < #values and text .. pad or text
      end
    end
    return "  " .. table.concat(parts, "  ")
  end
  local head = {}
  for j, col in ipairs(cols) do head[j] = col[1] end
  local out = { line(head) }
  for i = 1, #rows do out[i + 1] = line(cells[i]) end
  return out
end

-- One screen of text: per section a title, then a line per job group,
-- queue subscription, lock or outbox table.
function status.text(s)
  local out = {}
  for _, sec in ipairs(SECTIONS) do
    local title, field, missing, cols = table.unpack(sec)
    local rows = s[field]
    out[#out + 1] = title
    if not rows then
      out[#out + 1] = "  (" .. missing .. ")"
    elseif #rows == 0 then
      out[#out + 1] = "  (none)"
    else
      table.move(columns(rows, cols), 1, #rows + 1, #out + 1, out)
    end
  end
  return table.concat(out, "\n") .. "\n"
end

return status

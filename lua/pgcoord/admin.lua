-- pgcoord-run jobs|queue|outbox COMMAND ...: a look at, and a hand in,
-- what the database holds, from the shell.  Each command is an entry of
-- COMMANDS: its words, its arguments and flags (checked here, so that a
-- usage error never reaches the database), the method of the primitive it
-- needs when that comes with a feature a build may lack, and run(c, ...)
-- -> exit status.  Output is aligned for people, or JSON with --json.
-- Exit status: 0 done, 1 failed (or not every id was acted on), 2 usage.
local json = require "pgcoord.json"
local log = require "pgcoord.log"
local db = require "pgcoord.db"
local task = require "pgcoord.task"
local jobs_module = require "pgcoord.jobs"
local queue_module = require "pgcoord.queue"
local outbox_module = require "pgcoord.outbox"

local admin = {}

local USAGE_ERROR, FAILED = 2, 1

local STATES = { ready = true, scheduled = true, running = true, failed = true, cancelled = true }
local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"
local MAX_LIMIT = 100000

-- ---- output ---------------------------------------------------------------------

local function when(t)
  if type(t) ~= "number" then return "-" end
  return os.date("!%Y-%m-%d %H:%M:%SZ", math.floor(t))
end

-- One line of at most max characters (errors carry tracebacks).
local function short(s, max)
  if s == nil then return "-" end
  s = tostring(s):match("^[^\n]*")
  max = max or 60
  if #s > max then s = s:sub(1, max - 3) .. "..." end
  return s
end

local function encoded(v)
  if v == nil then return "-" end
  local ok, s = pcall(json.encode, v)
  return ok and s or tostring(v)
end

-- Rows as columns aligned under headers: columns = { { "HEADER", fn(row) }, ... }.
local function print_table(rows, columns, none)
  if #rows == 0 then
    io.stdout:write("(", none, ")\n")
    return
  end
  local cells, widths = {}, {}
  for j, col in ipairs(columns) do widths[j] = #col[1] end
  for i, row in ipairs(rows) do
    cells[i] = {}
    for j, col in ipairs(columns) do
      local s = tostring(col[2](row))
      cells[i][j] = s
      if #s > widths[j] then widths[j] = #s end
    end
  end
  local function line(values)
    local parts = {}
    for j, v in ipairs(values) do
      parts[j] = j < #values and v .. (" "):rep(widths[j] - #v) or v
    end
    io.stdout:write(table.concat(parts, "  "), "\n")
  end
  local head = {}
  for j, col in ipairs(columns) do head[j] = col[1] end
  line(head)
  for i = 1, #rows do line(cells[i]) end
end

local function print_json(value)
  io.stdout:write(json.encode(value), "\n")
end

local function list_json(rows)
  local out = json.array()
  for i, r in ipairs(rows) do out[i] = r end
  return out
end

-- "done n of m": exit 0 when every id was acted on.
local function report_count(c, verb, what, n, m)
  if c.json then
    print_json({ [verb] = n, requested = m })
  else
    io.stdout:write(("%s %d of %d %s\n"):format(verb, n, m, what))
  end
  return n == m and 0 or FAILED
end

-- "paused G": done to one thing.
local function report_done(c, verb, what)
  if c.json then print_json({ [verb] = what }) else io.stdout:write(verb, " ", what, "\n") end
  return 0
end

-- ---- the commands -----------------------------------------------------------------

local JOB_COLUMNS = {
  { "ID", function(j) return j.id end },
  { "GROUP", function(j) return j.group end },
  { "TYPE", function(j) return j.type end },
  { "STATE", function(j) return j.state end },
  { "ERRORS", function(j) return j.error_count end },
  { "RUN_AT", function(j) return when(j.run_at) end },
  { "LAST_ERROR", function(j) return short(j.last_error) end },
}

local RUN_COLUMNS = {
  { "ATTEMPT", function(r) return r.attempt end },
  { "OK", function(r) return r.ok and "yes" or "no" end },
  { "STARTED", function(r) return when(r.started_at) end },
  { "SECONDS", function(r)
      return r.finished_at and r.started_at and ("%.3f"):format(r.finished_at - r.started_at)
        or "-"
    end },
  { "WORKER", function(r) return r.worker_id or "-" end },
  { "ERROR", function(r) return short(r.error) end },
}

-- jobs:get when the build has it (state, progress, runs); else the job's
-- row and its logged runs, and a job whose row is gone by its last run.
local function get_job(jobs, id)
  if jobs.get then return jobs:get(id) end
  local job = jobs:list({ id = id, limit = 1 })[1]
  local runs = jobs:runs(id)
  if not job then
    local last = runs[#runs]
    if not last then return nil end
    job = { id = id, group = last.group, type = last.type,
            state = last.ok and "completed" or "deleted" }
  end
  job.runs = runs
  return job
end

local SHOW_FIRST = { "id", "group", "type", "state", "priority", "error_count", "run_at",
                     "inserted_at", "locked_by", "last_error", "params" }
local TIMES = { run_at = true, inserted_at = true }

local function show_job(job)
  local names, seen = {}, { runs = true }
  for _, k in ipairs(SHOW_FIRST) do
    if job[k] ~= nil then names[#names + 1] = k end
    seen[k] = true
  end
  local rest = {}
  for k in pairs(job) do
    if type(k) == "string" and not seen[k] then rest[#rest + 1] = k end
  end
  table.sort(rest)
  for _, k in ipairs(rest) do names[#names + 1] = k end
  local width = 0
  for _, k in ipairs(names) do width = math.max(width, #k) end
  for _, k in ipairs(names) do
    local v = job[k]
    local text
    if TIMES[k] or k:match("_at$") then text = when(v)
    elseif type(v) == "table" or k == "params" or k == "progress" then text = encoded(v)
    else text = tostring(v) end
    io.stdout:write(k, (" "):rep(width - #k + 2), text, "\n")
  end
  io.stdout:write("runs\n")
  print_table(job.runs or {}, RUN_COLUMNS, "no runs logged")
end

local COMMANDS = {
  { "jobs", "list", flags = { group = "name", state = "state", limit = "limit" },
    run = function(c, flags)
      local rows = c:jobs():list({ group = flags.group, state = flags.state,
                                   limit = flags.limit })
      if c.json then print_json(list_json(rows)) else print_table(rows, JOB_COLUMNS, "no jobs") end
      return 0
    end },
  { "jobs", "show", args = { "ID" },
    run = function(c, id)
      local job = get_job(c:jobs(), id)
      if not job then
        io.stderr:write(("pgcoord-run: jobs show: no job %d\n"):format(id))
        return FAILED
      end
      if c.json then
        job.runs = list_json(job.runs or {})
        print_json(job)
      else
        show_job(job)
      end
      return 0
    end },
  { "jobs", "retry", args = { "ID..." },
    run = function(c, ids)
      return report_count(c, "retried", "jobs (only failed jobs are retried)",
        c:jobs():retry(ids), #ids)
    end },
  { "jobs", "cancel", args = { "ID..." }, needs = "cancel",
    run = function(c, ids)
      local n = c:jobs():cancel(ids)
      if type(n) ~= "number" then
        print_json(n)
        return 0
      end
      return report_count(c, "cancelled", "jobs", n, #ids)
    end },
  { "jobs", "pause", args = { "GROUP" }, needs = "pause",
    run = function(c, group)
      -- (from the shell no job type is defined: any group name goes)
      jobs_module.set_paused(c:db(), group, true, "jobs pause")
      return report_done(c, "paused", group)
    end },
  { "jobs", "resume", args = { "GROUP" }, needs = "resume",
    run = function(c, group)
      jobs_module.set_paused(c:db(), group, false, "jobs resume")
      return report_done(c, "resumed", group)
    end },
  { "jobs", "periodic", needs = "periodic_list",
    run = function(c)
      local rows = c:jobs():periodic_list()
      if c.json then print_json(list_json(rows)) return 0 end
      print_table(rows, {
        { "NAME", function(p) return p.name end },
        { "SPEC", function(p) return p.spec end },
        { "GROUP", function(p) return p.group or "-" end },
        { "NEXT_RUN", function(p) return when(p.next_run) end },
        { "LAST_RUN", function(p) return when(p.last_run) end },
      }, "no periodic jobs")
      return 0
    end },
  { "queue", "dead", args = { "NAME", "SUB" }, flags = { limit = "limit" },
    run = function(c, name, sub, flags)
      local rows = queue_module.new(c:db(), name):dead(sub, { limit = flags.limit })
      if c.json then print_json(list_json(rows)) return 0 end
      print_table(rows, {
        { "ID", function(m) return m.id end },
        { "DELIVERIES", function(m) return m.deliveries end },
        { "PUBLISHED", function(m) return when(m.published_at) end },
        { "LAST_DELIVERED", function(m) return when(m.last_delivered_at) end },
        { "LAST_ERROR", function(m) return short(m.last_error, 40) end },
        { "PAYLOAD", function(m) return short(m.payload_error or encoded(m.payload), 40) end },
      }, "no dead letters")
      return 0
    end },
  { "queue", "requeue", args = { "NAME", "SUB", "ID..." },
    run = function(c, name, sub, ids)
      return report_count(c, "requeued", "dead letters",
        queue_module.new(c:db(), name):requeue_dead(sub, ids), #ids)
    end },
  { "outbox", "failed", args = { "TABLE" }, flags = { limit = "limit" },
    run = function(c, tbl, flags)
      local rows = outbox_module.new(c:db(), { table = tbl }):failed({ limit = flags.limit })
      if c.json then print_json(list_json(rows)) return 0 end
      print_table(rows, {
        { "ID", function(m) return m.id end },
        { "TOPIC", function(m) return m.topic end },
        { "KEY", function(m) return m.key or "-" end },
        { "RETRIES", function(m) return m.retries end },
        { "CREATED", function(m) return when(m.created_at) end },
        { "LAST_ERROR", function(m) return short(m.last_error, 40) end },
      }, "no failed messages")
      return 0
    end },
  { "outbox", "retry", args = { "TABLE", "UUID..." },
    run = function(c, tbl, ids)
      return report_count(c, "retried", "messages (only failed messages are retried)",
        outbox_module.new(c:db(), { table = tbl }):retry(ids), #ids)
    end },
}

admin.GROUPS = { jobs = true, queue = true, outbox = true }

local FLAG_WORDS = { name = "G", state = "S", limit = "N" }
local FLAG_ORDER = { "group", "state", "limit" }

local function usage_of(cmd)
  local words = { "pgcoord-run", cmd[1], cmd[2] }
  for _, a in ipairs(cmd.args or {}) do words[#words + 1] = a end
  for _, f in ipairs(FLAG_ORDER) do
    local kind = cmd.flags and cmd.flags[f]
    if kind then words[#words + 1] = ("[--%s %s]"):format(f, FLAG_WORDS[kind]) end
  end
  words[#words + 1] = "[--json]"
  return table.concat(words, " ")
end

-- The usage lines of a group's commands (every group's when group is nil).
function admin.help(group)
  local lines = {}
  for _, cmd in ipairs(COMMANDS) do
    if group == nil or cmd[1] == group then lines[#lines + 1] = "  " .. usage_of(cmd) end
  end
  return table.concat(lines, "\n") .. "\n"
end

-- ---- arguments ----------------------------------------------------------------------

local function usage_error(text, cmd, group)
  io.stderr:write("pgcoord-run: ", text, "\n")
  if cmd then
    io.stderr:write("usage: ", usage_of(cmd), "\n")
  else
    io.stderr:write("usage:\n", admin.help(group))
  end
  return USAGE_ERROR
end

-- An id: a positive integer in decimal (one bigint holds).
local function parse_id(s)
  local n = s:match("^%d+$") and math.tointeger(tonumber(s))
  if n and n > 0 then return n end
  return nil
end

local FLAG_CHECKS = {
  name = function(v) return v ~= "" and v or nil, "a non-empty name" end,
  state = function(v)
    return STATES[v] and v or nil, "one of ready, scheduled, running, failed, cancelled"
  end,
  limit = function(v)
    local n = parse_id(v)
    return n and n <= MAX_LIMIT and n or nil, ("an integer from 1 to %d"):format(MAX_LIMIT)
  end,
}

-- Parses words after the command; returns values for run (positional
-- arguments, then the flags table) and json, or nil and the problem.
local function parse_args(cmd, words, json_flag)
  local positional, flags, i = {}, {}, 1
  local only_positional = false
  while i <= #words do
    local w = words[i]
    if w == "--" and not only_positional then
      only_positional = true
    elseif only_positional or w:sub(1, 2) ~= "--" then
      positional[#positional + 1] = w
    elseif w == "--json" then
      json_flag = true
    else
      local name = w:sub(3)
      local kind = cmd.flags and cmd.flags[name]
      if not kind then return nil, ("unknown option %s"):format(w) end
      local v = words[i + 1]
      if v == nil then return nil, ("option %s needs a value"):format(w) end
      local value, want = FLAG_CHECKS[kind](v)
      if value == nil then
        return nil, ("option %s takes %s, got %q"):format(w, want, v)
      end
      flags[name] = value
      i = i + 1
    end
    i = i + 1
  end
  local out, k = {}, 1
  for _, spec in ipairs(cmd.args or {}) do
    local name, many = spec:match("^(%u+)(%.?%.?%.?)$")
    many = many == "..."
    if positional[k] == nil then return nil, ("missing %s"):format(name) end
    local values = {}
    repeat
      local w = positional[k]
      local v = w
      if name == "ID" then
        v = parse_id(w)
        if not v then return nil, ("%q is not an id (a positive integer)"):format(w) end
      elseif name == "UUID" then
        if not w:match(UUID) then
          return nil, ("%q is not a message id (a UUID)"):format(w)
        end
      elseif w == "" then
        return nil, ("%s must not be empty"):format(name)
      end
      values[#values + 1] = v
      k = k + 1
    until not many or positional[k] == nil
    out[#out + 1] = many and values or values[1]
  end
  if positional[k] ~= nil then
    return nil, ("unexpected argument %q"):format(positional[k])
  end
  out[#out + 1] = flags
  return out, json_flag
end

-- ---- running ------------------------------------------------------------------------

local Context = {}
Context.__index = Context

function Context:db()
  if not self.pool then
    self.pool = db.connect(nil, { size = 1, params = { application_name = "pgcoord-admin" } })
  end
  return self.pool
end

function Context:jobs()
  if not self.jobs_object then self.jobs_object = jobs_module.new(self:db()) end
  return self.jobs_object
end

local function find(group, name)
  for _, cmd in ipairs(COMMANDS) do
    if cmd[1] == group and cmd[2] == name then return cmd end
  end
  return nil
end

-- pgcoord-run GROUP WORDS...: o is pgcoord-run's options (json, log_level).
-- Returns the exit status.
function admin.main(group, words, o)
  local name = words[1]
  if name == nil then return usage_error(("%s: give a command"):format(group), nil, group) end
  if name == "-h" or name == "--help" then
    io.stdout:write("usage:\n", admin.help(group))
    return 0
  end
  local cmd = find(group, name)
  if not cmd then
    return usage_error(("unknown %s command %q"):format(group, name), nil, group)
  end
  local rest = { table.unpack(words, 2) }
  for _, w in ipairs(rest) do
    if w == "-h" or w == "--help" then
      io.stdout:write("usage: ", usage_of(cmd), "\n")
      return 0
    end
  end
  local args, json_flag = parse_args(cmd, rest, o.json)
  if not args then return usage_error(("%s %s: %s"):format(group, name, json_flag), cmd) end
  -- (what a command did is its output: info lines would only repeat it)
  if not o.log_level then log.set_level("warn") end
  local c = setmetatable({ json = json_flag }, Context)
  local ok, status = pcall(function()
    if cmd.needs and not c:jobs()[cmd.needs] then
      io.stderr:write(("pgcoord-run: %s %s is not available in this build\n"):format(group, name))
      return FAILED
    end
    return cmd.run(c, table.unpack(args))
  end)
  if c.pool then pcall(c.pool.close, c.pool) end
  if not ok then
    io.stderr:write(("pgcoord-run: %s %s: %s\n"):format(group, name,
      log.redact(task.error_text(status))))
    return FAILED
  end
  return status
end

return admin

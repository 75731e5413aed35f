-- The pgcoord side of scripts/bench/jobs, run by pgcoord-run:
--   jobs.lua throughput GROUP JOBS CONCURRENCY LOG [VACUUM]
--       schedules JOBS no-op jobs with schedule_many (one statement), runs
--       VACUUM ANALYZE on pgcoord.jobs and job_runs (unless VACUUM is
--       "novacuum": autovacuum alone then), then times one worker with
--       CONCURRENCY draining them; LOG is "all" (default history logging)
--       or "none" (should_log_run returns false); the worker's other
--       options are its defaults, but prefetch from $BENCH_PREFETCH and
--       flush_count from $BENCH_FLUSH when they are set.  Prints
--       "jobs=N seconds=S rate=R ... cpu=C" (C: this process's CPU seconds
--       in the timed window)
--   jobs.lua share GROUP JOBS CONCURRENCY PROCESSES [stay]
--       one of PROCESSES processes (pgcoord-run --workers) working down
--       the JOBS jobs already in GROUP with a worker of CONCURRENCY each:
--       once all PROCESSES are connected (each adds a row to
--       bench_ready), each starts its worker and, once the group has no
--       job left, prints "t0=.. t1=.. handled=N cpu=C" (t0, t1 on the
--       machine's monotonic clock, which every process shares); with
--       "stay", it then waits to be stopped (SIGTERM), as the supervisor
--       of --workers restarts a process that ends
--   jobs.lua waits
--       samples pg_stat_activity (the other backends that are active) and
--       pg_locks (requests not granted) every 10 ms until stopped (SIGTERM);
--       then prints "samples=N active=A lock_waits=W", a line per wait
--       event seen, most frequent first: "wait TYPE:EVENT N" (CPU: none),
--       and the same by statement: "statement NAME TYPE:EVENT N" (NAME as
--       in lua/pgcoord/jobs/sql.lua, lower case, "a/b" for statements that
--       begin alike; "other" for the rest)
--   jobs.lua statement NAME
--       prints the statement NAME of lua/pgcoord/jobs/sql.lua
--   jobs.lua latency GROUP JOBS CONCURRENCY
--       an idle worker; JOBS single jobs scheduled one at a time with
--       schedule_now from a pool of its own, each once the last one has
--       started.  Prints "jobs=N p50_ms=.. p99_ms=.. max_ms=.. mean_ms=.."
--   jobs.lua pgbench-script CLAIM FLUSH
--       prints a pgbench script made of the CLAIM and FLUSH statements of
--       lua/pgcoord/jobs/sql.lua (their text, read from the file): one
--       transaction claims up to CLAIM jobs of group :grp for worker :wid,
--       turns the claimed rows into result batches of FLUSH like the
--       worker's (log = :log), and writes each batch with FLUSH
--
-- Throughput, defined: t0 is taken just before jobs:worker() is called,
-- with the jobs committed and the process connected and migrated; t1 is
-- the first moment, after the last handler returned, at which none of
-- the run's jobs is left in pgcoord.jobs (completed jobs are deleted by
-- the batched result write, so that is when the last completion was
-- written); that is polled every millisecond, only once the last handler
-- has returned.  rate = JOBS / (t1 - t0).  The poll reads the run's range
-- of ids by the primary key, so that jobs of the group that are not the
-- run's (scripts/bench/jobs-big fills the table with later and failed
-- ones) are neither taken for the run's nor read on each poll.
local pgcoord = require "pgcoord"

package.path = (arg[0]:match("^(.*/)") or "./") .. "?.lua;" .. package.path
local bench = require "benchlib"
local say = bench.say

local args = bench.args("jobs.lua", ...)
local mode = args.mode


-- A poll of whether none of group's jobs with ids lo..hi is left: a
-- function that returns true once none is.  It asks for the lowest id
-- left and starts the next poll there: the jobs below it are gone for good
-- (a retry keeps its row), and their dead entries, at the front of the
-- range, are not read again on each poll.  A count would read every row
-- left, and the planner ran it as a parallel scan, which starts worker
-- processes on each poll: in "share" that fell on the processes still
-- working (IPC:ExecuteGather and BgWorkerShutdown were a tenth of the
-- backends' samples in jobs-workers).
local function none_left_poll(db, group, lo, hi)
  lo, hi = lo or 0, hi or math.maxinteger
  return function()
    local row = db:one([[SELECT id FROM pgcoord.jobs
                          WHERE group_name = $1 AND id BETWEEN $2 AND $3
                          ORDER BY id LIMIT 1]], group, lo, hi)
    if row == nil then return true end
    lo = row.id
    return false
  end
end

-- $NAME as an integer; nil when unset (the worker's default then).
local function env_integer(name)
  local v = os.getenv(name)
  if v == nil or v == "" then return nil end
  return math.tointeger(tonumber(v)) or error(("%s must be an integer, got %s"):format(name, v))
end

local wait_for = bench.wait_for

if mode == "throughput" then
  local group = args[2]
  local n, concurrency = args:integer(3, "JOBS"), args:integer(4, "CONCURRENCY")
  local log_runs = args[5] or "all"
  assert(log_runs == "all" or log_runs == "none", "LOG must be all or none")
  local vacuum = (args[6] or "vacuum") ~= "novacuum"
  local db = pgcoord.connect(nil, { size = 4 })
  pgcoord.migrate(db)
  local jobs = pgcoord.jobs(db)
  local done = 0
  jobs:define("noop", function() done = done + 1 end, { group = group })
  local list = {}
  for i = 1, n do list[i] = { type = "noop", params = {} } end
  local ids = jobs:schedule_many(db, list)
  assert(#ids == n, "schedule_many inserted " .. #ids)
  local lo, hi = math.huge, -math.huge
  for _, id in ipairs(ids) do lo, hi = math.min(lo, id), math.max(hi, id) end
  if vacuum then
    db:exec("VACUUM ANALYZE pgcoord.jobs")
    db:exec("VACUUM ANALYZE pgcoord.job_runs")
  end
  local runs_before = db:one("SELECT count(*)::int AS n FROM pgcoord.job_runs").n
  local cpu0 = os.clock()

  local t0 = pgcoord.now()
  local w = jobs:worker({
    group = group, concurrency = concurrency,
    prefetch = env_integer("BENCH_PREFETCH"), flush_count = env_integer("BENCH_FLUSH"),
    should_log_run = log_runs == "none" and function() return false end or nil,
  })
  wait_for(function() return done >= n end, 300, "last handler")
  local t_handlers = pgcoord.now()
  wait_for(none_left_poll(db, group, lo, hi), 60, "empty table")
  local t1 = pgcoord.now()
  local cpu = os.clock() - cpu0

  w:shutdown()
  local logged = db:one("SELECT count(*)::int AS n FROM pgcoord.job_runs").n - runs_before
  db:close()
  local seconds = t1 - t0
  say(("jobs=%d seconds=%.4f rate=%.1f handlers_done_at=%.4f logged=%d cpu=%.3f")
    :format(n, seconds, n / seconds, t_handlers - t0, logged, cpu))

elseif mode == "latency" then
  local group = args[2]
  local n, concurrency = args:integer(3, "JOBS"), args:integer(4, "CONCURRENCY")
  local warmup = 50
  local db = pgcoord.connect(nil, { size = 4 })
  pgcoord.migrate(db)
  local producer = pgcoord.connect(nil, { size = 1 })
  local jobs = pgcoord.jobs(db)
  local started_at = {}
  local started = pgcoord.fanout("bench_jobs_started") -- local wake-ups only
  local waiter = started:listen()
  jobs:define("ping", function(job)
    started_at[job.params.i] = pgcoord.now()
    started:notify(job.params.i)
  end, { group = group })
  -- a subscriber connected before the worker starts: once ready() returns
  -- the worker is listening
  local sub = pgcoord.subscriber(db)
  sub:start()
  wait_for(function() return sub:connected() end, 10, "LISTEN connection")
  local w = jobs:worker({ group = group, concurrency = concurrency, poll_interval = 10,
                          subscriber = sub })
  w:ready()
  local sent_at = {}
  for i = 1, warmup + n do
    sent_at[i] = pgcoord.now()
    jobs:schedule_now(producer, "ping", { i = i })
    local got, err = waiter:receive(5)
    if got ~= i then error(("job %d: got %s (%s)"):format(i, tostring(got), tostring(err))) end
  end
  w:shutdown()
  sub:stop()
  waiter:close()
  producer:close()
  db:close()

  local waits = {}
  for i = warmup + 1, warmup + n do waits[#waits + 1] = started_at[i] - sent_at[i] end
  say(bench.latency_line("jobs", waits))

elseif mode == "share" then
  local group = args[2]
  local n, concurrency = args:integer(3, "JOBS"), args:integer(4, "CONCURRENCY")
  local processes = args:integer(5, "PROCESSES")
  local db = pgcoord.connect(nil, { size = 4 })
  local jobs = pgcoord.jobs(db)
  local handled = 0
  jobs:define("noop", function() handled = handled + 1 end, { group = group })
  local range = db:one([[SELECT min(id) AS lo, max(id) AS hi FROM pgcoord.jobs
                          WHERE group_name = $1]], group)
  -- every process connected before any starts: the clock then starts with
  -- all of them, as it starts with the one worker in "throughput"
  db:exec("INSERT INTO bench_ready (pid) VALUES (pg_backend_pid())")
  wait_for(function()
    return db:one("SELECT count(*)::int AS n FROM bench_ready").n >= processes
  end, 30, "other processes")
  local cpu0 = os.clock()
  local t0 = pgcoord.now()
  local w = jobs:worker({ group = group, concurrency = concurrency,
    prefetch = env_integer("BENCH_PREFETCH"), flush_count = env_integer("BENCH_FLUSH") })
  -- the database is asked only while this process's handlers are idle (a
  -- millisecond without a job done), so that the polls do not load it
  -- while the work goes on
  local seen, none_left = -1, none_left_poll(db, group, range.lo, range.hi)
  wait_for(function()
    if handled ~= seen then
      seen = handled
      return false
    end
    return none_left()
  end, 300, "empty table")
  local t1 = pgcoord.now()
  local cpu = os.clock() - cpu0
  w:shutdown()
  db:close()
  say(("t0=%.6f t1=%.6f handled=%d cpu=%.3f jobs=%d"):format(t0, t1, handled, cpu, n))
  if args[6] == "stay" then
    while not pgcoord.stopping() do pgcoord.sleep(0.05) end
  end

elseif mode == "waits" then
  -- each active backend's statement named as in jobs/sql.lua (by its
  -- first 80 characters, blanks squeezed: pg_stat_activity cuts long ones;
  -- statements that begin alike share a name, "hand_back/unclaim")
  local function head(text) return text:gsub("%s+", " "):gsub("^ ", ""):sub(1, 80) end
  local alike = {}
  for name, text in pairs(require("pgcoord.jobs.sql")) do
    if type(text) == "string" and #text > 20 then
      local h = head(text)
      alike[h] = alike[h] or {}
      table.insert(alike[h], name:lower())
    end
  end
  local names = {}
  for h, list in pairs(alike) do
    table.sort(list)
    names[h] = table.concat(list, "/")
  end
  local db = pgcoord.connect(nil, { size = 1 })
  local samples, active, lock_waits, events, by_statement = 0, 0, 0, {}, {}
  while not pgcoord.stopping() do
    local rows = db:query([[
      SELECT a.pid, a.query, COALESCE(a.wait_event_type || ':' || a.wait_event, 'CPU') AS event,
             (SELECT count(*)::int FROM pg_locks WHERE NOT granted) AS ungranted
        FROM (SELECT 1) one
        LEFT JOIN pg_stat_activity a
          ON a.pid <> pg_backend_pid() AND a.datname = current_database()
         AND a.backend_type = 'client backend' AND a.state = 'active']])
    samples = samples + 1
    lock_waits = lock_waits + rows[1].ungranted
    for _, r in ipairs(rows) do
      if r.pid ~= nil then -- (no active backend: one row of NULLs)
        active = active + 1
        events[r.event] = (events[r.event] or 0) + 1
        local key = (names[head(r.query)] or "other") .. " " .. r.event
        by_statement[key] = (by_statement[key] or 0) + 1
      end
    end
    pgcoord.sleep(0.01)
  end
  db:close()
  say(("samples=%d active=%d lock_waits=%d"):format(samples, active, lock_waits))
  local keys = {}
  for k in pairs(events) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return events[a] > events[b] end)
  for _, k in ipairs(keys) do say(("wait %s %d"):format(k, events[k])) end
  keys = {}
  for k in pairs(by_statement) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return by_statement[a] > by_statement[b] end)
  for _, k in ipairs(keys) do say(("statement %s %d"):format(k, by_statement[k])) end

elseif mode == "statement" then
  local name = args[2]
  local text = require("pgcoord.jobs.sql")[name]
  if type(text) ~= "string" then
    error(("jobs.lua statement: no statement %s"):format(tostring(name)))
  end
  say(text)

elseif mode == "pgbench-script" then
  local path = assert(package.searchpath("pgcoord.jobs.sql", package.path))
  local f = assert(io.open(path, "rb"))
  local source = f:read("a")
  f:close()
  local function statement(name)
    local sql = source:match("\nlocal " .. name .. " = %[%[\n?(.-)%]%]")
    if not sql then error(("no %s statement in %s"):format(name, path)) end
    return sql
  end
  -- $n -> the text given for it (pgbench variables, sent as parameters
  -- with -M extended)
  local function bind(sql, values)
    return (sql:gsub("%$(%d+)", function(i)
      return assert(values[tonumber(i)], "unexpected parameter $" .. i)
    end))
  end
  -- CLAIM is "WITH c AS (UPDATE ...) SELECT ... FROM c ...": its CTE heads
  -- the script's own chain (a data-modifying WITH cannot be nested)
  local claim_size, flush_size = args:integer(2, "CLAIM"), args:integer(3, "FLUSH")
  assert(claim_size % flush_size == 0, "CLAIM must be a multiple of FLUSH")
  local batches = claim_size // flush_size
  local claim = bind(statement("CLAIM"), { ":grp", ":wid", tostring(claim_size),
                                            "(extract(epoch FROM clock_timestamp()) * 1e6)" })
    :match("^(WITH c AS %b())")
  assert(claim, "CLAIM no longer starts with WITH c AS (...)")
  local flush = statement("FLUSH")
  -- each batch of flush_size claimed jobs as FLUSH's arrays: ids done, and the
  -- runs to log (none when :log is false)
  local columns = {
    { "d", "id" }, { "i", "id", true }, { "t", "type", true }, { "a", "error_count + 1", true },
    { "o", "true", true }, { "s", "(extract(epoch FROM clock_timestamp()) * 1e6)::bigint", true },
    { "f", "(extract(epoch FROM clock_timestamp()) * 1e6)::bigint", true },
  }
  local aggs, picks = {}, {}
  for _, col in ipairs(columns) do
    local agg = ("array_agg(%s ORDER BY id)"):format(col[2])
    if col[3] then agg = ("CASE WHEN :log::boolean THEN %s ELSE '{}' END"):format(agg) end
    aggs[#aggs + 1] = ("  %s::text AS %s"):format(agg, col[1])
    for b = 1, batches do
      picks[#picks + 1] = ("  COALESCE(max(%s) FILTER (WHERE b = %d), '{}') AS %s%d")
        :format(col[1], b - 1, col[1], b)
    end
  end
  local out = { ("-- pgcoord's CLAIM (up to %d jobs), then its FLUSH in batches of %d.")
    :format(claim_size, flush_size),
    "-- Made by scripts/bench/jobs.lua from " .. path .. ".",
    claim .. ",",
    ("n AS (SELECT (row_number() OVER (ORDER BY id) - 1) / %d AS b, * FROM c),")
      :format(flush_size),
    "a AS (SELECT b,", table.concat(aggs, ",\n"), "FROM n GROUP BY b)",
    "SELECT", table.concat(picks, ",\n"), "FROM a", "\\gset" }
  for b = 1, batches do
    local v = function(name) return ":" .. name .. b end
    out[#out + 1] = bind(flush, { v "d", "'[]'", v "i", v "t", v "a", v "o", v "s", v "f",
                                  ":wid", ":grp" }) .. ";"
  end
  say(table.concat(out, "\n"))

else
  error(("jobs.lua: unknown mode %s (throughput, share, waits, latency, statement"
    .. " or pgbench-script)"):format(tostring(mode)))
end

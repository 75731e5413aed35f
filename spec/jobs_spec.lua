-- The job runner against a real server: scheduling (run_at, transactions,
-- NOTIFY, batches, keys, priorities), the worker (concurrency, retries,
-- failed jobs, run history, shutdown) and its failures (a server restart,
-- a SIGKILLed worker process, two worker processes on one group).
--
-- Every test works in a group of its own (helper.unique), so that no test
-- sees another's jobs in the shared pgcoord.jobs table.
local pgcoord = require "pgcoord"
local helper = require "helper"

local db          -- the spec's pool: scheduling and looking
local fixture = helper.started()
local pools = {}

local function pool(opts, conninfo)
  local p, app = helper.connect(opts, conninfo)
  pools[#pools + 1] = p
  return p, app
end

-- A worker stopped after the test (at once: running handlers cancelled).
local function worker(jobs, opts)
  return fixture:worker(jobs, opts)
end

-- A subscriber given to a worker (option subscriber): the worker is
-- listening once ready() returns, and gets no wake-up from the
-- subscriber's first connection (which could run jobs no test asked for).
local function connected_subscriber()
  return fixture:subscriber(db)
end

local function count_jobs(group, state)
  return db:one([[SELECT count(*)::int AS n FROM pgcoord.jobs
                   WHERE group_name = $1 AND ($2::text IS NULL OR state = $2)]], group, state).n
end

-- The database's clock, epoch seconds.
local function db_time(pool_or_tx) return helper.db_time(pool_or_tx or db) end

local errors = helper.error_of

-- A table of completions, one row per job: a second completion of a job
-- bumps runs.
local function done_table()
  local name = helper.unique("jobs_done")
  db:exec(("CREATE TABLE %s (job_id bigint PRIMARY KEY, worker text, runs int NOT NULL DEFAULT 1)")
    :format(name))
  return name
end

local function done_count(tbl)
  return db:one(("SELECT count(*)::int AS n, COALESCE(max(runs), 0) AS max_runs FROM %s")
    :format(tbl))
end

-- Runs fn(tx) in a transaction of its own pool and holds it open until
-- the function returned is called: end_tx() commits, end_tx(false) rolls
-- back.
local ROLL_BACK = setmetatable({}, { __tostring = function() return "roll back" end })
local function hold_tx(fn)
  local holder_pool = pool({ size = 1 })
  local held, failure, ending, commit = false, nil, false, true
  local holder = helper.spawn(function()
    local ok, err = pcall(holder_pool.tx, holder_pool, function(tx)
      fn(tx)
      held = true
      helper.wait_until(function() return ending end, 20, "the transaction's end")
      if not commit then error(ROLL_BACK, 0) end
    end)
    if not ok and err ~= ROLL_BACK then failure = err end
  end)
  helper.wait_until(function() return held or failure end, 5, "the transaction to begin")
  if failure then error(failure, 0) end
  return function(commit_it)
    commit, ending = commit_it ~= false, true
    holder:join()
    if failure then error(failure, 0) end
  end
end

-- Takes a table lock (lock: the LOCK TABLE statement) in a transaction
-- of its own pool, held until the function returned is called.
local function hold_lock(lock)
  return hold_tx(function(tx) tx:exec(lock) end)
end

setup(function()
  db = helper.connect({ size = 8 })
  pgcoord.migrate(db)
end)

teardown(function()
  if db then db:close() end
end)

after_each(function()
  fixture:stop()
  for _, p in ipairs(pools) do pcall(p.close, p) end
  pools = {}
  helper.cleanup()
end)

describe("scheduling jobs", function()
  it("does not start a job before its run_at by the database clock, and starts it soon after",
    function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local seen
    jobs:define("later", function(job)
      seen = { job = job, started = db_time() }
    end, { group = g })
    worker(jobs, { group = g, poll_interval = 30 })
    local at = db_time() + 1
    local id = jobs:schedule(db, "later", { n = 42 }, { run_at = at })
    assert.are.equal("scheduled", db:one("SELECT state FROM pgcoord.jobs WHERE id = $1", id).state)
    helper.wait_until(function() return seen end, 5, "the job to run")
    assert.is_true(seen.started >= at, ("started %.4f s before run_at"):format(at - seen.started))
    assert.is_true(seen.started < at + 0.5,
      ("started %.4f s after run_at"):format(seen.started - at))
    local job = seen.job
    assert.are.equal(id, job.id)
    assert.are.equal("later", job.type)
    assert.are.equal(g, job.group)
    assert.are.same({ n = 42 }, job.params)
    assert.are.equal(0, job.error_count)
    assert.is_nil(job.last_error)
    assert.is_true(math.abs(job.run_at - at) < 0.001, "run_at came back as " .. job.run_at)
    assert.is_true(job.inserted_at <= job.run_at)
    helper.wait_until(function() return count_jobs(g) == 0 end, 5, "the finished job to go")
  end)

  it("joins the caller's transaction: rollback leaves no job; commit wakes an idle worker at once",
    function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local ran = {}
    jobs:define("tx", function(job)
      ran[#ran + 1] = { n = job.params.n, at = pgcoord.now() }
    end, { group = g })
    worker(jobs, { group = g, poll_interval = 60, subscriber = connected_subscriber() })

    local ok, err = pcall(db.tx, db, function(tx)
      jobs:schedule_now(tx, "tx", { n = 1 })
      jobs:schedule_many(tx, { { type = "tx", params = { n = 2 } } })
      assert.are.equal(2, tx:one(
        "SELECT count(*)::int AS n FROM pgcoord.jobs WHERE group_name = $1", g).n)
      error("changed my mind")
    end)
    assert.is_false(ok)
    assert.matches("changed my mind", tostring(err), 1, true)
    assert.are.equal(0, count_jobs(g))

    local t0
    db:tx(function(tx)
      jobs:schedule_now(tx, "tx", { n = 3 })
      -- not visible (nor runnable) before the commit
      assert.are.equal(0, count_jobs(g))
      t0 = pgcoord.now()
    end)
    helper.wait_until(function() return #ran == 1 end, 5, "the committed job to run")
    local latency = ran[1].at - t0
    assert.are.equal(3, ran[1].n)
    assert.is_true(latency < 1, ("took %.3f s with poll_interval 60"):format(latency))
    helper.wait_until(function() return count_jobs(g) == 0 end, 5, "the job to be deleted")
    assert.are.equal(1, #ran)
  end)

  it("w:signal() makes an idle worker look for jobs at once", function()
    local g = helper.unique("jg")
    local wdb, app = pool({ size = 2 })
    local jobs = pgcoord.jobs(wdb)
    local ran = 0
    jobs:define("quiet", function() ran = ran + 1 end, { group = g })
    local w = worker(jobs, { group = g, poll_interval = 60, subscriber = connected_subscriber() })
    helper.wait_until(function()
      for _, b in ipairs(helper.backends(app)) do
        if b.state == "idle" and b.query:find("SET state = 'running'", 1, true) then return true end
      end
    end, 5, "the worker's first claim to be over")
    -- inserted behind the runner's back: no NOTIFY
    db:exec([[INSERT INTO pgcoord.jobs (group_name, type, state, params)
              VALUES ($1, 'quiet', 'ready', '{}')]], g)
    w:signal()
    helper.wait_until(function() return ran == 1 end, 2, "the signalled worker to run the job")
  end)

  it("schedule_many inserts a batch in one statement, with params, run_at and priorities",
    function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    jobs:define("many", function() end, { group = g })
    local later = db_time() + 3600
    local ids = jobs:schedule_many(db, {
      { type = "many", params = { a = 1, list = { "x", "y" } } },
      { type = "many", params = "just a string", priority = -3 },
      { type = "many" },
      { type = "many", params = { b = true }, run_at = later, key = helper.unique("k") },
    })
    assert.are.equal(4, #ids)
    local rows = db:query([[
      SELECT id, state, priority, params, extract(epoch FROM run_at)::float8 AS at
        FROM pgcoord.jobs WHERE group_name = $1 ORDER BY id]], g)
    assert.are.equal(4, #rows)
    for i = 1, 4 do assert.are.equal(ids[i], rows[i].id) end
    assert.are.same({ a = 1, list = { "x", "y" } }, rows[1].params)
    assert.are.equal("just a string", rows[2].params)
    assert.are.equal(-3, rows[2].priority)
    assert.is_true(rows[3].params == nil or rows[3].params == pgcoord.null)
    assert.are.same({ "ready", "ready", "ready", "scheduled" },
      { rows[1].state, rows[2].state, rows[3].state, rows[4].state })
    assert.is_true(math.abs(rows[4].at - later) < 0.001)
    assert.are.same({}, jobs:schedule_many(db, {}))
  end)

  it("rejects bad input with a clear error and writes nothing", function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    jobs:define("good", function() end, { group = g })
    local function sched(...)
      local id = jobs:schedule(db, ...) -- not a tail call: errors name this line
      return id
    end

    local function fails(msg, fn, ...) assert.matches(msg, errors(fn, ...), 1, true) end
    fails("unknown job type \"nope\"", sched, "nope", {})
    fails("unknown group \"no_such_group\"", sched, "good", {}, { group = "no_such_group" })
    fails("params cannot be encoded as JSON", sched, "good", { f = function() end })
    fails("params cannot be encoded as JSON", sched, "good", { 0 / 0 })
    fails("run_at must be a time", sched, "good", {}, { run_at = "tomorrow" })
    fails("run_at must be a time", sched, "good", {}, { run_at = 0 / 0 })
    fails("run_at must be a time", sched, "good", {}, { run_at = {} })
    fails("priority must be an integer", sched, "good", {}, { priority = 1.5 })
    fails("key must be a non-empty string", sched, "good", {}, { key = "" })
    fails('jobs:schedule "good": key contains a NUL byte', sched, "good", {}, { key = "a\0b" })
    fails('jobs:schedule "good": key is not valid UTF-8', sched, "good", {}, { key = "a\xffb" })
    fails("unknown job type", jobs.schedule_now, jobs, db, "nope", {})
    -- the error points at the caller
    fails("jobs_spec.lua", sched, "nope")
    -- one bad item spoils the whole batch
    fails("run_at must be a time", jobs.schedule_many, jobs, db,
      { { type = "good" }, { type = "good", run_at = "soon" }, { type = "good" } })
    fails("item 2 is not a table", jobs.schedule_many, jobs, db, { { type = "good" }, 42 })
    fails("expected a list", jobs.schedule_many, jobs, db, "good")
    fails("retry_at: time must be epoch seconds", pgcoord.retry_at, "noon")
    for _, t in ipairs({ math.huge, -math.huge, 0 / 0, 1e300, 253402300800 }) do
      fails("run_at must be a time in epoch seconds from -62135596800 to 253402300799"
        .. " (years 1 to 9999), got " .. tostring(t), sched, "good", {}, { run_at = t })
      fails("pgcoord.retry_at: time must be epoch seconds from -62135596800 to 253402300799"
        .. " (years 1 to 9999), got " .. tostring(t), pgcoord.retry_at, t, "why")
    end
    assert.is_table(pgcoord.retry_at(253402300799, "the last second of year 9999"))
    fails("priority must be an integer from -2147483648 to 2147483647, got 2147483648", sched,
      "good", {}, { priority = 2147483648 })

    -- definitions
    fails("type must be a non-empty string", jobs.define, jobs, "", print)
    fails("handler must be a function", jobs.define, jobs, "x", nil)
    fails("retry.max must be an integer >= 0", jobs.define, jobs, "x", print,
      { retry = { max = -1 } })
    fails("retry.base_delay must be a number >= 0", jobs.define, jobs, "x", print,
      { retry = { base_delay = "1" } })
    for _, d in ipairs({ math.huge, 1e300, 1e9 + 1, -1, 0 / 0 }) do
      local shown = math.type(d) == "float" and ("%.14g"):format(d) or tostring(d)
      fails('jobs:define "x": option retry.base_delay must be a number >= 0 and <= 1000000000,'
        .. " got " .. shown, jobs.define, jobs, "x", print, { retry = { base_delay = d } })
    end
    fails("jobs:define: option group must be a string, got 5", jobs.define, jobs, "x", print,
      { group = 5 })
    fails("jobs:define: type contains a NUL byte", jobs.define, jobs, "x\0y", print)
    fails('jobs:define "x": group is not valid UTF-8', jobs.define, jobs, "x", print,
      { group = "g\xff" })
    fails("expected a pool", pgcoord.jobs, nil)

    -- worker options
    local function bad_worker(msg, opts) fails(msg, jobs.worker, jobs, opts) end
    bad_worker("unknown option \"concurency\"", { group = g, concurency = 2 })
    bad_worker("jobs:worker: option concurrency must be an integer >= 1 and <= 10000, got 0",
      { group = g, concurrency = 0 })
    bad_worker("option concurrency must be an integer >= 1", { group = g, concurrency = 2.5 })
    bad_worker('option prefetch must be an integer >= 1 and <= 100000, got "10"',
      { group = g, prefetch = "10" })
    bad_worker("option poll_interval must be a number >= 0.01", { group = g, poll_interval = -1 })
    bad_worker("option flush_age must be a number >= 0.01", { group = g, flush_age = 0 / 0 })
    bad_worker("option should_log_run must be", { group = g, should_log_run = true })
    bad_worker("reclaim_after (1) must exceed heartbeat_interval (2)",
      { group = g, heartbeat_interval = 2, reclaim_after = 1 })
    bad_worker("unknown group \"elsewhere\"", { group = "elsewhere" })
    bad_worker("options must be a table", "fast")
    -- intervals that would make a loop spin, a concurrency that would stall
    -- it while its tasks start, sizes and times the server cannot take
    local intervals = { "poll_interval", "flush_age", "heartbeat_interval", "reclaim_after" }
    for _, name in ipairs(intervals) do
      bad_worker(("option %s must be a number >= 0.01 and <= 1000000, got 1e-09")
        :format(name), { group = g, [name] = 1e-9 })
      bad_worker(("option %s must be a number >= 0.01 and <= 1000000, got inf"):format(name),
        { group = g, [name] = math.huge })
    end
    bad_worker("option concurrency must be an integer >= 1 and <= 10000, got 1000000",
      { group = g, concurrency = 1000000 })
    bad_worker("option prefetch must be an integer >= 1 and <= 100000, got 1000000",
      { group = g, prefetch = 1000000 })
    bad_worker("option flush_count must be an integer >= 1 and <= 100000",
      { group = g, flush_count = 1000000 })
    -- the bounds themselves are fine
    local w = worker(jobs, { group = g, concurrency = 10000, poll_interval = 0.01,
      flush_age = 0.01, heartbeat_interval = 0.01, reclaim_after = 0.02 })
    w:shutdown(0)

    assert.are.equal(0, count_jobs(g))
    assert.are.equal(0, db:one(
      "SELECT count(*)::int AS n FROM pgcoord.job_workers WHERE group_name = $1", g).n)
  end)

  it("errors about a time name the function, the option and the value, at the caller's line",
    function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    jobs:define("good", function() end, { group = g })
    -- (the line of each call, for the error's position)
    local line = debug.getinfo(1, "l").currentline
    local e1 = errors(function() jobs:schedule(db, "good", {}, { run_at = math.huge }) end)
    local e2 = errors(function() jobs:schedule_many(db, { { type = "good" },
      { type = "good", run_at = math.huge } }) end)
    local e3 = errors(function() jobs:schedule_many(db, { { type = "good", run_at = 1e300 } }) end)
    assert.matches(("jobs_spec.lua:%d: jobs:schedule \"good\": run_at must be a time in epoch"
      .. " seconds from %%-62135596800 to 253402300799 %%(years 1 to 9999%%), got inf$")
      :format(line + 1), e1)
    assert.matches(("jobs_spec.lua:%d: jobs:schedule_many %%(item 2%%) \"good\": run_at must be a"
      .. " time in epoch seconds .*, got inf$"):format(line + 2), e2)
    assert.matches(("jobs_spec.lua:%d: jobs:schedule_many %%(item 1%%) \"good\": run_at must be a"
      .. " time .*, got 1e%%+300$"):format(line + 4), e3)
    for _, e in ipairs({ e1, e2, e3 }) do
      assert.is_nil(e:find("jobs.lua", 1, true), e)
      assert.is_nil(e:find("infinite", 1, true), e)
    end
    assert.are.equal(0, count_jobs(g))
  end)

  it("refuses unknown options of every function that takes them, at the caller's line",
    function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    jobs:define("good", function() end, { group = g })
    local two = { { type = "good" }, { type = "good", delay = 5 } }
    -- (the line of each call, for the error's position)
    local line = debug.getinfo(1, "l").currentline
    local e = {
      errors(function() pgcoord.jobs(db, { subscribr = 1 }) end),
      errors(function() jobs:define("x", print, { grup = g }) end),
      errors(function() jobs:define("x", print, { retry = { maxx = 1 } }) end),
      errors(function() jobs:schedule(db, "good", {}, { delay = 5 }) end),
      errors(function() jobs:schedule_many(db, two) end),
      errors(function() jobs:worker({ group = g, concurency = 2 }) end),
      errors(function() jobs:failed({ grup = g }) end),
      errors(function() jobs:worker({ group = g, concurrency = 0 }) end),
      errors(function() jobs:define("x", print, { retry = { max = -1 } }) end),
      errors(function() jobs:failed({ limit = "ten" }) end),
    }
    local want = {
      'unknown option "subscribr" for pgcoord.jobs',
      'unknown option "grup" for jobs:define',
      'unknown option "retry.maxx" for jobs:define',
      'unknown option "delay" for jobs:schedule',
      'unknown option "delay" for jobs:schedule_many (item 2)',
      'unknown option "concurency" for jobs:worker',
      'unknown option "grup" for jobs:failed',
      "jobs:worker: option concurrency must be an integer >= 1 and <= 10000, got 0",
      'jobs:define "x": option retry.max must be an integer >= 0, got -1',
      'jobs:failed: option limit must be an integer >= 0, got "ten"',
    }
    for i, msg in ipairs(want) do
      local at = ("jobs_spec.lua:%d: "):format(line + 1 + i)
      assert.are.equal(at .. msg, e[i]:match("jobs_spec%.lua:.*$"), e[i])
      assert.is_nil(e[i]:find("pgcoord/jobs", 1, true), e[i])
    end
    assert.are.equal(0, count_jobs(g))
  end)

  it("a key makes a job unique until it has run, and is free again after", function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local ran = {}
    jobs:define("keyed", function(job) ran[#ran + 1] = job.id end, { group = g })
    local k, k2, k3 = helper.unique("key"), helper.unique("key"), helper.unique("key")
    local function keyed(key) return { type = "keyed", key = key } end

    local id1 = jobs:schedule(db, "keyed", { v = 1 }, { key = k })
    assert.is_number(id1)
    local id, msg = jobs:schedule(db, "keyed", { v = 2 }, { key = k })
    assert.is_nil(id)
    assert.matches(("an unfinished job already has key %q"):format(k), msg, 1, true)
    -- a job waiting for a later run_at holds its key too
    assert.is_number(jobs:schedule(db, "keyed", {}, { key = k3, run_at = db_time() + 3600 }))
    assert.is_nil((jobs:schedule(db, "keyed", {}, { key = k3 })))
    -- in a batch, only the free key goes in
    local ids = jobs:schedule_many(db, { keyed(k), keyed(k2) })
    assert.are.equal(1, #ids)
    assert.are.equal(1, db:one("SELECT count(*)::int AS n FROM pgcoord.jobs WHERE key = $1", k).n)

    worker(jobs, { group = g, poll_interval = 30 })
    helper.wait_until(function()
      return db:one("SELECT count(*)::int AS n FROM pgcoord.jobs WHERE key = $1", k).n == 0
    end, 5, "the keyed job to run")
    local id3 = jobs:schedule(db, "keyed", { v = 3 }, { key = k })
    assert.is_number(id3)
    assert.are_not.equal(id1, id3)
    helper.wait_until(function()
      for _, r in ipairs(ran) do if r == id3 then return true end end
    end, 5, "the re-keyed job to run")
  end)

  it("priorities order ready jobs: lower numbers first, then older jobs", function()
    for _, prefetch in ipairs({ 1, 1000 }) do
      local g = helper.unique("jg")
      local jobs = pgcoord.jobs(db)
      local order = {}
      jobs:define("p", function(job) order[#order + 1] = job.id end, { group = g })
      local prios = { 3, 1, 2, 1, -5, 0, 2, 3, 100, -5 }
      local list = {}
      for i, p in ipairs(prios) do list[i] = { type = "p", priority = p } end
      local ids = jobs:schedule_many(db, list)
      local want = {}
      for i, id in ipairs(ids) do want[i] = { id = id, p = prios[i] } end
      table.sort(want, function(a, b)
        if a.p ~= b.p then return a.p < b.p end
        return a.id < b.id
      end)
      for i, x in ipairs(want) do want[i] = x.id end
      worker(jobs, { group = g, concurrency = 1, prefetch = prefetch, poll_interval = 30 })
      helper.wait_until(function() return #order == #prios end, 5, "all jobs to run")
      assert.are.same(want, order, "prefetch " .. prefetch)
    end
  end)

  it("claims ready jobs that a finished transaction locked or updated, in order", function()
    -- (the claim passes over rows touched by transactions beside it: these
    -- were touched by ones that ended, and must not wait for good)
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local order = {}
    jobs:define("p", function(job) order[#order + 1] = job.id end, { group = g })
    local ids = jobs:schedule_many(db, { { type = "p" }, { type = "p" }, { type = "p" },
                                         { type = "p" } })
    local lock = "SELECT id FROM pgcoord.jobs WHERE id = $1 FOR UPDATE"
    assert.is_false(pcall(db.tx, db, function(tx) tx:query(lock, ids[1]); error("roll back") end))
    db:tx(function(tx) tx:query(lock, ids[2]) end)
    assert.is_false(pcall(db.tx, db, function(tx)
      tx:exec("UPDATE pgcoord.jobs SET priority = priority WHERE id = $1", ids[3])
      error("roll back")
    end))
    local touched = db:one([[SELECT count(*)::int AS n FROM pgcoord.jobs
                              WHERE id = ANY($1::bigint[]) AND xmax <> '0']], "{" ..
      table.concat(ids, ",") .. "}").n
    assert.are.equal(3, touched, "the first three rows carry their lockers' xmax")
    worker(jobs, { group = g, concurrency = 1, prefetch = 1, poll_interval = 30 })
    helper.wait_until(function() return #order == #ids end, 5, "all jobs to run")
    assert.are.same(ids, order)
  end)
end)

describe("a worker", function()
  it("never runs more handlers at once than its concurrency", function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local active, most, finished = 0, 0, 0
    jobs:define("busy", function(job)
      active = active + 1
      if active > most then most = active end
      if job.params.i % 2 == 0 then
        pgcoord.sleep(0.01)
      else
        db:exec("SELECT pg_sleep(0.01)")
      end
      active = active - 1
      finished = finished + 1
    end, { group = g })
    local list = {}
    for i = 1, 80 do list[i] = { type = "busy", params = { i = i } } end
    jobs:schedule_many(db, list)
    local w = worker(jobs, { group = g, concurrency = 4, prefetch = 10, poll_interval = 30 })
    local polled = 0
    helper.wait_until(function()
      polled = math.max(polled, w:stats().running)
      return finished == 80
    end, 20, "80 jobs to finish")
    assert.are.equal(4, most, "most handlers at once")
    assert.is_true(polled <= 4, "stats().running reached " .. polled)
    helper.wait_until(function() return count_jobs(g) == 0 end, 5, "the results to be written")
  end)

  it("writes results 500 at a time by default: one full claim, one statement", function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local ran, release = 0, false
    jobs:define("step", function()
      ran = ran + 1
      -- the 301st run holds on: the worker is busy, no idle flush
      while ran == 301 and not release do pgcoord.sleep(0.01) end
    end, { group = g })
    -- (two full claims: whichever lands first holds more than 300)
    local list = {}
    for i = 1, 1100 do list[i] = { type = "step", params = { i = i } } end
    jobs:schedule_many(db, list)
    local w = worker(jobs, { group = g, concurrency = 1, poll_interval = 30, flush_age = 60 })
    helper.wait_until(function() return ran == 301 end, 20, "300 jobs to run")
    -- (with flush_count 100, three batches would be on their way by now)
    assert.are.equal(300, w:stats().unflushed)
    release = true
    helper.wait_until(function() return count_jobs(g) == 0 end, 20, "the results to be written")
  end)

  it("the completed counter is exact at a scrape, results written or not", function()
    local metrics = require "pgcoord.metrics"
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local hold = true
    jobs:define("counted", function() end, { group = g })
    jobs:define("held", function() while hold do pgcoord.sleep(0.01) end end, { group = g })
    local list = { { type = "held", priority = 2 } }
    for i = 1, 3 do list[#list + 1] = { type = "counted", priority = 1, params = { i = i } } end
    jobs:schedule_many(db, list)
    -- (one runner, busy with the held job: the three results stay unwritten)
    local w = worker(jobs, { group = g, concurrency = 1, poll_interval = 30, flush_age = 60 })
    helper.wait_until(function() return w:stats().handled == 3 end, 20, "three runs")
    assert.are.equal(3, w:stats().unflushed)
    local line = ('pgcoord_jobs_completed_total{group="%s",type="counted"} 3\n'):format(g)
    assert.truthy(metrics.render():find(line, 1, true))
    hold = false
    helper.wait_until(function() return count_jobs(g) == 0 end, 20, "the results to be written")
    assert.truthy(metrics.render():find(line, 1, true)) -- (counted once)
  end)

  it("vacuums pgcoord.jobs itself once it wrote vacuum_every results; 0 never does", function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    jobs:define("step", function() end, { group = g })
    local function server_vacuums()
      return db:one([[SELECT vacuum_count::int AS n FROM pg_stat_user_tables
                       WHERE relid = 'pgcoord.jobs'::regclass]]).n
    end
    local function run_ten(opts)
      local list = {}
      for i = 1, 10 do list[i] = { type = "step" } end
      jobs:schedule_many(db, list)
      local w = worker(jobs, opts)
      helper.wait_until(function() return count_jobs(g) == 0 end, 10, "the jobs to run")
      return w
    end
    local before = server_vacuums()
    local w = run_ten({ group = g, vacuum_every = 10, flush_count = 5, poll_interval = 30 })
    helper.wait_until(function() return w:stats().vacuums == 1 end, 10, "the worker's vacuum")
    assert.is_true(server_vacuums() > before, "the server counted no vacuum")
    w:stop()
    local never = run_ten({ group = g, vacuum_every = 0, flush_count = 5, poll_interval = 30 })
    never:stop() -- (a stop waits for a vacuum on its way: one would be counted by now)
    assert.are.equal(0, never:stats().vacuums)
    local err = errors(function() jobs:worker({ group = g, vacuum_every = -1 }) end)
    assert.matches("vacuum_every", err)
  end)

  it("starts no job while a full batch of results waits for a writer: what is unwritten"
    .. " stays near concurrency + 3 x flush_count", function()
    local g = helper.unique("jg")
    local wdb, app = pool({ size = 6 })
    local jobs = pgcoord.jobs(wdb)
    local ran = 0
    jobs:define("quick", function() ran = ran + 1 end, { group = g })
    -- results cannot be written while job_runs is locked (claims go on)
    local unlock = hold_lock("LOCK TABLE pgcoord.job_runs IN EXCLUSIVE MODE")
    local list = {}
    for i = 1, 200 do list[i] = { type = "quick", params = { i = i } } end
    jobs:schedule_many(db, list)
    local o = { group = g, concurrency = 2, flush_count = 10, poll_interval = 60 }
    local w = worker(jobs, o)
    local ok, err = pcall(helper.wait_until, function()
      local s = w:stats()
      return s.queued > 0 and s.running == 0 and helper.admin():one([[
        SELECT count(*)::int AS n FROM pg_stat_activity
         WHERE application_name = $1 AND wait_event_type = 'Lock']], app).n == 2
    end, 10, "two writers waiting and the runners holding off")
    unlock()
    assert(ok, err)
    -- (each batch may take the results of the runs that were under way)
    assert.is_true(ran <= o.concurrency + 3 * (o.flush_count + o.concurrency), "ran " .. ran)
    helper.wait_until(function() return count_jobs(g) == 0 end, 10, "every job to be done")
  end)

  it("retries a failing job after base_delay x attempt, counting attempts", function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local runs = {}
    jobs:define("flaky", function(job)
      runs[#runs + 1] = { started = db_time(), run_at = job.run_at, error_count = job.error_count,
                          last_error = job.last_error }
      if job.error_count < 2 then error(("fail #%d"):format(job.error_count + 1)) end
    end, { group = g, retry = { max = 2, base_delay = 0.3 } })
    helper.capture_log(function()
      worker(jobs, { group = g, poll_interval = 30, flush_age = 0.05 })
      local id = jobs:schedule_now(db, "flaky", {})
      helper.wait_until(function() return #runs == 3 and count_jobs(g) == 0 end, 10,
        "three attempts and the job's end")
      assert.are.same({ 0, 1, 2 },
        { runs[1].error_count, runs[2].error_count, runs[3].error_count })
      assert.is_nil(runs[1].last_error)
      assert.matches("fail #1", runs[2].last_error, 1, true)
      assert.matches("fail #2", runs[3].last_error, 1, true)
      for i = 2, 3 do
        local delay = 0.3 * (i - 1)
        local gap = runs[i].started - runs[i - 1].started
        assert.is_true(gap >= delay, ("attempt %d came %.3f s after the last, before %.1f s")
          :format(i, gap, delay))
        assert.is_true(gap < delay + 0.7, ("attempt %d came %.3f s after the last; delay %.1f s")
          :format(i, gap, delay))
        assert.is_true(runs[i].started >= runs[i].run_at, "ran before its run_at")
      end
      local history = db:query([[SELECT attempt, ok, error FROM pgcoord.job_runs
                                   WHERE job_id = $1 ORDER BY attempt]], id)
      assert.are.equal(3, #history)
      assert.are.same({ 1, 2, 3 }, { history[1].attempt, history[2].attempt, history[3].attempt })
      assert.are.same({ false, false, true }, { history[1].ok, history[2].ok, history[3].ok })
      assert.matches("fail #2", history[2].error, 1, true)
      assert.is_nil(history[3].error)
    end)
  end)

  it("keeps a due time learnt while a promotion is on its way (its snapshot may miss it)",
    function()
    -- A retry written while PROMOTE runs is not in PROMOTE's snapshot: the
    -- promotion must not forget it, or the retry waits for the next poll.
    local maintenance = require "pgcoord.jobs.maintenance"
    local g = helper.unique("jg")
    local entered = false
    local slow = setmetatable({ one = function(_, ...)
      entered = true
      pgcoord.sleep(0.1) -- (the retry's write lands meanwhile)
      return db:one(...)
    end }, { __index = db })
    local m = maintenance.new(slow, g, 10, 60, {})
    local promotion = pgcoord.spawn(m.promote, m)
    helper.wait_until(function() return entered end, 5, "the promotion to start")
    local due = pgcoord.now() + 0.5
    m:due(due)
    assert.is_true(promotion:wait(5), "the promotion did not end")
    assert.are.equal(due, m:next_due())
  end)

  it("promotes past due jobs other transactions hold, and leaves them as those made them",
    function()
    -- PROMOTE locks with SKIP LOCKED and updates what it locked: a job a
    -- transaction holds is neither waited for nor overwritten, and comes
    -- due again at the next promotion if that transaction let it be.
    local jobs_sql = require "pgcoord.jobs.sql"
    local task = require "pgcoord.task"
    local g = helper.unique("jg")
    local ids = {}
    for i = 1, 3 do
      ids[i] = db:one([[INSERT INTO pgcoord.jobs (group_name, type, state, run_at)
        VALUES ($1, 'p', 'scheduled', now() - interval '1 second') RETURNING id]], g).id
    end
    local cancel = hold_tx(function(tx)
      tx:exec("UPDATE pgcoord.jobs SET state = 'cancelled' WHERE id = $1", ids[1])
    end)
    local hold = hold_tx(function(tx)
      tx:query("SELECT id FROM pgcoord.jobs WHERE id = $1 FOR UPDATE", ids[2])
    end)
    local function promote() -- (a wait for a held row would end in a timeout)
      return task.with_timeout(5, db.one, db, jobs_sql.PROMOTE, g).promoted
    end
    local function states()
      local out = {}
      for i, id in ipairs(ids) do
        out[i] = db:one("SELECT state FROM pgcoord.jobs WHERE id = $1", id).state
      end
      return out
    end
    assert.are.equal(1, promote())
    cancel()
    hold(false)
    assert.are.same({ "cancelled", "scheduled", "ready" }, states())
    assert.are.equal(1, promote())
    assert.are.same({ "cancelled", "ready", "ready" }, states())
    assert.are.equal(0, promote())
  end)

  it("claims what a promotion readied while empty claims were on their way", function()
    -- Claims whose snapshot came before a promotion's commit come back
    -- empty after it: the group is not empty for that, or the job waits
    -- for the next poll (30 s).
    local g = helper.unique("jg")
    local p = pool()
    local jobs_sql = require "pgcoord.jobs.sql"
    local slow, in_claim = false, 0
    local query = p.query
    p.query = function(self, q, ...)
      if q ~= jobs_sql.CLAIM then return query(self, q, ...) end
      in_claim = in_claim + 1
      local r = table.pack(pcall(query, self, q, ...))
      if slow then pgcoord.sleep(1) end -- (the answer is late: the promotion lands first)
      in_claim = in_claim - 1
      if not r[1] then error(r[2], 0) end
      return table.unpack(r, 2, r.n)
    end
    local jobs = pgcoord.jobs(p)
    local ran = false
    jobs:define("later", function() ran = true end, { group = g })
    worker(jobs, { group = g, poll_interval = 30 })
    helper.wait_until(function() return in_claim == 0 end, 5, "the first claims to land")
    slow = true
    -- its NOTIFY starts claims at once, and the promotion 0.3 s later
    jobs:schedule(db, "later", {}, { run_at = db_time() + 0.3 })
    helper.wait_until(function() return ran end, 5, "the job to run")
  end)

  it("starts no job while three batches of results are unwritten, however slow the writes",
    function()
    -- (what a pause or a crash reruns stays within concurrency + 3 x
    -- flush_count, as the README says)
    local jobs_sql = require "pgcoord.jobs.sql"
    local g = helper.unique("jg")
    local p = pool()
    local one = p.one
    p.one = function(self, q, ...)
      if q == jobs_sql.FLUSH then pgcoord.sleep(0.3) end -- (a loaded server)
      return one(self, q, ...)
    end
    local jobs = pgcoord.jobs(p)
    local ran = 0
    jobs:define("quick", function() ran = ran + 1 end, { group = g })
    local n = 30
    local list = {}
    for i = 1, n do list[i] = { type = "quick" } end
    jobs:schedule_many(db, list)
    worker(jobs, { group = g, concurrency = 2, flush_count = 2, poll_interval = 30 })
    helper.wait_until(function() return count_jobs(g) < n end, 5, "a batch to be written")
    local started = ran
    local unwritten = started - (n - count_jobs(g))
    assert.is_true(unwritten <= 2 + 3 * 2, ("%d runs unwritten"):format(unwritten))
    helper.wait_until(function() return count_jobs(g) == 0 end, 20, "every job to end")
  end)

  it("retries at the time given by pgcoord.retry_at, whatever base_delay says", function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local runs, at = {}, nil
    jobs:define("later", function(job)
      runs[#runs + 1] = { started = db_time(), error_count = job.error_count,
                          last_error = job.last_error }
      if job.error_count == 0 then
        at = db_time() + 0.5
        error(pgcoord.retry_at(at, "not yet"))
      end
    end, { group = g, retry = { max = 1, base_delay = 60 } })
    worker(jobs, { group = g, poll_interval = 30, flush_age = 0.05 })
    jobs:schedule_now(db, "later", {})
    helper.wait_until(function() return #runs == 2 end, 5, "the second attempt")
    assert.is_true(runs[2].started >= at, ("ran %.3f s early"):format(at - runs[2].started))
    assert.is_true(runs[2].started < at + 0.5, ("ran %.3f s late"):format(runs[2].started - at))
    assert.are.equal(1, runs[2].error_count)
    assert.are.equal("not yet", runs[2].last_error)
  end)

  it("keeps a job as failed after its last attempt; jobs:failed lists it, jobs:retry reruns it",
    function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local broken, runs = true, 0
    jobs:define("fragile", function()
      runs = runs + 1
      if broken then error("still broken") end
    end, { group = g, retry = { max = 1, base_delay = 0.05 } })
    jobs:define("once", function() error("no retries") end, { group = g, retry = { max = 0 } })
    helper.capture_log(function()
      worker(jobs, { group = g, poll_interval = 30, flush_age = 0.05 })
      local id = jobs:schedule_now(db, "fragile", { v = 7 })
      local id0 = jobs:schedule_now(db, "once", {})
      helper.wait_until(function() return count_jobs(g, "failed") == 2 end, 10, "two failed jobs")
      assert.are.equal(2, runs)
      local failed = jobs:failed({ group = g })
      assert.are.equal(2, #failed)
      local f = failed[1]
      assert.are.equal(id, f.id)
      assert.are.equal("fragile", f.type)
      assert.are.equal(g, f.group)
      assert.are.same({ v = 7 }, f.params)
      assert.is_nil(f.params_error)
      assert.are.equal(2, f.error_count)
      assert.matches("still broken", f.last_error, 1, true)
      assert.are.equal(id0, failed[2].id)
      assert.are.equal(1, failed[2].error_count)
      local anywhere = false
      for _, r in ipairs(jobs:failed({ limit = 100000 })) do anywhere = anywhere or r.id == id end
      assert.is_true(anywhere, "jobs:failed() without a group misses it")

      broken = false
      assert.are.equal(1, jobs:retry(id))
      helper.wait_until(function() return runs == 3 and count_jobs(g, "failed") == 1 end, 5,
        "the retried job to run")
      helper.wait_until(function() return count_jobs(g) == 1 end, 5, "the retried job to go")
      assert.are.equal(0, jobs:retry({ id }))
      assert.are.equal(id0, jobs:failed({ group = g })[1].id)
    end)
  end)

  it("logs runs exactly whatever the type name and error text hold", function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local odd_type = 'odd "type", {with} \\ and ,'
    local odd_error = 'it said "no", {really}\\ NULL'
    jobs:define(odd_type, function(job)
      if job.error_count == 0 then error(odd_error, 0) end
    end, { group = g, retry = { max = 1, base_delay = 0.05 } })
    local id = jobs:schedule_now(db, odd_type, {})
    helper.capture_log(function()
      worker(jobs, { group = g, poll_interval = 30, flush_age = 0.05 })
      helper.wait_until(function() return count_jobs(g) == 0 end, 5, "the job to end")
    end)
    local rows = db:query([[SELECT attempt, ok, type, error FROM pgcoord.job_runs
                            WHERE job_id = $1 ORDER BY attempt]], id)
    assert.are.equal(2, #rows)
    assert.are.same({ 1, false, odd_type }, { rows[1].attempt, rows[1].ok, rows[1].type })
    -- the error as raised, then the handler's traceback
    assert.are.equal(odd_error .. "\n", rows[1].error:sub(1, #odd_error + 1))
    assert.are.same({ 2, true, odd_type }, { rows[2].attempt, rows[2].ok, rows[2].type })
    assert.is_nil(rows[2].error)
  end)

  it("a worker whose heartbeat is older than reclaim_after never takes itself for dead",
    function()
    -- (as after an outage longer than reclaim_after: its first reclaim
    -- comes before its first heartbeat.)  A trigger makes its row stale
    -- from the start.
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local ran = 0
    jobs:define("one", function() ran = ran + 1 end, { group = g })
    local fn, trigger = helper.unique("stale_fn"), helper.unique("stale_trigger")
    db:exec(([[CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN NEW.heartbeat_at := now() - interval '1 hour'; RETURN NEW; END $$]])
      :format(fn))
    db:exec(("CREATE TRIGGER %s BEFORE INSERT ON pgcoord.job_workers FOR EACH ROW"
      .. " WHEN (NEW.group_name = '%s') EXECUTE FUNCTION %s()")
      :format(trigger, assert(g:match("^[%w_]+$")), fn))
    local ok, err = pcall(helper.capture_log, function(lines)
      local w = worker(jobs, { group = g, poll_interval = 30, heartbeat_interval = 0.05,
        reclaim_after = 0.5 })
      jobs:schedule_now(db, "one", {})
      helper.wait_until(function()
        return ran == 1 and db:one([[SELECT count(*)::int AS n FROM pgcoord.job_workers
          WHERE id = $1 AND heartbeat_at > now() - interval '1 minute']], w:stats().id).n == 1
      end, 5, "the job to run and the worker to beat")
      local logged = table.concat(lines, "\n")
      assert.is_nil(logged:find("taken for dead", 1, true), logged)
    end)
    db:exec(("DROP TRIGGER %s ON pgcoord.job_workers"):format(trigger))
    db:exec(("DROP FUNCTION %s()"):format(fn))
    if not ok then error(err, 0) end
  end)

  it("hands back what a claim under its old id brings while it registers again", function()
    -- Taken for dead, a worker drops the jobs it claimed and registers
    -- again; a claim that lands before the new id does brings jobs that
    -- are not its own either (others run them), and must not run them.
    local jobs_sql = require "pgcoord.jobs.sql"
    local g = helper.unique("jg")
    local p = pool()
    local slow, in_claim = false, 0
    local query, one = p.query, p.one
    p.query = function(self, q, ...)
      if q ~= jobs_sql.CLAIM then return query(self, q, ...) end
      in_claim = in_claim + 1
      local r = table.pack(pcall(query, self, q, ...))
      if slow then pgcoord.sleep(1) end -- (the claim's answer is late)
      in_claim = in_claim - 1
      if not r[1] then error(r[2], 0) end
      return table.unpack(r, 2, r.n)
    end
    p.one = function(self, q, ...)
      if slow and q == jobs_sql.REGISTER then pgcoord.sleep(1.5) end -- (later still)
      return one(self, q, ...)
    end
    local jobs = pgcoord.jobs(p)
    local runs = {}
    local w
    jobs:define("mine", function(job) runs[#runs + 1] = { job = job.id, worker = w:stats().id } end,
      { group = g })
    helper.capture_log(function()
      w = worker(jobs, { group = g, poll_interval = 30, heartbeat_interval = 0.05,
        reclaim_after = 5 })
      helper.wait_until(function() return in_claim == 0 end, 5, "the first claims to land")
      slow = true
      local old = w:stats().id
      jobs:schedule_many(db, { { type = "mine" }, { type = "mine" }, { type = "mine" } })
      helper.wait_until(function() return count_jobs(g, "running") == 3 end, 5, "the claim")
      -- as another worker's reclaim would: the worker's row goes, its jobs back
      db:exec("DELETE FROM pgcoord.job_workers WHERE id = $1", old)
      db:exec([[UPDATE pgcoord.jobs SET state = 'ready', locked_by = NULL, locked_at = NULL
                 WHERE locked_by = $1]], old)
      helper.wait_until(function() return count_jobs(g) == 0 end, 10, "the jobs to run")
      assert.are.equal(3, #runs, "a job ran twice")
      for _, r in ipairs(runs) do assert.are_not.equal(old, r.worker) end
    end)
  end)

  it("runs jobs left running by a worker whose row is gone", function()
    -- (a worker taken for dead and deleted while a claim of its was on its
    -- way): the sweep at a worker's start hands them back
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local ran = 0
    jobs:define("orphan", function() ran = ran + 1 end, { group = g })
    db:exec([[INSERT INTO pgcoord.jobs (group_name, type, state, params, locked_by, locked_at)
              SELECT $1, 'orphan', 'running', '{}', -1, now() FROM generate_series(1, 3)]], g)
    helper.capture_log(function()
      worker(jobs, { group = g, poll_interval = 30 })
      helper.wait_until(function() return count_jobs(g) == 0 end, 5, "the orphans to run")
    end)
    assert.are.equal(3, ran)
  end)

  it("logs every run to job_runs unless should_log_run says no; log_final_runs keeps final runs",
    function()
    -- One group per policy: a job that fails once then succeeds, one that
    -- fails for good after two attempts, and one that succeeds.
    local function run_with(should_log_run)
      local g = helper.unique("jg")
      local jobs = pgcoord.jobs(db)
      local calls = {}
      jobs:define("flaky", function(job)
        if job.error_count == 0 then error("first try fails") end
      end, { group = g, retry = { max = 3, base_delay = 0.05 } })
      jobs:define("doomed", function() error("always fails") end,
        { group = g, retry = { max = 1, base_delay = 0.05 } })
      jobs:define("fine", function() end, { group = g })
      local opts = { group = g, poll_interval = 30, flush_age = 0.05 }
      if should_log_run then
        opts.should_log_run = function(job, run)
          calls[#calls + 1] = { job = job, run = run }
          return should_log_run(job, run)
        end
      end
      local ids = {}
      helper.capture_log(function()
        local w = worker(jobs, opts)
        for _, t in ipairs({ "flaky", "doomed", "fine" }) do
          ids[t] = jobs:schedule_now(db, t, { keep = t ~= "fine" })
        end
        helper.wait_until(function()
          return count_jobs(g) == 1 and count_jobs(g, "failed") == 1
        end, 10, "the jobs to end")
        w:shutdown()
      end)
      local logged = {}
      for t, id in pairs(ids) do
        local rows = db:query([[
          SELECT attempt, ok, group_name, type, worker_id, started_at, finished_at
            FROM pgcoord.job_runs WHERE job_id = $1 ORDER BY attempt]], id)
        local parts = {}
        for i, r in ipairs(rows) do
          assert.are.equal(g, r.group_name)
          assert.are.equal(t, r.type)
          assert.is_number(r.worker_id)
          assert.is_true(r.started_at <= r.finished_at)
          parts[i] = ("%d:%s"):format(r.attempt, r.ok and "ok" or "failed")
        end
        logged[t] = table.concat(parts, " ")
      end
      return logged, calls
    end

    assert.are.same({ flaky = "1:failed 2:ok", doomed = "1:failed 2:failed", fine = "1:ok" },
      (run_with(nil)))
    assert.are.same({ flaky = "2:ok", doomed = "2:failed", fine = "1:ok" },
      (run_with(pgcoord.jobs.log_final_runs)))
    local logged, calls = run_with(function(job) return job.params.keep end)
    assert.are.same({ flaky = "1:failed 2:ok", doomed = "1:failed 2:failed", fine = "" }, logged)
    assert.are.equal(5, #calls)
    for _, c in ipairs(calls) do
      assert.is_number(c.job.id)
      assert.is_number(c.run.attempt)
      assert.is_boolean(c.run.ok)
      assert.is_true(c.run.started_at <= c.run.finished_at)
      if c.run.ok then
        assert.is_nil(c.run.error)
      else
        assert.is_string(c.run.error)
        assert.are.equal(c.job.type == "doomed" and c.run.attempt == 2, c.run.final)
      end
    end
  end)

  it("hands a retry back even when its key was taken meanwhile, without jamming its results",
    function()
    -- A key stays taken while its job runs, so that a failed run can go
    -- back to waiting; scheduling the key meanwhile is refused, and the
    -- worker must carry on writing results either way.
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local release, started, others = false, false, 0
    local k = helper.unique("key")
    jobs:define("keyed", function(job)
      if job.params.first and job.error_count == 0 then
        started = true
        helper.wait_until(function() return release end, 10, "the release")
        error("first run fails")
      end
    end, { group = g, retry = { max = 3, base_delay = 0.05 } })
    jobs:define("other", function() others = others + 1 end, { group = g })
    local first
    helper.capture_log(function()
      local w = worker(jobs, { group = g, poll_interval = 30, flush_age = 0.05, concurrency = 2 })
      first = jobs:schedule(db, "keyed", { first = true }, { key = k })
      helper.wait_until(function() return started end, 5, "the first keyed job to start")
      -- may be refused or taken, depending on what a key guards: either way
      -- the worker must carry on
      jobs:schedule(db, "keyed", {}, { key = k, run_at = db_time() + 3600 })
      release = true
      jobs:schedule_now(db, "other", {})
      local ok, err = pcall(helper.wait_until, function()
        return others == 1 and count_jobs(g) <= 2 and db:one(
          "SELECT count(*)::int AS n FROM pgcoord.jobs WHERE id = $1 AND state = 'running'",
          first).n == 0
      end, 5, "the worker to write the failed run and the other job's result")
      local unflushed = w:stats().unflushed
      -- free the key, so that a jammed worker can be shut down
      db:exec("DELETE FROM pgcoord.jobs WHERE key = $1 AND id <> $2", k, first)
      if not ok then
        error(("%s (%d results unwritten: the failed run's retry cannot go back to"
          .. " 'scheduled' while another pending job holds its key)"):format(err, unflushed), 0)
      end
      -- the failed run went back to waiting: it runs again and is done
      helper.wait_until(function()
        return db:one("SELECT count(*)::int AS n FROM pgcoord.jobs WHERE id = $1", first).n == 0
      end, 5, "the retry to run")
    end)
    local runs = {}
    for i, r in ipairs(db:query([[SELECT attempt, ok FROM pgcoord.job_runs WHERE job_id = $1
                                  ORDER BY attempt]], first)) do
      runs[i] = ("%d:%s"):format(r.attempt, r.ok and "ok" or "failed")
    end
    assert.are.same({ "1:failed", "2:ok" }, runs)
  end)
end)

describe("input no worker can stall on", function()
  it("a job whose params cannot be decoded fails its runs, then stays failed; the others run",
    function()
    -- Rows inserted by another client: params nested 200 deep (past the
    -- decoder's 128), one ready, one left running by a worker that is gone
    -- (the sweep hands it back: the next worker must not hang on it either).
    local g = helper.unique("jg")
    local wdb = pool({ size = 4 })
    local jobs = pgcoord.jobs(wdb)
    local ran = 0
    jobs:define("work", function(job)
      assert(job.params.i)
      ran = ran + 1
    end, { group = g, retry = { max = 1, base_delay = 0.05 } })
    local list = {}
    for i = 1, 40 do list[i] = { type = "work", params = { i = i } } end
    jobs:schedule_many(db, list)
    local deep = ("["):rep(200) .. ("]"):rep(200)
    local poison = db:query([[
      INSERT INTO pgcoord.jobs (group_name, type, state, params, locked_by, locked_at)
      VALUES ($1, 'work', 'ready', $2::json, NULL, NULL),
             ($1, 'work', 'running', $2::json, -1, now())
      RETURNING id]], g, deep)
    jobs:schedule_many(db, list)
    helper.capture_log(function()
      worker(jobs, { group = g, concurrency = 4, prefetch = 10, poll_interval = 0.2,
        flush_age = 0.05 })
      helper.wait_until(function()
        return ran == 80 and count_jobs(g) == 2 and count_jobs(g, "failed") == 2
      end, 10, "the good jobs to run and the poison ones to fail")
    end)
    assert.are.equal(0, count_jobs(g, "running"))
    for _, p in ipairs(poison) do
      local row = db:one("SELECT state, error_count, last_error FROM pgcoord.jobs WHERE id = $1",
        p.id)
      assert.are.equal("failed", row.state)
      assert.are.equal(2, row.error_count)
      assert.matches("^job params cannot be decoded: .*nested too deep", row.last_error)
      local runs = db:one([[SELECT count(*)::int AS n, bool_or(ok) AS ok FROM pgcoord.job_runs
                             WHERE job_id = $1]], p.id)
      assert.are.same({ n = 2, ok = false }, runs)
    end
    -- jobs:failed lists them, saying why their params are missing
    local failed = jobs:failed({ group = g })
    assert.are.equal(2, #failed)
    for i, f in ipairs(failed) do
      assert.are.equal(poison[i].id, f.id)
      assert.is_nil(f.params)
      assert.matches("nested too deep", f.params_error)
    end
    -- the worker's pool is whole: nothing stays leased
    assert.are.equal(1, wdb:one("SELECT 1 AS x").x)
  end)

  it("a claim whose rows cannot be read (out of memory) leaves them ready, not running",
    function()
    -- (AddressSanitizer reserves terabytes of address space: no ulimit -v)
    if os.getenv("SANITIZE") == "address" then return end
    local g = helper.unique("jg")
    -- 120 MB of params in one claim, for a process limited to 100 MB
    db:exec([[INSERT INTO pgcoord.jobs (group_name, type, state, params)
              SELECT $1, 'big', 'ready', to_json(repeat('x', 30000000))
                FROM generate_series(1, 4)]], g)
    local script = helper.write_file(helper.tmpname("oom") .. ".lua", [[
      local group = ...
      io.stdout:setvbuf("no")
      local jobs = pgcoord.jobs(pgcoord.connect(nil, { size = 4 }))
      jobs:define("big", function() end, { group = group })
      jobs:worker({ group = group, poll_interval = 0.2, prefetch = 10,
        handle_error = function(err, what) print(what .. ": " .. tostring(err)) end })
    ]])
    local p = helper.start({ "sh", "-c", "ulimit -v 100000; exec " .. helper.quote(helper.run_bin)
      .. " " .. helper.quote(script) .. " " .. g })
    p:wait_output("out of memory", 20)
    local function ready()
      return db:one([[SELECT count(*)::int AS n FROM pgcoord.jobs
                       WHERE group_name = $1 AND state = 'ready' AND locked_by IS NULL]], g).n
    end
    -- (a claim rolls back once the server sees its connection go)
    local ok = pcall(helper.wait_until, function() return ready() == 4 end, 5)
    assert.is_true(ok, ("%d of 4 jobs ready; %d running"):format(ready(), count_jobs(g, "running")))
    assert.matches("claim failed: [^\n]*out of memory", p:output())
    assert.is_true(p:alive(), p:output())
    p:kill("KILL")
  end)

  it("a handler's retry_at(inf), a NUL byte or broken UTF-8 in its error, or a huge delay"
    .. " leave every result writable", function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local runs = {}
    local failures = {
      inf = function() error(pgcoord.retry_at(math.huge, "never")) end,
      far = function() error(pgcoord.retry_at(1e300)) end,
      nul = function() error("bad\0byte", 0) end,
      nul_reason = function() error(pgcoord.retry_at(pgcoord.time() + 0.05, "bad\0reason")) end,
      utf8 = function() error("bad \xff\xfe byte", 0) end,
    }
    jobs:define("odd", function(job)
      local how = job.params.how
      runs[how] = (runs[how] or 0) + 1
      if job.error_count == 0 then failures[how]() end
    end, { group = g, retry = { max = 3, base_delay = 0.05 } })
    -- a delay of base_delay x attempt past any timestamp: capped at 1e9 s
    jobs:define("slow_retry", function() error("again") end,
      { group = g, retry = { max = 1000000, base_delay = 1e9 } })
    local ids = {}
    for how in pairs(failures) do ids[how] = jobs:schedule_now(db, "odd", { how = how }) end
    local slow = db:one([[INSERT INTO pgcoord.jobs (group_name, type, state, error_count)
                          VALUES ($1, 'slow_retry', 'ready', 100000) RETURNING id]], g).id
    local t0 = db_time()
    helper.capture_log(function()
      worker(jobs, { group = g, poll_interval = 0.2, flush_age = 0.05 })
      helper.wait_until(function()
        return count_jobs(g) == 1 and count_jobs(g, "scheduled") == 1
      end, 10, "the odd jobs to run again and the slow retry to be written")
    end)
    for how in pairs(failures) do assert.are.equal(2, runs[how], how) end
    local function first_error(how)
      return db:one("SELECT error FROM pgcoord.job_runs WHERE job_id = $1 AND attempt = 1",
        ids[how]).error
    end
    assert.matches("pgcoord.retry_at: time must be epoch seconds .*, got inf", first_error("inf"))
    assert.matches("pgcoord.retry_at: time must be epoch seconds .*, got 1e%+300",
      first_error("far"))
    -- (the error's first line; the handler's traceback follows)
    assert.are.equal("bad\\0byte", first_error("nul"):match("^[^\n]*"))
    assert.are.equal("bad ?? byte", first_error("utf8"):match("^[^\n]*"))
    assert.are.equal("bad\\0reason", first_error("nul_reason"))
    local row = db:one([[SELECT error_count, extract(epoch FROM run_at)::float8 AS at
                          FROM pgcoord.jobs WHERE id = $1]], slow)
    assert.are.equal(100001, row.error_count)
    assert.is_true(math.abs(row.at - (t0 + 1e9)) < 60, "run_at " .. row.at)
  end)

  it("a result the server refuses fails its job alone; the rest of the batch is written",
    function()
    -- A trigger makes the server refuse to delete one finished job (a data
    -- exception), the way a row nothing in pgcoord checks could be refused.
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local ran = 0
    jobs:define("work", function() ran = ran + 1 end, { group = g })
    local list = {}
    for i = 1, 30 do list[i] = { type = "work", params = { i = i } } end
    local ids = jobs:schedule_many(db, list)
    local refused = ids[17]
    local fn, trigger = helper.unique("refuse"), helper.unique("refuse_trigger")
    db:exec(([[CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'refused for the test' USING ERRCODE = '22023'; END $$]])
      :format(fn))
    db:exec(("CREATE TRIGGER %s BEFORE DELETE ON pgcoord.jobs FOR EACH ROW WHEN (OLD.id = %d)"
      .. " EXECUTE FUNCTION %s()"):format(trigger, refused, fn))
    local ok, err = pcall(helper.capture_log, function(lines)
      worker(jobs, { group = g, concurrency = 4, poll_interval = 30, flush_count = 100,
        flush_age = 0.5 })
      helper.wait_until(function() return count_jobs(g) == 1 end, 10,
        "every result but the refused one to be written")
      helper.wait_until(function() return count_jobs(g, "failed") == 1 end, 5,
        "the refused job to fail")
      local logged = table.concat(lines, "\n")
      assert.matches("the server refused a result; its job fails for good", logged, 1, true)
    end)
    db:exec(("DROP TRIGGER %s ON pgcoord.jobs"):format(trigger))
    db:exec(("DROP FUNCTION %s()"):format(fn))
    if not ok then error(err, 0) end
    assert.are.equal(30, ran)
    local row = db:one("SELECT id, state, last_error FROM pgcoord.jobs WHERE group_name = $1", g)
    assert.are.equal(refused, row.id)
    assert.matches("the server refused this run's result: .*refused for the test", row.last_error)
    assert.are.same({ n = 30, ok = 29 }, db:one([[
      SELECT count(*)::int AS n, (count(*) FILTER (WHERE ok))::int AS ok FROM pgcoord.job_runs
       WHERE group_name = $1]], g))
  end)
end)

describe("shutting a worker down", function()
  it("hands back claimed jobs that have not started, waits for running ones, writes results",
    function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local release, runs = false, {}
    jobs:define("slow", function(job)
      runs[#runs + 1] = job.id
      if #runs == 1 then helper.wait_until(function() return release end, 20, "the release") end
    end, { group = g })
    local list = {}
    for i = 1, 5 do list[i] = { type = "slow" } end
    local ids = jobs:schedule_many(db, list)
    local w = worker(jobs, { group = g, concurrency = 1, prefetch = 10, poll_interval = 30 })
    helper.wait_until(function()
      local s = w:stats()
      return s.running == 1 and s.queued == 4
    end, 5, "one job running and four prefetched")
    local stopper = helper.spawn(function() w:shutdown() end)
    helper.wait_until(function()
      return db:one([[SELECT count(*)::int AS n FROM pgcoord.jobs
                       WHERE group_name = $1 AND state = 'ready' AND locked_by IS NULL]], g).n == 4
    end, 5, "the four prefetched jobs to be handed back")
    assert.are.equal("stopping", w:stats().state)
    assert.are.equal(1, count_jobs(g, "running"))
    assert.are.equal("running", stopper:status())
    release = true
    assert.is_true(stopper:wait(5), "shutdown did not end once the handler returned")
    assert.are.equal("stopped", w:stats().state)
    assert.is_true(pgcoord.spawn(w.shutdown, w):wait(1), "a second shutdown() did not return")
    assert.are.equal(0, w:stats().unflushed)
    assert.are.equal(4, count_jobs(g), "the running job's result was not written")
    assert.are.equal(0,
      db:one("SELECT count(*)::int AS n FROM pgcoord.jobs WHERE id = $1", ids[1]).n)
    assert.are.equal(0, db:one("SELECT count(*)::int AS n FROM pgcoord.job_workers WHERE id = $1",
      w:stats().id).n)

    worker(jobs, { group = g, poll_interval = 30 })
    helper.wait_until(function() return count_jobs(g) == 0 end, 5, "another worker to run the rest")
    table.sort(runs)
    assert.are.same(ids, runs)
  end)

  it("w:stop() unregisters its stop handler; w:shutdown is its alias", function()
    local lifecycle = require "pgcoord.lifecycle"
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    jobs:define("noop", function() end, { group = g })
    -- (a subscriber of the test's own: the count is the worker's alone)
    local sub = connected_subscriber()
    local before = lifecycle.handlers()
    local w = worker(jobs, { group = g, poll_interval = 30, subscriber = sub })
    -- (its own, and the fan-out's for open listeners when it is the first)
    assert.is_true(lifecycle.handlers() > before)
    assert.are.equal(w.stop, w.shutdown)
    w:stop()
    assert.are.equal("stopped", w:stats().state)
    assert.are.equal(before, lifecycle.handlers())
  end)

  it("w:stop() returns for a worker that never registered: database unmigrated or gone away",
    function()
    local function unmigrated()
      return pool({ size = 2 }, helper.conninfo_for(helper.create_database("jw"))), "unmigrated"
    end
    local function gone()
      local t = helper.tcp_parts()
      local relay = helper.relay(t.host, t.port)
      local p = pool({ size = 2 }, relay.dsn())
      relay.stop() -- (the pool's connection is cut, and no other can be made)
      return p, "gone away"
    end
    for _, database in ipairs({ unmigrated, gone }) do
      local p, what = database()
      local g = helper.unique("jg")
      local jobs = pgcoord.jobs(p)
      jobs:define("noop", function() end, { group = g })
      helper.capture_log(function(lines)
        local w = jobs:worker({ group = g, poll_interval = 30 })
        helper.wait_until(function()
          return table.concat(lines, "\n"):find("registering the worker failed", 1, true)
        end, 5, "a registration to fail")
        local stopper = helper.spawn(w.stop, w)
        assert.is_true(stopper:wait(5), "w:stop() did not return (" .. what .. ")")
        assert.is_false(w:ready())
        assert.are.equal("stopped", w:stats().state)
        assert.is_true(helper.spawn(w.stop, w):wait(1), "a second w:stop() did not return")
      end)
    end
  end)

  it("w:stop() during the worker's registration gives it up after a moment; no row stays",
    function()
    local g = helper.unique("jg")
    local p, app = pool({ size = 2 })
    local jobs = pgcoord.jobs(p)
    jobs:define("noop", function() end, { group = g })
    -- the registration's INSERT waits for this lock
    local locked, release = false, false
    local holder = helper.spawn(db.tx, db, function(tx)
      tx:exec("LOCK TABLE pgcoord.job_workers IN SHARE MODE")
      locked = true
      helper.wait_until(function() return release end, 20, "the release")
    end)
    helper.wait_until(function() return locked end, 5, "the lock")
    local w
    helper.capture_log(function()
      w = jobs:worker({ group = g, poll_interval = 30 })
      helper.wait_until(function()
        return helper.admin():one([[SELECT count(*)::int AS n FROM pg_stat_activity
          WHERE application_name = $1 AND wait_event_type = 'Lock']], app).n == 1
      end, 5, "the registration to wait for the lock")
      local stopper = helper.spawn(w.stop, w)
      assert.is_true(stopper:wait(5), "w:stop() did not return")
    end)
    assert.are.equal("stopped", w:stats().state)
    -- the abandoned INSERT's backend is ended before the lock goes: it
    -- never commits
    helper.wait_until(function()
      return helper.admin():one([[SELECT count(*)::int AS n FROM pg_stat_activity
        WHERE application_name = $1 AND wait_event_type = 'Lock']], app).n == 0
    end, 5, "the registration's backend to end")
    release = true
    assert.is_true(holder:wait(5), "the lock was not released")
    assert.are.equal(0, db:one(
      "SELECT count(*)::int AS n FROM pgcoord.job_workers WHERE group_name = $1", g).n)
  end)

  it("cancels handlers still running after the timeout, leaving their jobs retryable", function()
    local g = helper.unique("jg")
    local jobs = pgcoord.jobs(db)
    local hang, started, finished = true, 0, 0
    jobs:define("stuck", function()
      started = started + 1
      if hang then pgcoord.sleep(3600) end
      finished = finished + 1
    end, { group = g, retry = { max = 0, base_delay = 0.05 } })
    local w = worker(jobs, { group = g, poll_interval = 30 })
    local id = jobs:schedule_now(db, "stuck", {})
    helper.wait_until(function() return started == 1 end, 5, "the handler to start")
    local took = helper.timed(w.shutdown, w, 0.2)
    assert.is_true(took >= 0.2 and took < 2, ("shutdown(0.2) took %.3f s"):format(took))
    assert.are.equal(0, finished)
    local row = db:one(
      "SELECT state, error_count, last_error, locked_by FROM pgcoord.jobs WHERE id = $1", id)
    -- retryable although retry.max = 0 would make a real failure final
    assert.are.equal("scheduled", row.state)
    assert.are.equal(1, row.error_count)
    assert.are.equal("cancelled at shutdown", row.last_error)
    assert.is_nil(row.locked_by)
    hang = false
    worker(jobs, { group = g, poll_interval = 0.2 })
    helper.wait_until(function() return count_jobs(g) == 0 end, 5, "the job to run again")
    assert.are.equal(1, finished)
  end)

  it("hands back the jobs of a claim that was on its way when the shutdown began", function()
    local g = helper.unique("jg")
    local wdb, app = pool({ size = 4 })
    local jobs = pgcoord.jobs(wdb)
    local ran = 0
    jobs:define("late", function() ran = ran + 1 end, { group = g })
    -- ready jobs no NOTIFY announced ...
    db:exec([[INSERT INTO pgcoord.jobs (group_name, type, state, params)
              SELECT $1, 'late', 'ready', '{}' FROM generate_series(1, 3)]], g)
    -- ... and a lock that holds up the worker's first round (reclaim, claim)
    local unlock = hold_lock("LOCK TABLE pgcoord.jobs IN SHARE MODE")
    local w = worker(jobs, { group = g, concurrency = 2, poll_interval = 60,
      subscriber = connected_subscriber() })
    helper.wait_until(function()
      return helper.admin():one([[SELECT count(*)::int AS n FROM pg_stat_activity
        WHERE application_name = $1 AND wait_event_type = 'Lock']], app).n > 0
    end, 5, "the claim to wait for the lock")
    local stopper = helper.spawn(function() w:shutdown() end)
    helper.wait_until(function() return stopper:status() == "done" end, 5, "the shutdown")
    unlock()
    -- the jobs were ready all along: wait for the claim to be over first
    helper.wait_until(function()
      for _, b in ipairs(helper.backends(app)) do
        if b.state ~= "idle" then return false end
      end
      return db:one([[SELECT count(*)::int AS n FROM pgcoord.jobs
                       WHERE group_name = $1 AND state = 'ready' AND locked_by IS NULL]], g).n == 3
    end, 5, "the late claim to be handed back")
    assert.are.equal(0, ran)
    assert.are.equal(0, w:stats().queued)
  end)
end)

describe("a worker in trouble", function()
  -- A worker script for pgcoord-run: works `group`, recording each
  -- completion in `tbl`.  Prints "ready worker=<id>".
  local WORKER_SCRIPT = [[
local group, tbl, name, concurrency, prefetch, pause, heartbeat, reclaim, flush_count = ...
io.stdout:setvbuf("no")
-- (room for every runner, claims, writers and the heartbeat at once)
local db = pgcoord.connect(nil, { size = tonumber(concurrency) + 6 })
local jobs = pgcoord.jobs(db)
local sql = ("INSERT INTO %s (job_id, worker) VALUES ($1, $2)"
  .. " ON CONFLICT (job_id) DO UPDATE SET runs = %s.runs + 1")
  :format(pgcoord.quote_ident(tbl), pgcoord.quote_ident(tbl))
pause = tonumber(pause)
jobs:define("work", function(job)
  if pause > 0 then pgcoord.sleep(pause) end
  db:exec(sql, job.id, name)
end, { group = group, retry = { max = 10, base_delay = 0.05 } })
local w = jobs:worker({ group = group, concurrency = math.tointeger(tonumber(concurrency)),
  prefetch = math.tointeger(tonumber(prefetch)), poll_interval = 0.5, flush_age = 0.2,
  heartbeat_interval = tonumber(heartbeat), reclaim_after = tonumber(reclaim),
  flush_count = math.tointeger(tonumber(flush_count)) })
w:ready()
print("ready worker=" .. w:stats().id)
]]

  local function start_worker(group, tbl, name, o)
    local path = helper.tmpname("worker") .. ".lua"
    helper.write_file(path, WORKER_SCRIPT)
    local p = helper.start({ "pgcoord-run", path, group, tbl, name, tostring(o.concurrency),
      tostring(o.prefetch), tostring(o.pause or 0), tostring(o.heartbeat or 10),
      tostring(o.reclaim or 60), tostring(o.flush_count or 100) })
    p:wait_output("ready worker=", 10)
    return p
  end

  local function work(n)
    local list = {}
    for i = 1, n do list[i] = { type = "work", params = { i = i } } end
    return list
  end

  it("survives the server going away mid-run, losing no buffered result", function()
    if not helper.can_pgctl() then
      pending("needs PGCOORD_TEST_PGCTL (run under scripts/pg-tmp)")
    end
    local g = helper.unique("jg")
    local tbl = done_table()
    local jobs = pgcoord.jobs(db)
    local hdb = pool({ size = 8 })
    local completed, ncompleted, infra = {}, 0, 0
    jobs:define("work", function(job)
      pgcoord.sleep(0.01)
      hdb:exec(("INSERT INTO %s (job_id) VALUES ($1) ON CONFLICT DO NOTHING"):format(tbl), job.id)
      -- counted once the completion is recorded: a run that failed with
      -- the server gone is retried, and only completions count
      completed[job.id] = (completed[job.id] or 0) + 1
      ncompleted = ncompleted + 1
    end, { group = g, retry = { max = 1000, base_delay = 0.05 } })
    local n = 400
    helper.capture_log(function()
      local w = worker(jobs, { group = g, concurrency = 8, prefetch = 50, flush_count = 1000,
        flush_age = 5, poll_interval = 1, heartbeat_interval = 0.3,
        handle_error = function() infra = infra + 1 end })
      local ids = jobs:schedule_many(db, work(n))
      helper.wait_until(function() return w:stats().unflushed >= 50 end, 10, "results to pile up")
      helper.pgctl("stop")
      local ok, err = pcall(function()
        assert.is_true(ncompleted < n, "every job was done before the server went away")
        helper.wait_until(function() return infra > 0 end, 10, "the worker to notice")
        assert.is_true(w:stats().unflushed >= 50, "buffered results went missing")
      end)
      helper.pgctl("start")
      if not ok then error(err, 0) end
      helper.wait_until(function()
        local cok, left = pcall(count_jobs, g)
        return cok and left == 0
      end, 30, "every job to be done")
      assert.are.equal("running", w:stats().state)
      local once = 0
      for _, id in ipairs(ids) do
        assert.are.equal(1, completed[id], "job " .. id .. " completed " .. tostring(completed[id]))
        once = once + 1
      end
      assert.are.equal(n, once)
      assert.are.equal(n, done_count(tbl).n)
    end)
  end)

  it("after a worker process is SIGKILLed mid-batch, another completes every job", function()
    local g = helper.unique("jg")
    local tbl = done_table()
    local jobs = pgcoord.jobs(db)
    jobs:define("work", function() end, { group = g })
    local n = 300
    local o = { concurrency = 4, prefetch = 50, pause = 0.02, heartbeat = 0.2, reclaim = 1 }
    local p1 = start_worker(g, tbl, "first", o)
    local ids = jobs:schedule_many(db, work(n))
    helper.wait_until(function() return done_count(tbl).n >= 60 end, 10, "some jobs done")
    assert.is_true(p1:kill("KILL"))
    assert.are.equal(128 + 9, p1:wait(5))
    -- the batch the killed worker held: the only jobs it may have run
    -- without its result being written
    local held = {}
    local nheld = 0
    for _, r in ipairs(db:query(
        "SELECT id FROM pgcoord.jobs WHERE group_name = $1 AND state = 'running'", g)) do
      held[r.id] = true
      nheld = nheld + 1
    end
    assert.is_true(nheld > 0, "the kill left no claimed job behind")
    assert.is_true(done_count(tbl).n < n, "all jobs were done before the kill")

    local p2 = start_worker(g, tbl, "second", o)
    helper.wait_until(function()
      return count_jobs(g) == 0 and done_count(tbl).n == n
    end, 20, "the second worker to finish every job")
    assert.matches("reclaimed jobs of workers that stopped heartbeating", p2:output(), 1, true)
    local got = db:one(([[
      SELECT count(*)::int AS n
        FROM %s d JOIN json_array_elements_text($1::json) e ON d.job_id = e.value::bigint]])
      :format(tbl), ids).n
    assert.are.equal(n, got)
    for _, r in ipairs(db:query(("SELECT job_id, runs FROM %s WHERE runs > 1"):format(tbl))) do
      assert.is_true(held[r.job_id], ("job %d ran %d times, but was not in the killed batch")
        :format(r.job_id, r.runs))
    end
    p2:kill("TERM")
    assert.are.equal(0, p2:wait(10), p2:output())
  end)

  it("a worker paused past reclaim_after drops its prefetched jobs on resume: reruns are"
    .. " bounded by what was in flight and logged once", function()
    local g = helper.unique("jg")
    local tbl = done_table()
    local jobs = pgcoord.jobs(db)
    jobs:define("work", function() end, { group = g })
    local n = 3000
    -- (a lease long enough that a loaded machine does not starve the
    -- running worker's heartbeat past it: only the paused one is reclaimed)
    local o = { concurrency = 4, prefetch = 400, flush_count = 20, pause = 0.004,
                heartbeat = 0.2, reclaim = 2 }
    local stale = start_worker(g, tbl, "stale", o)
    local stale_id = tonumber(stale:output():match("ready worker=(%d+)"))
    jobs:schedule_many(db, work(n))
    helper.wait_until(function() return done_count(tbl).n >= 100 end, 10, "some jobs done")
    assert.is_true(stale:kill("STOP"))
    local ok, err = pcall(function()
      -- what the paused worker holds: others must run it
      local held = {}
      for i, r in ipairs(db:query([[SELECT id FROM pgcoord.jobs
          WHERE group_name = $1 AND state = 'running' AND locked_by = $2]], g, stale_id)) do
        held[i] = r.id
      end
      assert.is_true(#held > 2 * (o.concurrency + o.flush_count),
        ("the paused worker held only %d jobs"):format(#held))
      local other = start_worker(g, tbl, "other", o)
      helper.wait_until(function()
        return db:one(([[SELECT count(*)::int AS n FROM %s d
                          JOIN json_array_elements_text($1::json) h ON d.job_id = h::bigint]])
          :format(tbl), held).n == #held
      end, 20, "the other worker to run every job the paused one held")
      assert.is_true(stale:kill("CONT"))
      helper.wait_until(function()
        return count_jobs(g) == 0 and done_count(tbl).n == n
      end, 30, "every job to be done")
      stale:wait_output("job worker was taken for dead, registered again", 10)
      other:kill("TERM")
      assert.are.equal(0, other:wait(10), other:output())
    end)
    stale:kill("CONT")
    if not ok then error(err, 0) end
    local reruns = db:one(("SELECT count(*)::int AS n FROM %s WHERE runs > 1"):format(tbl)).n
    -- in flight at the pause: the jobs running, the batch of results
    -- filling, and two batches handed to writers that may not have been
    -- sent yet (jobs/completer.lua's MAX_WRITERS)
    local bound = o.concurrency + 3 * o.flush_count
    assert.is_true(reruns <= bound, ("%d jobs ran twice, more than %d"):format(reruns, bound))
    -- a run the database refused (its job was handed back) is not logged
    local logged = db:one([[SELECT count(*)::int AS runs, count(DISTINCT job_id)::int AS jobs,
                                   (count(*) FILTER (WHERE NOT ok))::int AS failed
                              FROM pgcoord.job_runs WHERE group_name = $1]], g)
    assert.are.same({ runs = n, jobs = n, failed = 0 }, logged)
    stale:kill("TERM")
    assert.are.equal(0, stale:wait(10), stale:output())
  end)

  it("two worker processes on 10,000 jobs complete each job exactly once", function()
    local g = helper.unique("jg")
    local tbl = done_table()
    local jobs = pgcoord.jobs(db)
    jobs:define("work", function() end, { group = g })
    local o = { concurrency = 8, prefetch = 200 }
    local p1 = start_worker(g, tbl, "one", o)
    local p2 = start_worker(g, tbl, "two", o)
    local n = 10000
    jobs:schedule_many(db, work(n))
    helper.wait_until(function()
      return done_count(tbl).n == n and count_jobs(g) == 0
    end, 60, "10,000 jobs to be done")
    local c = done_count(tbl)
    assert.are.equal(n, c.n)
    assert.are.equal(1, c.max_runs)
    local by = {}
    local sql = ("SELECT worker, count(*)::int AS n FROM %s GROUP BY worker"):format(tbl)
    for _, r in ipairs(db:query(sql)) do
      by[r.worker] = r.n
    end
    assert.is_true((by.one or 0) > 0 and (by.two or 0) > 0,
      ("work was not shared: one=%s two=%s"):format(tostring(by.one), tostring(by.two)))
    p1:kill("TERM")
    p2:kill("TERM")
    assert.are.equal(0, p1:wait(10), p1:output())
    assert.are.equal(0, p2:wait(10), p2:output())
  end)
end)

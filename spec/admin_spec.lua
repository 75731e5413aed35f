-- Retention of the job runner (jobs:prune, the worker's retention option)
-- and the admin commands of pgcoord-run (jobs, queue, outbox), each run as
-- a child process against the real server.
--
-- Rows are written straight into the tables where a test needs a job in a
-- given state or a run of a given age: what is tested is what the
-- commands and the pruning do with them.  Every test has its own groups,
-- queues and outbox tables (helper.unique).
local pgcoord = require "pgcoord"
local helper = require "helper"
local retention = require "pgcoord.jobs.retention"
local PRUNE_LOCK = require("pgcoord.jobs.sql").PRUNE_LOCK

local db
local started = {}

-- A job row in state, its run_at `age` seconds ago; returns its id.
local function job_row(group, state, age, fields)
  fields = fields or {}
  return db:one([[INSERT INTO pgcoord.jobs (group_name, type, state, run_at, error_count,
                                            last_error, params)
                  VALUES ($1, $2, $3, now() - make_interval(secs => $4), $5, $6, $7::json)
                  RETURNING id]], group, fields.type or "report", state, age or 0,
    fields.error_count or 0, fields.last_error, fields.params or { n = 1 }).id
end

-- A logged run of job id that finished `age` seconds ago.
local function run_row(group, id, age, ok, err)
  db:exec([[INSERT INTO pgcoord.job_runs (job_id, group_name, type, attempt, ok, error,
                                          started_at, finished_at, worker_id)
            VALUES ($1, $2, 'report', 1, $3, $4, now() - make_interval(secs => $5 + 0.25),
                    now() - make_interval(secs => $5), 7)]], id, group, ok, err, age)
end

local function count(sql, ...)
  return db:one("SELECT count(*)::int AS n FROM " .. sql, ...).n
end

local function runs_of(group) return count("pgcoord.job_runs WHERE group_name = $1", group) end
local function jobs_of(group, state)
  return count("pgcoord.jobs WHERE group_name = $1 AND state = $2", group, state)
end

-- Whether this build's schema has the 'cancelled' state (migration 006).
local function cancelled_state_exists()
  return db:one([[SELECT count(*)::int AS n FROM pg_constraint
                   WHERE conrelid = 'pgcoord.jobs'::regclass AND contype = 'c'
                     AND pg_get_constraintdef(oid) LIKE '%cancelled%']]).n > 0
end

local function run(args, opts)
  local argv = { "pgcoord-run" }
  for _, a in ipairs(args) do argv[#argv + 1] = tostring(a) end
  return helper.run(argv, opts)
end

-- s as a Lua pattern that matches it literally.
local function lit(s)
  return (tostring(s):gsub("%p", "%%%0"))
end

local function decode(out)
  return pgcoord.json.decode(out)
end

-- Where header starts in the header line: in an aligned table, each row's
-- value of that column starts there too.
local function column_of(header_line, header)
  return header_line:find(header, 1, true)
end

describe("job retention", function()
  setup(function()
    db = helper.connect({ size = 4 })
    pgcoord.migrate(db)
  end)
  teardown(function() db:close() end)
  after_each(function()
    for _, s in ipairs(started) do pcall(s.stop, s) end
    started = {}
    helper.cleanup()
  end)

  it("jobs:prune deletes runs, failed and cancelled jobs older than the times given, in batches",
    function()
      local g, other = helper.unique("prune"), helper.unique("prune_other")
      local old_failed = { job_row(g, "failed", 7200), job_row(g, "failed", 7200),
                           job_row(g, "failed", 7200) }
      job_row(g, "failed", 60)
      job_row(g, "ready", 7200)     -- waiting jobs are never pruned
      job_row(other, "failed", 7200)
      for i = 1, 5 do run_row(g, old_failed[1], 7200 + i, false, "boom") end
      run_row(g, old_failed[1], 60, true)
      run_row(other, 1, 7200, true)
      local has_cancelled = cancelled_state_exists()
      if has_cancelled then
        job_row(g, "cancelled", 7200)
        job_row(g, "cancelled", 60)
      end
      local saved = retention.BATCH
      retention.BATCH = 2 -- (several batches for each kind)
      local ok, counts = pcall(function()
        local jobs = pgcoord.jobs(db)
        local cutoff = db:one("SELECT extract(epoch FROM now())::float8 - 3600 AS t").t
        return jobs:prune({ runs_before = cutoff, failed_before = cutoff,
                            cancelled_before = cutoff, group = g })
      end)
      retention.BATCH = saved
      assert(ok, counts)
      assert.are.same({ runs = 5, failed = 3, cancelled = has_cancelled and 1 or 0 }, counts)
      assert.are.equal(1, runs_of(g))
      assert.are.equal(1, jobs_of(g, "failed"))
      assert.are.equal(1, jobs_of(g, "ready"))
      if has_cancelled then assert.are.equal(1, jobs_of(g, "cancelled")) end
      -- without a group, every group's; only what is asked for
      local now = db:one("SELECT extract(epoch FROM now())::float8 AS t").t
      local all = pgcoord.jobs(db):prune({ runs_before = now - 3600 })
      assert.are.equal(0, all.failed)
      assert.is_true(all.runs >= 1)
      assert.are.equal(0, runs_of(other))
      assert.are.equal(1, jobs_of(other, "failed"))
    end)

  it("jobs:prune refuses bad input and deletes nothing", function()
    local g = helper.unique("prune_bad")
    job_row(g, "failed", 7200)
    local jobs = pgcoord.jobs(db)
    local err = helper.error_of
    assert.matches("jobs:prune: give at least one of runs_before, failed_before, cancelled_before",
      err(jobs.prune, jobs, {}), 1, true)
    assert.matches("jobs:prune: give at least one of", err(jobs.prune, jobs, { group = g }),
      1, true)
    assert.matches("jobs:prune: option failed_before must be a number", err(function()
      jobs:prune({ failed_before = 0 / 0 })
    end), 1, true)
    assert.matches("admin_spec.lua:%d+: jobs:prune: option runs_before must be a number",
      err(function() jobs:prune({ runs_before = "yesterday" }) end))
    assert.matches('unknown option "failed_befor" for jobs:prune',
      err(function() jobs:prune({ failed_befor = 1 }) end), 1, true)
    assert.matches("jobs:prune: options must be a table", err(function() jobs:prune(5) end),
      1, true)
    assert.are.equal(1, jobs_of(g, "failed"))
  end)

  it("a worker's retention prunes its group's old rows at start and on its interval", function()
    local g, other = helper.unique("keep"), helper.unique("keep_other")
    local jobs = pgcoord.jobs(db)
    jobs:define("report", function() end, { group = g })
    local id = job_row(g, "failed", 7200)
    job_row(g, "failed", 60)
    run_row(g, id, 7200, false, "boom")
    run_row(g, id, 60, false, "boom")
    job_row(other, "failed", 7200)
    run_row(other, id, 7200, true)
    local w = jobs:worker({ group = g, retention = { runs = 3600, failed = 3600,
                                                     cancelled = 3600, interval = 0.05 } })
    started[#started + 1] = w
    helper.wait_until(function() return runs_of(g) == 1 and jobs_of(g, "failed") == 1 end, 10,
      "the first pass")
    -- rows that grow old later go on a later pass
    local id2 = job_row(g, "failed", 7200)
    run_row(g, id2, 7200, true)
    -- (a pass's deletes are visible before it counts itself: wait for both)
    helper.wait_until(function()
      return runs_of(g) == 1 and jobs_of(g, "failed") == 1 and w:stats().retention.runs >= 2
    end, 10, "a later pass")
    assert.are.equal(1, runs_of(other))
    assert.are.equal(1, jobs_of(other, "failed"))
    w:stop()
    assert.is_false(w:stats().retention.running)
  end)

  it("prunes a group in one process at a time: a pass that finds its lock taken deletes nothing",
    function()
      local g = helper.unique("lock")
      job_row(g, "failed", 7200)
      local holder = helper.connect({ size = 1 })
      local pruner
      holder:tx(function(tx)
        tx:exec("SELECT pg_advisory_xact_lock($1, hashtext($2))", PRUNE_LOCK, g)
        pruner = retention.start(db, g, retention.check("spec", { failed = 3600,
                                                                 interval = 0.05 }))
        started[#started + 1] = pruner
        helper.wait_until(function() return pruner:stats().runs >= 3 end, 10,
          "three passes while the lock is held")
        assert.are.equal(1, jobs_of(g, "failed"))
      end)
      helper.wait_until(function() return jobs_of(g, "failed") == 0 end, 10,
        "the pass after the lock is released")
      pruner:stop()
      holder:close()
    end)

  it("jobs:worker refuses a bad retention option, naming it", function()
    local g = helper.unique("keep_bad")
    local jobs = pgcoord.jobs(db)
    jobs:define("report", function() end, { group = g })
    local err = helper.error_of
    assert.matches("jobs:worker: option retention.runs must be a number > 0",
      err(function() jobs:worker({ group = g, retention = { runs = -1 } }) end), 1, true)
    assert.matches("jobs:worker: option retention.failed must be a number > 0",
      err(function() jobs:worker({ group = g, retention = { failed = 0 / 0 } }) end), 1, true)
    assert.matches('unknown option "retention.rnus" for jobs:worker',
      err(function() jobs:worker({ group = g, retention = { rnus = 60 } }) end), 1, true)
    assert.matches("jobs:worker: option retention needs at least one of runs, failed, cancelled",
      err(function() jobs:worker({ group = g, retention = { interval = 5 } }) end), 1, true)
    assert.matches("admin_spec.lua:%d+: jobs:worker: option retention must be a table",
      err(function() jobs:worker({ group = g, retention = 3600 }) end))
  end)
end)

describe("pgcoord-run admin commands", function()
  setup(function()
    db = helper.connect({ size = 4 })
    pgcoord.migrate(db)
  end)
  teardown(function() db:close() end)
  after_each(helper.cleanup)

  it("jobs list: aligned, filtered by group and state, or JSON", function()
    local g = helper.unique("list")
    local a = job_row(g, "failed", 10, { error_count = 3, last_error = "boom\ntraceback" })
    local b = job_row(g, "ready", 0, { type = "a_much_longer_type_name" })
    local c = job_row(g, "scheduled", -3600)
    job_row(helper.unique("list_other"), "ready", 0)
    local code, out = run({ "jobs", "list", "--group", g })
    assert.are.equal(0, code, out)
    local lines = {}
    for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.are.equal(4, #lines, out)
    assert.matches("^ID%s+GROUP%s+TYPE%s+STATE%s+ERRORS%s+RUN_AT%s+LAST_ERROR$", lines[1])
    assert.matches("^" .. a .. "%s+" .. g .. "%s+report%s+failed%s+3%s+%d%d%d%d%-%d%d%-%d%d "
      .. "%d%d:%d%d:%d%dZ%s+boom$", lines[2])
    assert.matches("^" .. b .. "%s.*a_much_longer_type_name%s+ready", lines[3])
    assert.matches("^" .. c .. "%s.*scheduled", lines[4])
    for i = 2, 4 do
      local at = column_of(lines[1], "STATE")
      assert.matches("^%a", lines[i]:sub(at), 1, false, "STATE column misaligned:\n" .. out)
      assert.matches(" $", lines[i]:sub(at - 1, at - 1), 1, false, "STATE column misaligned")
    end
    code, out = run({ "jobs", "list", "--group", g, "--state", "failed", "--json" })
    assert.are.equal(0, code, out)
    local rows = decode(out)
    assert.are.equal(1, #rows, out)
    assert.are.equal(a, rows[1].id)
    assert.are.equal("failed", rows[1].state)
    assert.are.equal(3, rows[1].error_count)
    assert.are.same({ n = 1 }, rows[1].params)
    code, out = run({ "--json", "jobs", "list", "--group", g, "--limit", "2" })
    assert.are.equal(0, code, out)
    assert.are.equal(2, #decode(out))
    code, out = run({ "jobs", "list", "--group", helper.unique("none") })
    assert.are.equal(0, code, out)
    assert.are.equal("(no jobs)\n", out)
  end)

  it("jobs show: the job and its runs; a completed job by its history; an unknown id fails",
    function()
      local g = helper.unique("show")
      local id = job_row(g, "failed", 10, { error_count = 2, last_error = "no route to host" })
      run_row(g, id, 30, false, "timed out")
      run_row(g, id, 10, false, "no route to host")
      local code, out = run({ "jobs", "show", id })
      assert.are.equal(0, code, out)
      assert.matches("\nstate%s+failed\n", out)
      assert.matches("\ngroup%s+" .. g .. "\n", out)
      assert.matches("\nlast_error%s+no route to host\n", out)
      assert.matches('\nparams%s+{"n":1}\n', out)
      assert.matches("\nruns\nATTEMPT%s+OK%s+STARTED%s+SECONDS%s+WORKER%s+ERROR\n", out)
      assert.matches("\n1%s+no%s+[%d%- :]+Z%s+0%.250%s+7%s+timed out\n", out)
      code, out = run({ "jobs", "show", id, "--json" })
      assert.are.equal(0, code, out)
      local job = decode(out)
      assert.are.equal(id, job.id)
      assert.are.equal("failed", job.state)
      assert.are.equal(2, #job.runs)
      assert.are.equal("no route to host", job.runs[2].error)
      -- a completed job's row is gone; its logged run tells
      local done = job_row(g, "ready", 0)
      run_row(g, done, 1, true)
      db:exec("DELETE FROM pgcoord.jobs WHERE id = $1", done)
      code, out = run({ "jobs", "show", done, "--json" })
      assert.are.equal(0, code, out)
      job = decode(out)
      assert.are.equal("completed", job.state)
      assert.are.equal(1, #job.runs)
      code, out = run({ "jobs", "show", "999999999999" })
      assert.are.equal(1, code, out)
      assert.matches("pgcoord-run: jobs show: no job 999999999999", out, 1, true)
    end)

  it("jobs retry: failed jobs run again; exit 1 unless every id was a failed job", function()
    local g = helper.unique("retry")
    local f1, f2 = job_row(g, "failed", 10), job_row(g, "failed", 10)
    local ready = job_row(g, "ready", 0)
    local code, out = run({ "jobs", "retry", f1, f2 })
    assert.are.equal(0, code, out)
    assert.matches("retried 2 of 2 jobs", out, 1, true)
    assert.are.equal(3, jobs_of(g, "ready"))
    code, out = run({ "jobs", "retry", f1, ready, "--json" })
    assert.are.equal(1, code, out)
    assert.are.same({ retried = 0, requested = 2 }, decode(out))
  end)

  it("jobs cancel, pause, resume and periodic call the job runner's methods when it has them",
    function()
      local g = helper.unique("ext")
      local jobs = pgcoord.jobs(db)
      local waiting = job_row(g, "ready", 0)
      for _, case in ipairs({ { "cancel", waiting }, { "pause", g }, { "resume", g },
                              { "periodic" } }) do
        local method = case[1] == "periodic" and "periodic_list" or case[1]
        local code, out = run({ "jobs", table.unpack(case) })
        if jobs[method] == nil then
          assert.are.equal(1, code, out)
          assert.matches("pgcoord-run: jobs " .. case[1] .. " is not available in this build",
            out, 1, true)
        else
          assert.are.equal(0, code, out)
        end
      end
      if jobs.cancel then
        assert.are.equal(1, jobs_of(g, "cancelled"))
      end
    end)

  it("queue dead lists a subscription's dead letters; queue requeue moves them back", function()
    local name, sub = helper.unique("q"), helper.unique("sub")
    local q = pgcoord.queue(db, name)
    q:subscribe(sub)
    local ids = q:publish_many(db, { { n = 1 }, { n = 2 }, { n = 3 } })
    db:exec([[UPDATE pgcoord.queue_deliveries d SET state = 'dead', deliveries = 5,
                     last_error = 'refused'
                FROM pgcoord.queue_subscriptions s JOIN pgcoord.queues q ON q.id = s.queue_id
               WHERE d.subscription_id = s.id AND q.name = $1 AND s.name = $2
                 AND d.message_id = ANY($3::bigint[])]], name, sub,
      "{" .. ids[1] .. "," .. ids[3] .. "}")
    local code, out = run({ "queue", "dead", name, sub })
    assert.are.equal(0, code, out)
    assert.matches("^ID%s+DELIVERIES%s+PUBLISHED%s+LAST_DELIVERED%s+LAST_ERROR%s+PAYLOAD\n", out)
    assert.matches("\n" .. ids[1] .. "%s+5%s.*refused%s+{\"n\":1}\n", out)
    assert.matches("\n" .. ids[3] .. "%s+5%s.*refused%s+{\"n\":3}\n", out)
    assert.is_nil(out:find("\n" .. ids[2] .. " ", 1, true))
    code, out = run({ "queue", "dead", name, sub, "--json", "--limit", "1" })
    assert.are.equal(0, code, out)
    local rows = decode(out)
    assert.are.equal(1, #rows)
    assert.are.equal(ids[1], rows[1].id)
    assert.are.same({ n = 1 }, rows[1].payload)
    code, out = run({ "queue", "requeue", name, sub, ids[1], ids[2] })
    assert.are.equal(1, code, out)   -- ids[2] was not dead
    assert.matches("requeued 1 of 2 dead letters", out, 1, true)
    assert.are.equal(1, q:stats(sub).dead)
    code, out = run({ "queue", "requeue", name, sub, ids[3], "--json" })
    assert.are.equal(0, code, out)
    assert.are.same({ requeued = 1, requested = 1 }, decode(out))
    assert.are.equal(0, q:stats(sub).dead)
    code, out = run({ "queue", "dead", name, helper.unique("nosub") })
    assert.are.equal(1, code, out)
    assert.matches("has no subscription", out, 1, true)
  end)

  it("outbox failed lists failed messages; outbox retry makes them pending again", function()
    local tbl = helper.unique("outbox")
    local ob = pgcoord.outbox(db, { table = tbl })
    assert.is_true(ob:migrate())
    local ids = { ob:save(db, { topic = "orders", key = "o-1", payload = { n = 1 } },
                              { topic = "orders", payload = { n = 2 } }) }
    if type(ids[1]) == "table" then ids = ids[1] end
    db:exec(("UPDATE %s SET status = 'failed', retries = 5, last_error = 'broker down'"
      .. " WHERE id = $1"):format(pgcoord.quote_ident(tbl)), ids[1])
    local code, out = run({ "outbox", "failed", tbl })
    assert.are.equal(0, code, out)
    assert.matches("^ID%s+TOPIC%s+KEY%s+RETRIES%s+CREATED%s+LAST_ERROR\n", out)
    assert.matches("\n" .. lit(ids[1]) .. "%s+orders%s+o%-1%s+5%s.*broker down\n", out)
    assert.is_nil(out:find(ids[2], 1, true))
    code, out = run({ "outbox", "failed", tbl, "--json" })
    assert.are.equal(0, code, out)
    local rows = decode(out)
    assert.are.equal(1, #rows)
    assert.are.same({ n = 1 }, rows[1].payload)
    code, out = run({ "outbox", "retry", tbl, ids[1], ids[2] })
    assert.are.equal(1, code, out)   -- ids[2] was not failed
    assert.matches("retried 1 of 2 messages", out, 1, true)
    local row = db:one(("SELECT status, retries FROM %s WHERE id = $1")
      :format(pgcoord.quote_ident(tbl)), ids[1])
    assert.are.same({ status = "pending", retries = 0 }, row)
    code, out = run({ "outbox", "failed", helper.unique("no_table") })
    assert.are.equal(1, code, out)
    assert.matches("does not exist", out, 1, true)
  end)

  it("a usage error exits 2 naming what was wrong", function()
    local cases = {
      { { "jobs" }, "jobs: give a command" },
      { { "jobs", "frobnicate" }, 'unknown jobs command "frobnicate"' },
      { { "queue", "list" }, 'unknown queue command "list"' },
      { { "jobs", "show" }, "jobs show: missing ID" },
      { { "jobs", "show", "1", "2" }, 'jobs show: unexpected argument "2"' },
      { { "jobs", "show", "abc" }, 'jobs show: "abc" is not an id (a positive integer)' },
      { { "jobs", "retry", "1", "x1" }, '"x1" is not an id' },
      { { "jobs", "retry", "0" }, '"0" is not an id' },
      { { "jobs", "retry", "99999999999999999999" }, "is not an id" },
      { { "jobs", "retry" }, "jobs retry: missing ID" },
      { { "jobs", "list", "--state", "done" }, "option --state takes one of ready" },
      { { "jobs", "list", "--limit", "0" }, "option --limit takes an integer from 1" },
      { { "jobs", "list", "--group" }, "option --group needs a value" },
      { { "jobs", "list", "--colour" }, "jobs list: unknown option --colour" },
      { { "jobs", "list", "extra" }, 'jobs list: unexpected argument "extra"' },
      { { "queue", "dead", "q" }, "queue dead: missing SUB" },
      { { "queue", "requeue", "q", "s" }, "queue requeue: missing ID" },
      { { "queue", "requeue", "q", "s", "7", "seven" }, '"seven" is not an id' },
      { { "outbox", "retry", "t", "12" }, '"12" is not a message id (a UUID)' },
      { { "outbox", "failed" }, "outbox failed: missing TABLE" },
      { { "jobs", "cancel", "x" }, '"x" is not an id' },
      { { "jobs", "pause" }, "jobs pause: missing GROUP" },
    }
    for _, case in ipairs(cases) do
      local code, out = run(case[1])
      assert.are.equal(2, code, table.concat(case[1], " ") .. ": " .. out)
      assert.matches("^pgcoord%-run: ", out)
      assert.matches(case[2], out, 1, true)
      assert.matches("\nusage:", out, 1, true)
    end
  end)

  it("--help lists the admin commands; a database that fails exits 1", function()
    local code, out = run({ "--help" })
    assert.are.equal(0, code, out)
    assert.matches("pgcoord-run jobs list [--group G] [--state S] [--limit N] [--json]", out,
      1, true)
    assert.matches("pgcoord-run outbox retry TABLE UUID... [--json]", out, 1, true)
    code, out = run({ "queue", "--help" })
    assert.are.equal(0, code, out)
    assert.matches("pgcoord-run queue requeue NAME SUB ID... [--json]", out, 1, true)
    assert.is_nil(out:find("jobs list", 1, true))
    code, out = run({ "jobs", "list" }, { env = { PGDATABASE = helper.unique("no_such_db") } })
    assert.are.equal(1, code, out)
    assert.matches("^pgcoord%-run: jobs list: .*no_such_db", out)
  end)
end)

-- Steering jobs against a real server: jobs:cancel (waiting jobs, a
-- running handler on its worker, a cancel racing completion), snooze,
-- a type's timeout, job:progress and jobs:get with runs.
--
-- Every test works in a group of its own (helper.unique).
local pgcoord = require "pgcoord"
local helper = require "helper"

local db
local fixture = helper.started()

local errors = helper.error_of

-- A worker, listening once this returns, stopped after the test.
-- poll_interval is long: what the tests see comes through NOTIFY, not a
-- poll.
local function worker(jobs, opts)
  opts.poll_interval = opts.poll_interval or 30
  opts.subscriber = opts.subscriber or fixture:subscriber(db)
  return fixture:worker(jobs, opts)
end

local function state_of(id)
  local row = db:one("SELECT state FROM pgcoord.jobs WHERE id = $1", id)
  return row and row.state
end

local function runs_of(id)
  return db:one("SELECT count(*)::int AS n FROM pgcoord.job_runs WHERE job_id = $1", id).n
end

-- A value to close: sets flags[name] when its scope ends, however it ends.
local function closer(flags, name)
  return setmetatable({}, { __close = function() flags[name] = true end })
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
  helper.cleanup()
end)

describe("jobs:cancel", function()
  it("keeps waiting jobs (ready, scheduled, failed) as cancelled, their keys freed, never run",
    function()
    local g = helper.unique("jc")
    local jobs = pgcoord.jobs(db)
    local ran = {}
    jobs:define("t", function(job)
      ran[#ran + 1] = job.params.n
      if job.params.fail then error("no") end
    end, { group = g, retry = { max = 0 } })
    local w = worker(jobs, { group = g })
    local failed = jobs:schedule(db, "t", { n = 3, fail = true })
    helper.wait_until(function() return state_of(failed) == "failed" end, 5, "the job to fail")
    pgcoord.spawn(w.stop, w, 0):join()
    ran = {}
    local key = helper.unique("key")
    local ready = jobs:schedule(db, "t", { n = 1 }, { key = key })
    local later = jobs:schedule(db, "t", { n = 2 }, { run_at = pgcoord.time() + 3600 })

    assert.are.equal(3, (jobs:cancel({ ready, later, failed })))
    for _, id in ipairs({ ready, later, failed }) do
      local job = jobs:get(id)
      assert.are.equal("cancelled", job.state)
      assert.is_number(job.cancelled_at)
      assert.is_nil(job.worker)
    end
    assert.are.equal(0, (jobs:cancel(ready)), "cancelling again cancels nothing")
    -- the key is free again, and a worker runs the new job and nothing else
    local again = jobs:schedule(db, "t", { n = 4 }, { key = key })
    assert.is_number(again)
    worker(jobs, { group = g })
    helper.wait_until(function() return state_of(again) == nil end, 5, "the new job to run")
    assert.are.same({ 4 }, ran)
    assert.are.equal("cancelled", state_of(ready))
  end)

  it("returns 0 for an unknown id and raises at the caller's line for an id that is no integer",
    function()
    local jobs = pgcoord.jobs(db)
    assert.are.equal(0, (jobs:cancel(-1)))
    assert.are.equal(0, (jobs:cancel({})))
    local err = errors(function() jobs:cancel("12") end)
    assert.matches("jobs:cancel: job id must be an integer, got \"12\"", err, 1, true)
    assert.matches("jobs_control_spec.lua", err, 1, true)
    err = errors(function() jobs:cancel({ 1, 2.5 }) end)
    assert.matches("got 2.5 (item 2)", err, 1, true)
  end)

  -- (its to-be-closed variable runs, the run is logged as cancelled)
  it("cancels a running handler on its worker at once, and never retries it",
    function()
    local g = helper.unique("jc")
    local jobs = pgcoord.jobs(db)
    local flags, order = {}, {}
    local function slow(job)
      order[#order + 1] = job.params.n
      local _ <close> = closer(flags, "closed" .. job.params.n)
      if job.params.n == 1 then
        flags.started = true
        pgcoord.sleep(60)
      end
    end
    local rule = { group = g, retry = { max = 5, base_delay = 0 } }
    jobs:define("slow", slow, rule)
    -- a pool of its own for the worker: the cancel reaches it by NOTIFY
    local wpool = helper.connect({ size = 4 })
    local wsub = fixture:subscriber(wpool)
    local w = worker(pgcoord.jobs(wpool):define("slow", slow, rule),
      { group = g, concurrency = 1, subscriber = wsub })
    local id = jobs:schedule(db, "slow", { n = 1 })
    helper.wait_until(function() return flags.started end, 5, "the handler to start")
    local t0 = pgcoord.now()
    local n, running = jobs:cancel(id)
    assert.are.equal(1, n)
    assert.are.equal(1, running)
    helper.wait_until(function() return flags.closed1 end, 5, "the handler's to-be-closed variable")
    -- (the poll comes every 30 s)
    assert.is_true(pgcoord.now() - t0 < 2, "the cancel took a poll, not a NOTIFY")
    local job = jobs:get(id)
    assert.are.equal("cancelled", job.state)
    assert.are.equal(1, #job.runs)
    assert.is_false(job.runs[1].ok)
    assert.are.equal("cancelled", job.runs[1].error)
    -- the runner is back: a later job runs, and the cancelled one never again
    local next_id = jobs:schedule(db, "slow", { n = 2 })
    helper.wait_until(function() return state_of(next_id) == nil end, 5, "the next job to run")
    assert.are.same({ 1, 2 }, order)
    assert.are.equal("cancelled", state_of(id))
    assert.are.equal(1, runs_of(id))
    assert.are.equal(0, w:stats().running)
    pgcoord.spawn(w.stop, w, 0):join()
    wsub:stop()
    wpool:close()
  end)

  it("cancels a running handler whose cancel was sent while its worker was not listening",
    function()
    local g = helper.unique("jc")
    local jobs = pgcoord.jobs(db)
    local flags = {}
    jobs:define("slow", function()
      local _ <close> = closer(flags, "closed")
      flags.started = true
      pgcoord.sleep(60)
    end, { group = g })
    -- the worker's subscriber is not started: the worker finds the job by
    -- its first poll, and the cancel's NOTIFY reaches nobody
    local id = jobs:schedule(db, "slow", nil)
    local sub = pgcoord.subscriber(db)
    fixture:own(sub)
    worker(jobs, { group = g, subscriber = sub })
    helper.wait_until(function() return flags.started end, 5, "the handler to start")
    assert.are.same({ 1, 1 }, { jobs:cancel(id) })
    sub:start()
    helper.wait_until(function() return flags.closed end, 5, "the handler cancelled on connect")
    assert.are.equal("cancelled", state_of(id))
  end)

  it("drops a job its worker claimed and has not started yet", function()
    local g = helper.unique("jc")
    local jobs = pgcoord.jobs(db)
    local ran, release = {}, false
    jobs:define("t", function(job)
      ran[#ran + 1] = job.id
      if #ran == 1 then
        helper.wait_until(function() return release end, 10, "the spec to release the job")
      end
    end, { group = g })
    local w = worker(jobs, { group = g, concurrency = 1, flush_age = 0.01 })
    local first = jobs:schedule(db, "t", nil)
    helper.wait_until(function() return #ran == 1 end, 5, "the first handler")
    local second = jobs:schedule(db, "t", nil)
    helper.wait_until(function() return w:stats().queued == 1 end, 5, "the second job claimed")
    assert.are.same({ 1, 1 }, { jobs:cancel(second) })
    helper.wait_until(function() return w:stats().queued == 0 end, 5, "the claimed job dropped")
    release = true
    helper.wait_until(function() return state_of(first) == nil end, 5, "the first job to finish")
    local third = jobs:schedule(db, "t", nil)
    helper.wait_until(function() return state_of(third) == nil end, 5, "the third job to finish")
    assert.are.same({ first, third }, ran)
    assert.are.equal("cancelled", state_of(second))
  end)

  -- (a result not written yet is dropped: 1; one written first: 0)
  it("racing completion is harmless either way and its count says which won",
    function()
    local g = helper.unique("jc")
    local jobs = pgcoord.jobs(db)
    local done, holding, release = {}, false, false
    jobs:define("quick", function(job)
      if job.params.hold then
        holding = true
        helper.wait_until(function() return release end, 10, "the spec to release the job")
      end
      done[job.id] = true
    end, { group = g })
    -- results wait for flush_age (or for the worker to have nothing in
    -- hand, which the held job prevents): the first job has returned, its
    -- row still 'running'.  The first is scheduled once the held one runs:
    -- scheduled together, two claims in flight may bring the first alone,
    -- and with nothing else in hand its result is written at once.
    worker(jobs, { group = g, flush_age = 600, flush_count = 1000, concurrency = 2 })
    local second = jobs:schedule(db, "quick", { hold = true })
    helper.wait_until(function() return holding end, 5, "the held job to start")
    local first = jobs:schedule(db, "quick", { hold = false })
    helper.wait_until(function() return done[first] end, 5, "the first handler")
    assert.are.equal("running", state_of(first))
    assert.are.equal(1, (jobs:cancel(first)), "the cancel took the unwritten job")
    release = true
    helper.wait_until(function() return state_of(second) == nil end, 5, "the results written")
    assert.are.equal("cancelled", state_of(first), "the worker's success overwrote the cancel")
    local runs = jobs:get(first).runs
    assert.are.equal(1, #runs, "the success was logged too")
    assert.are.equal("cancelled", runs[1].error)
    -- the second job's result was written first: nothing left to cancel
    assert.are.equal(0, (jobs:cancel(second)))
    assert.are.equal("completed", jobs:get(second).state)
  end)
end)

describe("pgcoord.snooze", function()
  it("runs the job again after the delay without counting an attempt, and counts the snooze",
    function()
    local g = helper.unique("js")
    local jobs = pgcoord.jobs(db)
    local seen = {}
    jobs:define("nap", function(job)
      local row = db:one("SELECT snoozes FROM pgcoord.jobs WHERE id = $1", job.id)
      seen[#seen + 1] = { errors = job.error_count, snoozes = row.snoozes,
                          last_error = job.last_error, at = pgcoord.now() }
      if #seen == 1 then error("boom") end
      if #seen == 2 then error(pgcoord.snooze(0.5, "not yet")) end
    end, { group = g, retry = { max = 1, base_delay = 0 } })
    worker(jobs, { group = g, flush_age = 0.01 })
    local id = jobs:schedule(db, "nap", nil)
    helper.wait_until(function() return #seen == 3 and state_of(id) == nil end, 10,
      "the third run to finish the job")
    -- max = 1 retry: a snooze counted as an attempt would have failed the job for good
    assert.are.same({ 0, 1, 1 }, { seen[1].errors, seen[2].errors, seen[3].errors })
    assert.are.same({ 0, 0, 1 }, { seen[1].snoozes, seen[2].snoozes, seen[3].snoozes })
    assert.matches("boom", seen[3].last_error, 1, true)
    assert.is_true(seen[3].at - seen[2].at >= 0.45, "ran again before the snooze ended")
    local runs = jobs:get(id).runs
    assert.are.equal(3, #runs)
    assert.are.equal("snoozed for 0.5 s: not yet", runs[2].error)
    assert.matches('pgcoord_jobs_snoozed_total{group="' .. g .. '",type="nap"} 1',
      pgcoord.metrics.render(), 1, true)
  end)

  it("refuses a delay that is no number of seconds, naming pgcoord.snooze", function()
    for _, bad in ipairs({ -1, 0 / 0, "5", 1e12 }) do
      local err = errors(pgcoord.snooze, bad)
      assert.matches("pgcoord.snooze: seconds must be a number from 0 to", err, 1, true)
    end
  end)
end)

describe("a job type's timeout", function()
  -- (to-be-closed variables run)
  it("cancels a handler past it and fails the run, retried by the type's rule",
    function()
    local g = helper.unique("jt")
    local jobs = pgcoord.jobs(db)
    local flags, runs = {}, 0
    jobs:define("stuck", function()
      runs = runs + 1
      local _ <close> = closer(flags, "closed" .. runs)
      if runs == 1 then pgcoord.sleep(60) end
    end, { group = g, timeout = 0.3, retry = { max = 1, base_delay = 0 } })
    jobs:define("fine", function() pgcoord.sleep(0.5) end, { group = g })
    worker(jobs, { group = g, flush_age = 0.01 })
    local id = jobs:schedule(db, "stuck", nil)
    local untimed = jobs:schedule(db, "fine", nil)
    helper.wait_until(function() return state_of(id) == nil end, 10, "the retry to finish the job")
    assert.is_true(flags.closed1 and flags.closed2)
    local job = jobs:get(id)
    assert.are.equal("completed", job.state)
    assert.are.equal(2, #job.runs)
    assert.are.equal(false, job.runs[1].ok)
    assert.are.equal("timed out after 0.3 s", job.runs[1].error)
    assert.is_true(job.runs[1].finished_at - job.runs[1].started_at < 5)
    assert.is_true(job.runs[2].ok)
    -- a type without a timeout runs as long as it takes
    helper.wait_until(function() return state_of(untimed) == nil end, 5, "the untimed job")
    assert.is_true(jobs:get(untimed).runs[1].ok)
    assert.matches('pgcoord_jobs_timed_out_total{group="' .. g .. '",type="stuck"} 1',
      pgcoord.metrics.render(), 1, true)
  end)

  it("fails the job for good once its retries are spent, last_error saying so", function()
    local g = helper.unique("jt")
    local jobs = pgcoord.jobs(db)
    jobs:define("stuck", function() pgcoord.sleep(60) end,
      { group = g, timeout = 0.2, retry = { max = 0 } })
    worker(jobs, { group = g, flush_age = 0.01 })
    local id = jobs:schedule(db, "stuck", nil)
    helper.wait_until(function() return state_of(id) == "failed" end, 5, "the job to fail")
    local job = jobs:get(id)
    assert.are.equal("timed out after 0.2 s", job.last_error)
    assert.are.equal(1, job.error_count)
  end)

  it("refuses a timeout that is not a positive number, naming the option", function()
    local jobs = pgcoord.jobs(db)
    for _, bad in ipairs({ 0, -1, 0 / 0, "5" }) do
      local err = errors(jobs.define, jobs, "x", function() end, { timeout = bad })
      assert.matches("timeout", err, 1, true)
      assert.matches("jobs:define", err, 1, true)
    end
  end)
end)

describe("job:progress and jobs:get", function()
  -- (and refuses values JSON cannot encode, saving nothing)
  it("saves progress on the job's row at once, visible while the job runs",
    function()
    local g = helper.unique("jp")
    local jobs = pgcoord.jobs(db)
    local release, saved, bad_errors = false, nil, {}
    jobs:define("long", function(job)
      saved = job:progress({ step = 1, of = 3 })
      for _, bad in ipairs({ function() end, { x = 0 / 0 }, "\xff" }) do
        local ok, err = pcall(function() job:progress(bad) end)
        bad_errors[#bad_errors + 1] = not ok and tostring(err) or "no error"
      end
      helper.wait_until(function() return release end, 10, "the spec to look")
      job:progress({ step = 3, of = 3 })
      error("kept for a look")
    end, { group = g, retry = { max = 0 } })
    worker(jobs, { group = g, flush_age = 0.01 })
    local id = jobs:schedule(db, "long", { file = "a.csv" })
    helper.wait_until(function() return #bad_errors == 3 end, 5, "the handler to save progress")
    assert.is_true(saved)
    for _, err in ipairs(bad_errors) do
      assert.matches("job:progress: value", err, 1, true)
      assert.matches("jobs_control_spec.lua", err, 1, true)
    end
    local job = jobs:get(id)
    assert.are.equal("running", job.state)
    assert.are.same({ step = 1, of = 3 }, job.progress, "a bad value overwrote the progress")
    assert.are.same({ file = "a.csv" }, job.params)
    assert.is_number(job.worker)
    assert.are.same({}, job.runs)
    release = true
    helper.wait_until(function() return state_of(id) == "failed" end, 5, "the job to fail")
    job = jobs:get(id)
    assert.are.same({ step = 3, of = 3 }, job.progress)
    assert.are.equal(g, job.group)
    assert.are.equal("long", job.type)
    assert.matches("kept for a look", job.last_error, 1, true)
    assert.are.equal(1, #job.runs)
    assert.are.equal(1, job.runs[1].attempt)
    assert.is_false(job.runs[1].ok)
  end)

  it("returns nil for an id nothing is known of, and raises for one that is no integer", function()
    local jobs = pgcoord.jobs(db)
    assert.is_nil(jobs:get(-1))
    local err = errors(function() jobs:get("1") end)
    assert.matches("jobs:get: job id must be an integer", err, 1, true)
  end)
end)

-- Pause and fleet-wide limits of a job group against a real server:
-- jobs:pause/resume/paused across worker processes, jobs:limit's
-- concurrency across three worker processes and its rate (a token bucket
-- by the database's clock), the slots of a worker that died, the gauges,
-- and the bad input refused before anything is written.
--
-- Handlers record their start and end in a table of their own, by the
-- database's clock, at once (job_runs is written in batches).
local pgcoord = require "pgcoord"
local helper = require "helper"
local task = require "pgcoord.task"

local db
local fixture = helper.started()

local errors = helper.error_of

local function db_time() return helper.db_time(db) end

-- A worker stopped after the test.
local function worker(jobs, opts)
  return fixture:worker(jobs, opts)
end

-- A table of handler runs: one row per start, finished set at the end.
local function runs_table()
  local name = helper.unique("jl_runs")
  db:exec(("CREATE TABLE %s (job_id bigint, proc text, started float8 NOT NULL, finished float8)")
    :format(name))
  return name
end

local function runs(tbl)
  return db:query(("SELECT job_id, proc, started, finished FROM %s ORDER BY started")
    :format(tbl))
end

local function count_runs(tbl, where)
  return db:one(("SELECT count(*)::int AS n FROM %s WHERE %s"):format(tbl, where or "true")).n
end

-- The most runs in progress at once, from their start and end times.
local function most_at_once(list)
  local events = {}
  for _, r in ipairs(list) do
    events[#events + 1] = { r.started, 1 }
    events[#events + 1] = { r.finished, -1 }
  end
  -- (an end and a start at the same instant: the end first)
  table.sort(events, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
  local now, most = 0, 0
  for _, e in ipairs(events) do
    now = now + e[2]
    if now > most then most = now end
  end
  return most
end

-- A worker process for pgcoord-run: works `group` with a "work" handler
-- that records its run in `tbl`, sleeps params.sleep, or hangs when
-- params.hang.  The poll is long: changes reach it by NOTIFY.  Prints
-- "ready worker=<id>".
local WORKER_SCRIPT = [[
local group, tbl, name, concurrency, heartbeat, reclaim = ...
io.stdout:setvbuf("no")
local db = pgcoord.connect(nil, { size = tonumber(concurrency) * 2 + 6 })
local jobs = pgcoord.jobs(db)
local t = pgcoord.quote_ident(tbl)
local START = ("INSERT INTO %s (job_id, proc, started)"
  .. " VALUES ($1, $2, extract(epoch FROM clock_timestamp()))"):format(t)
local FINISH = ("UPDATE %s SET finished = extract(epoch FROM clock_timestamp())"
  .. " WHERE job_id = $1 AND proc = $2 AND finished IS NULL"):format(t)
jobs:define("work", function(job)
  db:exec(START, job.id, name)
  local p = job.params or {}
  if p.hang then pgcoord.sleep(1000) end
  if p.sleep then pgcoord.sleep(p.sleep) end
  db:exec(FINISH, job.id, name)
end, { group = group })
-- (prefetch = concurrency: the processes share the jobs)
local w = jobs:worker({ group = group, concurrency = math.tointeger(tonumber(concurrency)),
  prefetch = 1, poll_interval = 30, flush_age = 0.1, heartbeat_interval = tonumber(heartbeat),
  reclaim_after = tonumber(reclaim) })
w:ready()
print("ready worker=" .. w:stats().id)
]]

local function start_worker(group, tbl, name, o)
  o = o or {}
  local path = helper.tmpname("worker") .. ".lua"
  helper.write_file(path, WORKER_SCRIPT)
  local p = helper.start({ "pgcoord-run", path, group, tbl, name, tostring(o.concurrency or 4),
    tostring(o.heartbeat or 10), tostring(o.reclaim or 60) })
  p:wait_output("ready worker=", 10)
  return p
end

-- How many times process p logged a change of its group's settings.
local function changes_seen(p)
  local n = 0
  for _ in p:output():gmatch("job group settings changed") do n = n + 1 end
  return n
end

-- Waits until every process logged `n` changes of settings.
local function all_saw(procs, n, what)
  helper.wait_until(function()
    for _, p in ipairs(procs) do
      if changes_seen(p) < n then return false end
    end
    return true
  end, 5, what)
end

local function work(n, params)
  local list = {}
  for i = 1, n do list[i] = { type = "work", params = params } end
  return list
end

-- A jobs object with the "work" type defined in group g (for scheduling,
-- pausing and limiting from this process).
local function jobs_in(g, fn)
  local jobs = pgcoord.jobs(db)
  jobs:define("work", fn or function() end, { group = g })
  return jobs
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

describe("jobs:pause and jobs:resume", function()
  it("stop every worker of the group, in every process, from starting jobs within 1 s, "
    .. "let running handlers finish, and start them again within 1 s", function()
    local g, tbl = helper.unique("jl"), runs_table()
    local jobs = jobs_in(g)
    local procs = { start_worker(g, tbl, "a", { concurrency = 2 }),
                    start_worker(g, tbl, "b", { concurrency = 2 }) }
    jobs:schedule_many(db, work(400, { sleep = 0.1 }))
    helper.wait_until(function()
      return count_runs(tbl, "proc = 'a'") > 0 and count_runs(tbl, "proc = 'b'") > 0
    end, 10, "both processes to run jobs")
    assert.are.same({ paused = true }, jobs:pause(g))
    local paused_at = db_time()
    assert.is_true(jobs:paused(g))
    -- running handlers finish; nothing starts a second after the pause
    all_saw(procs, 1, "both processes to learn of the pause")
    helper.wait_until(function()
      return db_time() > paused_at + 1.5 and count_runs(tbl, "finished IS NULL") == 0
    end, 10, "the running handlers to finish")
    assert.are.equal(0, count_runs(tbl, ("started > %.6f"):format(paused_at + 1)),
      "a job started more than 1 s after the pause")
    local before = count_runs(tbl)
    assert.is_true(before < 400, "every job ran: nothing was paused")

    assert.are.same({ paused = false }, jobs:resume(g))
    local resumed_at = db_time()
    assert.is_false(jobs:paused(g))
    helper.wait_until(function()
      return count_runs(tbl, ("proc = 'a' AND started > %.6f"):format(resumed_at)) > 0
         and count_runs(tbl, ("proc = 'b' AND started > %.6f"):format(resumed_at)) > 0
    end, 5, "both processes to start jobs again")
    local first = db:one(("SELECT min(started) AS t FROM %s WHERE started > $1"):format(tbl),
      resumed_at).t
    assert.is_true(first - resumed_at <= 1,
      ("the first job started %.3f s after the resume"):format(first - resumed_at))
    -- no run was lost or doubled across the pause: each job started once
    assert.are.equal(0, db:one(("SELECT count(*)::int AS n FROM (SELECT job_id FROM %s"
      .. " GROUP BY job_id HAVING count(*) > 1) d"):format(tbl)).n)
    for _, p in ipairs(procs) do p:kill("TERM") end
    for _, p in ipairs(procs) do p:wait(10) end
  end)

  it("keep a worker that starts while its group is paused from claiming until the resume",
    function()
    local g = helper.unique("jl")
    local ran = 0
    local jobs = jobs_in(g, function() ran = ran + 1 end)
    jobs:pause(g)
    jobs:schedule_many(db, work(3))
    local w = worker(jobs, { group = g, poll_interval = 0.05 })
    -- (a window of several of its polls: a paused worker claims nothing)
    local until_t = db_time() + 0.3
    helper.wait_until(function() return db_time() > until_t end, 5, "a few polls")
    assert.are.equal(0, ran)
    assert.are.equal(3, db:one([[SELECT count(*)::int AS n FROM pgcoord.jobs
                                  WHERE group_name = $1 AND state = 'ready']], g).n)
    assert.are.equal(0, w:stats().queued)
    jobs:resume(g)
    helper.wait_until(function() return ran == 3 end, 2, "the jobs to run after the resume")
  end)
end)

describe("jobs:limit", function()
  it("holds concurrency 2 across three worker processes, measured from start and end times",
    function()
    local g, tbl = helper.unique("jl"), runs_table()
    local jobs = jobs_in(g)
    -- one runner each: only a limit held across processes keeps the three
    -- from running 3 at once (and a process that has the runners keeps
    -- the slots it frees: the limit bounds, it does not share out)
    local procs = {}
    for i = 1, 3 do procs[i] = start_worker(g, tbl, "p" .. i, { concurrency = 1 }) end
    -- set while the workers run: they learn it by NOTIFY
    assert.are.same({ paused = false, concurrency = 2 }, jobs:limit(g, { concurrency = 2 }))
    all_saw(procs, 1, "every process to learn of the limit")
    local n = 18
    jobs:schedule_many(db, work(n, { sleep = 0.15 }))
    helper.wait_until(function()
      return count_runs(tbl, "finished IS NOT NULL") == n
    end, 30, "every job to run")
    local list = runs(tbl)
    assert.are.equal(n, #list)
    assert.are.equal(2, most_at_once(list), "not exactly 2 jobs at once at most")
    local procs_used = {}
    for _, r in ipairs(list) do procs_used[r.proc] = true end
    assert.is_true(next(procs_used, next(procs_used)) ~= nil, "one process ran every job")
    for _, p in ipairs(procs) do p:kill("TERM") end
    for _, p in ipairs(procs) do p:wait(10) end
  end)

  it("holds a rate of 5 starts a second fleet-wide over 30 jobs, within 10%, burst 5",
    function()
    local g, tbl = helper.unique("jl"), runs_table()
    -- The bucket is spent by the claims: a start's time is the bucket's
    -- clock in the claim that took its token (refilled_at, read by a
    -- trigger at the end of that statement), not the handler's start,
    -- which comes later by however long its process takes to get to it
    -- (more than the bucket's slack, now and then, on a loaded machine).
    local grants, fn, trigger = helper.unique("jl_grants"), helper.unique("jl_fn"),
      helper.unique("jl_trg")
    db:exec(("CREATE TABLE %s (job_id bigint, group_name text, started float8)"):format(grants))
    db:exec(([[CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        INSERT INTO %s SELECT NEW.id, NEW.group_name, extract(epoch FROM refilled_at)
          FROM pgcoord.job_groups WHERE name = NEW.group_name;
        RETURN NULL;
      END $$]]):format(fn, grants))
    db:exec(("CREATE TRIGGER %s AFTER UPDATE OF state ON pgcoord.jobs FOR EACH ROW"
      .. " WHEN (NEW.state = 'running' AND OLD.state <> 'running') EXECUTE FUNCTION %s()")
      :format(trigger, fn))
    local ok, err = pcall(function()
      local jobs = jobs_in(g)
      local procs = { start_worker(g, tbl, "a", { concurrency = 10 }),
                      start_worker(g, tbl, "b", { concurrency = 10 }) }
      jobs:limit(g, { rate = 5 })
      all_saw(procs, 1, "both processes to learn of the limit")
      jobs:schedule_many(db, work(30))
      helper.wait_until(function() return count_runs(tbl) == 30 end, 20, "every job to start")
      -- each job ran once, each after its last grant: a claim that was
      -- on its way while the limit was set, or while it changed, came
      -- back to a worker that handed its jobs back (worker.lua _claim),
      -- and a limited claim took them again
      local ran = db:one(("SELECT count(*)::int AS n, count(DISTINCT job_id)::int AS jobs FROM %s")
        :format(tbl))
      assert.are.same({ n = 30, jobs = 30 }, ran, "a job ran twice")
      local list = db:query(([[SELECT job_id, max(started) AS started FROM %s
                                WHERE group_name = $1 GROUP BY job_id ORDER BY 2]])
        :format(grants), g)
      assert.are.equal(30, #list, "a job was never claimed")
      local span = list[30].started - list[1].started
      -- the burst of 5 at once, then 25 at 5 a second: 5 s
      assert.is_true(span >= 4.5 and span <= 5.5, ("30 starts took %.3f s"):format(span))
      -- and never faster than the bucket allows: i..j within burst + rate x time
      for i = 1, 30 do
        for j = i + 1, 30 do
          local allowed = 5 + 5 * (list[j].started - list[i].started)
          assert.is_true(j - i + 1 <= allowed + 0.05,
            ("%d starts in %.3f s"):format(j - i + 1, list[j].started - list[i].started))
        end
      end
      for _, p in ipairs(procs) do p:kill("TERM") end
      for _, p in ipairs(procs) do p:wait(10) end
    end)
    db:exec(("DROP TRIGGER %s ON pgcoord.jobs"):format(trigger))
    db:exec(("DROP FUNCTION %s()"):format(fn))
    if not ok then error(err, 0) end
  end)

  it("starts a new rate with a full bucket, and keeps the bucket when the same rate is set again",
    function()
    local g = helper.unique("jl")
    local jobs = jobs_in(g)
    local function bucket()
      return db:one([[SELECT tokens, refilled_at::text AS at
                        FROM pgcoord.job_groups WHERE name = $1]], g)
    end
    jobs:limit(g, { rate = 5 })
    assert.are.equal(5, bucket().tokens)
    db:exec("UPDATE pgcoord.job_groups SET tokens = 1 WHERE name = $1", g)
    local before = bucket()
    jobs:limit(g, { rate = 5, concurrency = 2 })
    assert.are.same(before, bucket())
    jobs:limit(g, { rate = 8 })
    assert.are.equal(8, bucket().tokens)
  end)

  it("gives back the slots of a worker that died within reclaim_after (and a heartbeat)",
    function()
    local g, tbl = helper.unique("jl"), runs_table()
    local started = {}
    local jobs = jobs_in(g, function(job)
      started[#started + 1] = { id = job.id, t = db_time() }
    end)
    jobs:limit(g, { concurrency = 1 })
    local reclaim, heartbeat = 2, 0.25
    local p = start_worker(g, tbl, "dying", { concurrency = 1, heartbeat = heartbeat,
      reclaim = reclaim })
    local hang = jobs:schedule(db, "work", { hang = true })
    helper.wait_until(function() return count_runs(tbl) == 1 end, 5, "the hanging job to start")
    local w = worker(jobs, { group = g, poll_interval = 0.2, heartbeat_interval = heartbeat,
      reclaim_after = reclaim })
    local quick = jobs:schedule(db, "work", { n = 1 })
    -- the slot is the dying worker's: a few of this worker's polls go by
    -- (a window of time: what is checked is that nothing happens in it)
    local until_t = db_time() + 0.6
    helper.wait_until(function() return db_time() > until_t end, 5, "a few polls")
    assert.are.equal(0, #started, "a job started while the only slot was taken")
    local dying = tonumber(p:output():match("ready worker=(%d+)"))
    p:kill("KILL")
    p:wait(5)
    local last_beat = db:one([[SELECT extract(epoch FROM heartbeat_at)::float8 AS t
                                 FROM pgcoord.job_workers WHERE id = $1]], dying).t
    helper.wait_until(function() return #started == 2 end, 10, "both jobs to run here")
    local ids = { started[1].id, started[2].id }
    table.sort(ids)
    assert.are.same({ hang, quick }, ids)
    local back_after = started[1].t - last_beat
    assert.is_true(back_after >= reclaim - 0.05 and back_after <= reclaim + heartbeat + 0.5,
      ("the slot came back %.3f s after the dead worker's last heartbeat"):format(back_after))
    assert.is_true(w:stats().running <= 1)
  end)

  it("reaches a worker by its poll when the NOTIFY is missed", function()
    local g = helper.unique("jl")
    local jobs = jobs_in(g)
    local w = worker(jobs, { group = g, poll_interval = 0.2 })
    assert.is_false(w:stats().limited)
    -- written behind the workers' backs: no NOTIFY
    db:exec("INSERT INTO pgcoord.job_groups (name, concurrency) VALUES ($1, 1)", g)
    helper.wait_until(function() return w:stats().limited end, 1, "the poll to find the limit")
    db:exec("UPDATE pgcoord.job_groups SET paused = true WHERE name = $1", g)
    helper.wait_until(function() return w:stats().paused end, 1, "the poll to find the pause")
    db:exec("UPDATE pgcoord.job_groups SET paused = false, concurrency = NULL WHERE name = $1", g)
    helper.wait_until(function() return not w:stats().limited end, 1, "the poll to find it clear")
  end)

  it("keeps a change whose NOTIFY lands while a read of the settings is on its way", function()
    local limits = require "pgcoord.jobs.limits"
    local g = helper.unique("jl")
    local jobs = jobs_in(g)
    local watcher, changes = nil, 0
    -- the read is answered before the limit is set, and handed back only
    -- once the limit's NOTIFY has been applied: the order in which the
    -- two connections' events come is the loop's, not the server's
    local late_pool = setmetatable({ one = function(_, query, ...)
      local row = db:one(query, ...)
      jobs:limit(g, { rate = 5 })
      helper.wait_until(function() return watcher:limited() end, 5, "the NOTIFY to land")
      return row
    end }, { __index = db })
    watcher = limits.watcher(late_pool, g, 30, 60, {
      on_change = function() changes = changes + 1 end,
      on_wake = function() end,
      on_error = function(_, err) error(err, 0) end,
    })
    watcher:listen(fixture:subscriber(db))
    watcher:load()
    watcher:stop()
    assert.is_true(watcher:limited(), "the older read undid the limit")
    assert.are.equal(1, changes)
  end)

  it("frees the slots of a worker that stops at once for the others", function()
    local g = helper.unique("jl")
    local release = task.cond()
    local ran = {}
    local jobs = jobs_in(g, function(job)
      ran[#ran + 1] = job.id
      if #ran == 1 then release:wait() end
    end)
    jobs:limit(g, { concurrency = 1 })
    local first = jobs:worker({ group = g, poll_interval = 30 })
    assert.is_true(first:ready())
    jobs:schedule(db, "work")
    helper.wait_until(function() return #ran == 1 end, 5, "the first job to start")
    worker(jobs, { group = g, poll_interval = 30 })
    jobs:schedule(db, "work")
    -- (a window of time for the other worker to look, in vain: the slot is taken)
    local until_t = db_time() + 0.3
    helper.wait_until(function() return db_time() > until_t end, 5, "the other worker to look")
    assert.are.equal(1, #ran)
    -- the first worker stops: its handler finishes, its slot is free
    local stopper = helper.spawn(first.stop, first)
    release:signal()
    assert.is_true(stopper:wait(5), "the first worker did not stop")
    local stopped_at = db_time()
    helper.wait_until(function() return #ran == 2 end, 2, "the other worker to start the job")
    assert.is_true(db_time() - stopped_at < 1)
  end)

  it("is shown by the gauges, and jobs:limits reads it back", function()
    local g = helper.unique("jl")
    local jobs = jobs_in(g)
    local function gauge(name)
      local text = pgcoord.metrics.render()
      local v = text:match(name .. '{group="' .. g:gsub("%p", "%%%0") .. '"} ([%d.]+)')
      return tonumber(v)
    end
    jobs:limit(g, { concurrency = 3, rate = 2.5 })
    jobs:pause(g)
    assert.are.same({ paused = true, concurrency = 3, rate = 2.5 }, jobs:limits(g))
    assert.are.equal(1, gauge("pgcoord_jobs_group_paused"))
    assert.are.equal(3, gauge("pgcoord_jobs_group_concurrency_limit"))
    assert.are.equal(2.5, gauge("pgcoord_jobs_group_rate_limit"))
    jobs:limit(g)
    jobs:resume(g)
    assert.are.same({ paused = false }, jobs:limits(g))
    assert.are.equal(0, gauge("pgcoord_jobs_group_paused"))
    assert.are.equal(0, gauge("pgcoord_jobs_group_concurrency_limit"))
    assert.are.equal(0, gauge("pgcoord_jobs_group_rate_limit"))
  end)
end)

describe("bad input to pause and limit", function()
  local function written(g)
    return db:one("SELECT count(*)::int AS n FROM pgcoord.job_groups WHERE name = $1", g).n
  end

  it("names an unknown group, and writes nothing", function()
    local g = helper.unique("jl")
    local jobs = jobs_in(g)
    local other = helper.unique("jl_unknown")
    for _, call in ipairs({
      { "pause", function() jobs:pause(other) end },
      { "resume", function() jobs:resume(other) end },
      { "paused", function() jobs:paused(other) end },
      { "limit", function() jobs:limit(other, { concurrency = 1 }) end },
      { "limits", function() jobs:limits(other) end },
    }) do
      local err = errors(call[2])
      assert.matches("jobs:" .. call[1] .. ": unknown group \"" .. other:gsub("%p", "%%%0")
        .. "\"", err)
      assert.matches("jobs_limits_spec.lua:%d+:", err) -- (at the caller's line)
      assert.matches("must be a non%-empty string, got nil", errors(function()
        jobs[call[1]](jobs, nil) end))
    end
    assert.are.equal(0, written(other))
  end)

  it("takes any group from a caller with no definitions (an admin command line), "
    .. "refusing a name the server would", function()
    local limits = require "pgcoord.jobs.limits"
    local g = helper.unique("jl_cli")
    assert.are.same({ paused = true }, limits.set_paused(db, nil, g, true, "jobs pause"))
    assert.are.equal(1, written(g))
    local err = errors(function() limits.set_paused(db, nil, "a\0b", true, "jobs pause") end)
    assert.matches("jobs pause: group", err)
    assert.matches("jobs_limits_spec.lua:%d+:", err)
  end)

  it("refuses negative, zero, NaN, infinite and fractional limits and unknown options, "
    .. "writing nothing", function()
    local g = helper.unique("jl")
    local jobs = jobs_in(g)
    local cases = {
      { { concurrency = -1 }, "option concurrency must be an integer >= 1" },
      { { concurrency = 0 }, "option concurrency must be an integer >= 1" },
      { { concurrency = 1.5 }, "option concurrency must be an integer" },
      { { concurrency = 0 / 0 }, "option concurrency must be an integer" },
      { { rate = -5 }, "option rate must be a number > 0" },
      { { rate = 0 }, "option rate must be a number > 0" },
      { { rate = 0 / 0 }, "option rate must be a number > 0" },
      { { rate = math.huge }, "option rate must be a number > 0" },
      { { rate = "5" }, "option rate must be a number" },
      { { burst = 5 }, "unknown option \"burst\" for jobs:limit" },
    }
    for _, case in ipairs(cases) do
      local err = errors(function() jobs:limit(g, case[1]) end)
      assert.matches("jobs:limit", err)
      assert.matches(case[2]:gsub("%p", "%%%0"), err)
      assert.matches("jobs_limits_spec.lua:%d+:", err)
    end
    assert.matches("options must be a table", errors(function() jobs:limit(g, 5) end))
    assert.are.equal(0, written(g))
  end)
end)

-- Periodic jobs against a real server: cron specs and their next times
-- (UTC month ends and leap years, daylight saving in a named zone), the
-- scheduler (slots enqueued as jobs with run_at = the slot, at most once
-- even when two schedulers race without the lock, backfill after an
-- outage, a changed spec), bad input, and two processes scheduling at once.
--
-- The fleet has one periodic lock: each test stops its schedulers (and
-- processes, gracefully, so that the lock is released) before the next.
local pgcoord = require "pgcoord"
local helper = require "helper"
local cron = require "pgcoord.jobs.cron"
local periodic = require "pgcoord.jobs.periodic"

local db
local sub
local schedulers = {}
local workers = {}
local pools = {}

local errors = helper.error_of

local function pool(opts)
  local p = helper.connect(opts)
  pools[#pools + 1] = p
  return p
end

-- A jobs object whose lock hears of releases at once (through sub).
local function new_jobs()
  return pgcoord.jobs(db, { subscriber = sub })
end

local function started(s)
  schedulers[#schedulers + 1] = s
  return s
end

-- "2024-03-10 07:00" (UTC) as epoch seconds.
local function utc(text)
  local y, m, d, hh, mm = text:match("^(%d+)-(%d+)-(%d+) (%d+):(%d+)$")
  return cron.days_from_civil(tonumber(y), tonumber(m), tonumber(d)) * 86400
    + tonumber(hh) * 3600 + tonumber(mm) * 60
end

local function show(t)
  return t and os.date("!%Y-%m-%d %H:%M", math.floor(t)) or "nil"
end

local function db_time() return helper.db_time(db) end

local function row_of(name)
  return db:one([[SELECT spec, extract(epoch FROM last_slot)::float8 AS last_slot,
                         extract(epoch FROM next_slot)::float8 AS next_slot
                    FROM pgcoord.job_periodic WHERE name = $1]], name)
end

-- Who holds the fleet's periodic lock, if anyone.
local function lock_holder()
  local row = db:one([[SELECT holder FROM pgcoord.job_locks
                        WHERE name = 'pgcoord:periodic' AND holder IS NOT NULL]])
  return row and row.holder
end

-- The run_at of each job of group g, in order.
local function slots_of(g)
  local list = {}
  for i, r in ipairs(db:query([[SELECT extract(epoch FROM run_at)::float8 AS at FROM pgcoord.jobs
                                 WHERE group_name = $1 ORDER BY run_at, id]], g)) do
    list[i] = r.at
  end
  return list
end

local function assert_once_each(g)
  local dup = db:one([[SELECT count(*)::int AS n FROM (
                         SELECT run_at FROM pgcoord.jobs WHERE group_name = $1
                          GROUP BY run_at HAVING count(*) > 1) d]], g).n
  assert.are.equal(0, dup, "slots enqueued more than once")
end

local function assert_consecutive(list, step, what)
  for i = 2, #list do
    assert.are.equal(step, list[i] - list[i - 1], ("%s: %s then %s"):format(what,
      show(list[i - 1]), show(list[i])))
  end
end

setup(function()
  db = helper.connect({ size = 8 })
  pgcoord.migrate(db)
  sub = pgcoord.subscriber(db)
  sub:start()
  helper.wait_until(function() return sub:connected() end, 5, "the subscriber to connect")
end)

teardown(function()
  if sub then sub:stop() end
  if db then db:close() end
end)

after_each(function()
  for _, w in ipairs(workers) do w:stop(0.1) end
  workers = {}
  for _, s in ipairs(schedulers) do s:stop(5) end
  schedulers = {}
  for _, p in ipairs(pools) do pcall(p.close, p) end
  pools = {}
  helper.cleanup()
end)

describe("cron specs", function()
  it("give the next time in UTC across month ends, years and leap years", function()
    local cases = {
      { "0 0 31 * *", "2024-01-31 00:00", "2024-03-31 00:00" },   -- (not in February)
      { "0 0 31 * *", "2024-03-31 00:00", "2024-05-31 00:00" },
      { "0 0 29 2 *", "2024-03-01 00:00", "2028-02-29 00:00" },   -- leap years only
      { "0 0 29 2 *", "2096-03-01 00:00", "2104-02-29 00:00" },   -- 2100 is not one
      { "59 23 28-29 feb *", "2023-02-28 23:59", "2024-02-28 23:59" },
      { "0 0 1 * *", "2024-12-31 10:00", "2025-01-01 00:00" },
      { "0 12 * * mon-fri", "2024-05-03 12:00", "2024-05-06 12:00" }, -- Friday to Monday
      { "0 0 * * 7", "2024-09-01 00:00", "2024-09-08 00:00" },    -- 7 is Sunday
      { "0 0 * * sun", "2024-09-01 00:00", "2024-09-08 00:00" },
      { "0 0 13 * 5", "2024-09-01 00:00", "2024-09-06 00:00" },   -- the 13th or a Friday
      { "0 0 13 * 5", "2024-09-12 00:00", "2024-09-13 00:00" },
      { "0 0 */10 * *", "2024-02-21 00:00", "2024-03-01 00:00" }, -- (* first: by day only)
      { "*/15 9-17 * * 1-5", "2024-09-06 17:45", "2024-09-09 09:00" },
      { "5,10-12,*/20 * * * *", "2024-09-02 00:12", "2024-09-02 00:20" },
      { "5/20 * * * *", "2024-09-02 00:30", "2024-09-02 00:45" },
      { "0 0 1 JAN,jul *", "2024-01-01 00:00", "2024-07-01 00:00" },
      { "@yearly", "2024-06-01 00:00", "2025-01-01 00:00" },
      { "@monthly", "2024-01-31 12:00", "2024-02-01 00:00" },
      { "@weekly", "2024-09-02 00:00", "2024-09-08 00:00" },
      { "@daily", "2024-02-28 23:59", "2024-02-29 00:00" },
      { "@hourly", "2024-12-31 23:00", "2025-01-01 00:00" },
      { "@every 90s", "2024-09-02 00:00", "2024-09-02 00:01" },  -- 00:01:30: shown to the minute
      { "@every 2h", "2024-09-02 01:00", "2024-09-02 02:00" },
    }
    for _, c in ipairs(cases) do
      local s = assert(cron.parse(c[1]))
      assert.are.equal(c[3], show(s:next(utc(c[2]))), c[1] .. " after " .. c[2])
    end
    local every = assert(cron.parse("@every 90s"))
    assert.are.equal(utc("2024-09-02 00:01") + 30, every:next(utc("2024-09-02 00:00")))
    assert.are.equal(utc("2024-09-02 00:03"), every:next(utc("2024-09-02 00:01") + 30))
  end)

  it("refuse bad specs naming the field and the value", function()
    local cases = {
      { "61 * * * *", "minute 61 out of range 0-59" },
      { "* 24 * * *", "hour 24 out of range 0-23" },
      { "* * 0 * *", "day-of-month 0 out of range 1-31" },
      { "* * * 13 *", "month 13 out of range 1-12" },
      { "* * * * 8", "day-of-week 8 out of range 0-7" },
      { "* * * foo *", 'month "foo" is not a number or a name' },
      { "*/0 * * * *", "minute step 0 must be at least 1" },
      { "10-5 * * * *", "minute range 10-5 is backwards" },
      { "1,,2 * * * *", 'minute "1,,2" has an empty list item' },
      { "* * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 4" },
      { "0 0 30 2 *", "no date matches: day-of-month 30 never falls in month 2" },
      { "@fortnightly", "unknown @fortnightly (known: @yearly @monthly @weekly @daily @hourly"
        .. " @every)" },
      { "@every 5x", '@every "5x" is not a duration like 90s, 5m, 2h or 1h30m' },
      { "@every 0s", "@every 0s must be from 1s to 1000000000s" },
      { "", "spec is empty" },
    }
    for _, c in ipairs(cases) do
      local s, why = cron.parse(c[1])
      assert.is_nil(s, c[1])
      assert.are.equal(c[2], why)
    end
  end)

  it("follow daylight saving in a named zone (TZ=America/New_York) as cron does", function()
    -- March 10 2024: 02:00 EST becomes 03:00 EDT (07:00 UTC); November 3:
    -- 02:00 EDT becomes 01:00 EST (06:00 UTC).  Times below are UTC.
    local cases = {
      -- a fixed time that is skipped runs once, when the clock jumps
      { "30 2 * * *", "2024-03-09 08:00", "2024-03-10 07:00" },
      { "30 2 * * *", "2024-03-10 07:00", "2024-03-11 06:30" },
      -- a fixed time that repeats runs once, the first time
      { "30 1 * * *", "2024-11-02 16:00", "2024-11-03 05:30" },
      { "30 1 * * *", "2024-11-03 05:30", "2024-11-04 06:30" },
      -- a job with * in minute or hour follows the clock
      { "*/30 * * * *", "2024-03-10 06:30", "2024-03-10 07:00" },
      { "*/30 * * * *", "2024-11-03 05:30", "2024-11-03 06:00" },
      { "*/30 * * * *", "2024-11-03 06:00", "2024-11-03 06:30" },
      { "*/30 * * * *", "2024-11-03 06:30", "2024-11-03 07:00" },
      { "0 9 * * *", "2024-03-09 14:00", "2024-03-10 13:00" },   -- 09:00 EDT
      { "@every 1h", "2024-03-10 06:30", "2024-03-10 07:00" },   -- (no time zone)
    }
    local lines = {}
    for i, c in ipairs(cases) do
      lines[i] = ("print(s(%q):next(%d, 'local'))"):format(c[1], utc(c[2]))
    end
    local path = helper.write_file(helper.tmpname("dst") .. ".lua", ([[
local cron = require "pgcoord.jobs.cron"
local function s(spec) return assert(cron.parse(spec)) end
%s
]]):format(table.concat(lines, "\n")))
    local code, out = helper.run({ "lua5.4", path }, { env = { TZ = "America/New_York",
      LUA_PATH = helper.root .. "/lua/?.lua;;" } })
    assert.are.equal(0, code, out)
    local i = 0
    for got in out:gmatch("[^\n]+") do
      i = i + 1
      local c = cases[i]
      assert.are.equal(c[3], show(tonumber(got)), c[1] .. " after " .. c[2] .. " (UTC)")
    end
    assert.are.equal(#cases, i, out)
    -- the same specs in UTC know nothing of it
    local plain = cron.parse("30 2 * * *")
    assert.are.equal("2024-03-10 02:30", show(plain:next(utc("2024-03-09 08:00"))))
  end)
end)

describe("jobs:periodic", function()
  it("refuses bad input at the caller's line, naming the value, and writes nothing", function()
    local g = helper.unique("pg")
    local name = helper.unique("per")
    local jobs = new_jobs()
    jobs:define("tick", function() end, { group = g })
    local line = debug.getinfo(1, "l").currentline
    local e = {
      errors(function() jobs:periodic(name, "61 * * * *", "tick") end),
      errors(function() jobs:periodic(name, "@daily", "nope") end),
      errors(function() jobs:periodic(name, "@daily", "tick", nil, { timezone = "Mars" }) end),
      errors(function() jobs:periodic(name, "@daily", "tick", nil, { backfill = -1 }) end),
      errors(function() jobs:periodic(name, "@daily", "tick", nil, { backfill = 0 / 0 }) end),
      errors(function() jobs:periodic(name, "@daily", "tick", nil, { grup = g }) end),
      errors(function() jobs:periodic(name, "@daily", "tick", { f = print }) end),
      errors(function() jobs:periodic("", "@daily", "tick") end),
      errors(function() jobs:periodic(name, 42, "tick") end),
      errors(function() jobs:periodic(name, "@daily", "tick", nil, { group = "elsewhere" }) end),
    }
    local want = {
      ('jobs:periodic "%s": bad spec "61 %%* %%* %%* %%*": minute 61 out of range 0%%-59$')
        :format(name),
      ('jobs:periodic "%s": unknown job type "nope" %%(define it first%%)$'):format(name),
      'jobs:periodic: option timezone must be one of "UTC", "local", got "Mars"$',
      "jobs:periodic: option backfill must be a number >= 0 and <= 1000000000, got %-1$",
      "jobs:periodic: option backfill must be a number .*, got [-]?nan$",
      'unknown option "grup" for jobs:periodic$',
      "params cannot be encoded as JSON",
      'jobs:periodic: name must be a non%-empty string, got ""$',
      'bad spec 42: spec must be a string, got number$',
      'unknown group "elsewhere"$',
    }
    for i, pattern in ipairs(want) do
      assert.matches("periodic_spec.lua:" .. (line + 1 + i) .. ": ", e[i], 1, true)
      assert.matches(pattern, e[i])
    end
    -- periodic_list lists the whole database; other spec files leave theirs
    for _, row in ipairs(jobs:periodic_list()) do assert.are_not.equal(name, row.name) end
    -- a scheduler with nothing declared writes nothing, nor takes the lock
    local s = started(jobs:scheduler())
    assert.are.equal(s, jobs:scheduler())
    assert.is_nil(row_of(name))
    assert.is_nil(lock_holder())
  end)
end)

describe("the scheduler", function()
  it("enqueues each slot as a job with run_at = the slot time, started with a worker", function()
    local g = helper.unique("pg")
    local name = helper.unique("per")
    local jobs = new_jobs()
    local runs = {}
    jobs:define("tick", function(job) runs[#runs + 1] = job end, { group = g })
    jobs:periodic(name, "@every 1s", "tick", { hello = "world" })
    local w = jobs:worker({ group = g, poll_interval = 30 })
    workers[#workers + 1] = w
    helper.wait_until(function() return lock_holder() end, 10, "the worker's scheduler to lead")
    started(jobs:scheduler()) -- (the one the worker started)
    helper.wait_until(function() return #runs >= 3 end, 10, "three slots to run")
    local at = {}
    for i, job in ipairs(runs) do
      at[i] = job.run_at
      assert.are.same({ hello = "world" }, job.params)
      assert.are.equal(g, job.group)
      assert.are.equal(math.floor(job.run_at), job.run_at)
    end
    assert_consecutive(at, 1, "slots of @every 1s")
    local list = jobs:periodic_list()
    assert.are.equal(1, #list)
    local p = list[1]
    assert.are.equal(name, p.name)
    assert.are.equal("@every 1s", p.spec)
    assert.are.equal(g, p.group)
    assert.is_true(p.last_run >= at[#at], "last_run " .. tostring(p.last_run))
    assert.is_true(p.next_run > p.last_run and p.next_run <= db_time() + 1,
      ("next_run %s"):format(p.next_run))
    local text = pgcoord.metrics.render()
    assert.matches('pgcoord_jobs_periodic_next_run_timestamp_seconds{name="' .. name .. '"} %d',
      text)
    assert.matches('pgcoord_jobs_periodic_last_run_timestamp_seconds{name="' .. name .. '"} %d',
      text)
    assert.matches('pgcoord_jobs_periodic_enqueued_total{name="' .. name .. '"} %d', text)
  end)

  it("enqueues no slot twice when two schedulers race without the lock", function()
    local g = helper.unique("pg")
    local name = helper.unique("per")
    local jobs = new_jobs()
    jobs:define("tick", function() end, { group = g })
    local function decls()
      local d = periodic.declaration(name, "@every 1s", nil)
      d.type, d.group = "tick", g
      return { [name] = d }
    end
    local a = started(periodic.new(pool({ size = 2 }), decls(), { lock = false }))
    local b = started(periodic.new(pool({ size = 2 }), decls(), { lock = false }))
    helper.wait_until(function() return #slots_of(g) >= 5 end, 15, "five slots")
    a:stop()
    b:stop()
    assert_once_each(g)
    assert_consecutive(slots_of(g), 1, "slots of @every 1s")
  end)

  it("keeps enqueuing every name on time while one name's writes fail", function()
    local g, bad_g = helper.unique("pg"), helper.unique("pg")
    local good, bad = helper.unique("per"), helper.unique("per")
    local function decl(name, group, params)
      local d = periodic.declaration(name, "@every 1s", nil)
      d.type, d.group, d.params = "tick", group, params
      return d
    end
    -- (params the server refuses as JSON: each of its visits fails)
    local s = started(periodic.new(pool({ size = 2 }), {
      [good] = decl(good, g), [bad] = decl(bad, bad_g, "{not json") }, { lock = false }))
    helper.wait_until(function() return #slots_of(g) >= 7 end, 15, "seven slots")
    s:stop()
    assert.are.same({}, slots_of(bad_g))
    local late = db:one([[SELECT count(*)::int AS n, max(extract(epoch FROM inserted_at - run_at))
                            AS worst FROM pgcoord.jobs
                           WHERE group_name = $1 AND inserted_at > run_at + interval '0.9 s']], g)
    assert.are.equal(0, late.n, ("slots enqueued up to %s s late"):format(tostring(late.worst)))
    assert_consecutive(slots_of(g), 1, "slots of the healthy name")
  end)

  it("skips the slots missed in an outage with backfill = 0, and schedules the next", function()
    local g = helper.unique("pg")
    local name = helper.unique("per")
    local jobs = new_jobs()
    jobs:define("tick", function() end, { group = g })
    jobs:periodic(name, "* * * * *", "tick")
    local s = jobs:scheduler()
    helper.wait_until(function() return row_of(name) end, 10, "the name's row")
    s:stop()
    -- a 10-minute outage: the last slot recorded is 10 minutes old
    db:exec([[UPDATE pgcoord.job_periodic
                 SET last_slot = date_trunc('minute', now()) - interval '10 minutes',
                     next_slot = NULL WHERE name = $1]], name)
    started(jobs:scheduler())
    local row = helper.wait_until(function()
      local r = row_of(name)
      return r.next_slot and r
    end, 10, "the scheduler to look")
    assert.are.same({}, slots_of(g))
    local now = db_time()
    assert.is_true(row.next_slot > now - 1 and row.next_slot <= now + 60,
      ("next slot %s, now %s"):format(show(row.next_slot), show(now)))
    assert.are.equal(0, row.next_slot % 60)
  end)

  it("enqueues the slots missed in an outage no older than backfill", function()
    local g = helper.unique("pg")
    local all, recent = helper.unique("per"), helper.unique("per")
    local jobs = new_jobs()
    jobs:define("tick", function() end, { group = g })
    local g2 = helper.unique("pg")
    jobs:define("tock", function() end, { group = g2 })
    jobs:periodic(all, "* * * * *", "tick", nil, { backfill = 900 })
    jobs:periodic(recent, "* * * * *", "tock", nil, { backfill = 330 })
    local s = jobs:scheduler()
    helper.wait_until(function() return row_of(all) and row_of(recent) end, 10, "the rows")
    s:stop()
    db:exec([[UPDATE pgcoord.job_periodic
                 SET last_slot = date_trunc('minute', now()) - interval '10 minutes',
                     next_slot = NULL WHERE name IN ($1, $2)]], all, recent)
    local before = row_of(all).last_slot
    started(jobs:scheduler())
    helper.wait_until(function()
      return row_of(all).next_slot and row_of(recent).next_slot
    end, 10, "the scheduler to look")
    local after = row_of(all).last_slot
    -- backfill 900: every missed minute (10, or 11 if a minute began meanwhile)
    local slots = slots_of(g)
    assert.are.equal((after - before) // 60, #slots)
    assert.is_true(#slots >= 10, #slots .. " slots")
    assert.are.equal(before + 60, slots[1])
    assert.are.equal(after, slots[#slots])
    assert_consecutive(slots, 60, "missed minutes")
    -- backfill 330: the 5 or 6 minutes of the last 330 s only
    local last5 = slots_of(g2)
    assert.is_true(#last5 == 5 or #last5 == 6, #last5 .. " slots")
    assert.are.equal(after, last5[#last5])
    assert_consecutive(last5, 60, "recent missed minutes")
    assert.is_true(last5[1] >= db_time() - 330 - 5, show(last5[1]))
    assert_once_each(g)
  end)

  it("applies a changed spec from its next slot, and records it", function()
    local g = helper.unique("pg")
    local name = helper.unique("per")
    local jobs = new_jobs()
    jobs:define("tick", function() end, { group = g })
    jobs:periodic(name, "@every 1s", "tick")
    started(jobs:scheduler())
    helper.wait_until(function() return #slots_of(g) >= 2 end, 10, "two slots")
    jobs:periodic(name, "@every 3s", "tick")
    local changed_at = db_time()
    local n = #slots_of(g)
    helper.wait_until(function() return #slots_of(g) >= n + 3 end, 20, "three more slots")
    local later = {}
    for _, at in ipairs(slots_of(g)) do
      if at > changed_at + 1 then later[#later + 1] = at end
    end
    assert.is_true(#later >= 2)
    for _, at in ipairs(later) do assert.are.equal(0, at % 3, show(at)) end
    assert_consecutive(later, 3, "slots of @every 3s")
    assert.are.equal("@every 3s", row_of(name).spec)
    assert_once_each(g)
  end)
end)

describe("examples/cron.lua", function()
  it("lists its schedules and runs two heartbeats in demo mode", function()
    local code, out = helper.run({ "pgcoord-run", "examples/cron.lua", "demo" }, { timeout = 40 })
    assert.are.equal(0, code, out)
    assert.matches("nightly%-report +0 3 %* %* %* +next %d+%-%d+%-%d+ 03:00:00 UTC", out)
    assert.matches("heartbeat +@every 2s", out)
    local _, beats = out:gsub("heartbeat, slot ", "")
    assert.is_true(beats >= 2, out)
  end)
end)

describe("two processes", function()
  -- Declares `name` @every 1s in `group` (backfill 5 s: the slots of a
  -- hand-over are caught up) and schedules until SIGTERM.
  local SCRIPT = [[
local group, name = ...
io.stdout:setvbuf("no")
local db = pgcoord.connect(nil, { size = 4 })
local sub = pgcoord.subscriber(db)
sub:start()
local jobs = pgcoord.jobs(db, { subscriber = sub })
jobs:define("tick", function() end, { group = group })
jobs:periodic(name, "@every 1s", "tick", nil, { backfill = 5 })
jobs:scheduler()
print("scheduling")
]]

  it("enqueue each slot of @every 1s once, one at a time, and hand over on a stop", function()
    local g = helper.unique("pg")
    local name = helper.unique("per")
    local path = helper.write_file(helper.tmpname("sched") .. ".lua", SCRIPT)
    local p1 = helper.start({ "pgcoord-run", path, g, name })
    local p2 = helper.start({ "pgcoord-run", path, g, name })
    p1:wait_output("scheduling")
    p2:wait_output("scheduling")
    helper.wait_until(function() return #slots_of(g) >= 3 end, 15, "three slots")
    -- the holder stops: the other takes over at once (the lock's release
    -- is notified) and catches up any slot of the hand-over
    local holder, other = p1, p2
    if not p1:output():find("periodic scheduler is scheduling", 1, true) then
      holder, other = p2, p1
    end
    assert.is_nil(other:output():find("periodic scheduler is scheduling", 1, true),
      "both processes scheduled at once")
    holder:kill("TERM")
    assert.are.equal(0, holder:wait(15), holder:output())
    local n = #slots_of(g)
    other:wait_output("periodic scheduler is scheduling", 10)
    helper.wait_until(function() return #slots_of(g) >= n + 3 end, 15, "three more slots")
    other:kill("TERM")
    assert.are.equal(0, other:wait(15), other:output())
    assert_once_each(g)
    assert_consecutive(slots_of(g), 1, "slots across the hand-over")
  end)
end)

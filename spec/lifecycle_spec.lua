-- The process lifecycle: stop handlers that can be removed, and a graceful
-- stop with a deadline (pgcoord-run --stop-timeout, pgcoord.stop({ timeout })),
-- in processes of their own.
local pgcoord = require "pgcoord"
local helper = require "helper"

local function script(text)
  return helper.write_file(helper.tmpname("script") .. ".lua", text)
end

-- A script whose task ignores pgcoord.stopping() and sleeps forever.
local STUBBORN = [[
  io.stdout:setvbuf("no")
  pgcoord.spawn(function()
    local _ <close> = setmetatable({}, { __close = function() print("closed") end })
    while true do pgcoord.sleep(0.1) end
  end)
  print("ready")
]]

describe("the stop deadline", function()
  after_each(helper.cleanup)

  it("cancels a task that ignores the stop, names it, and exits 1", function()
    local p = helper.start({ "pgcoord-run", "--stop-timeout", "0.5", script(STUBBORN) })
    p:wait_output("ready")
    local t0 = pgcoord.now()
    p:kill("TERM")
    local code = p:wait(10)
    local elapsed = pgcoord.now() - t0
    local out = p:output()
    assert.are.equal(1, code, out)
    assert.is_true(elapsed >= 0.5 and elapsed < 5, "exited after " .. elapsed)
    assert.matches("closed", out, 1, true) -- its to-be-closed variable ran
    assert.matches('msg="stop deadline passed, cancelling what is still running"', out, 1, true)
    assert.matches("running=script[%w_]*%.lua:2", out)
    assert.are.equal(1, select(2, out:gsub("stop deadline passed", "")))
  end)

  it("defaults to 30 s: a well-behaved script exits 0 well before it", function()
    local path = script([[
      io.stdout:setvbuf("no")
      pgcoord.spawn(function()
        while not pgcoord.stopping() do pgcoord.sleep(0.05) end
        print("saw the stop")
      end)
      local remove = pgcoord.on_stop(function() print("never runs") end)
      remove()
      pgcoord.on_stop(function() print("stop handler ran") end)
      print("ready")
    ]])
    local p = helper.start({ "pgcoord-run", path })
    p:wait_output("ready")
    local t0 = pgcoord.now()
    p:kill("TERM")
    assert.are.equal(0, p:wait(10), p:output())
    assert.is_true(pgcoord.now() - t0 < 5)
    local out = p:output()
    assert.matches("saw the stop", out, 1, true)
    assert.matches("stop handler ran", out, 1, true)
    assert.is_nil(out:find("never runs", 1, true))
    assert.is_nil(out:find("deadline", 1, true))
  end)

  it("pgcoord.stop({ timeout }) in a stock lua5.4 program: run() returns false", function()
    local path = script([[
      local pgcoord = require "pgcoord"
      pgcoord.spawn(function() while true do pgcoord.sleep(0.1) end end)
      pgcoord.spawn(function() pgcoord.sleep(0.1) pgcoord.stop({ timeout = 0.3 }) end)
      print("run returned", pgcoord.run())
      print(pcall(pgcoord.stop, { timeout = -1 }))
      print(pcall(pgcoord.stop, { timout = 1 }))
    ]])
    local code, out = helper.run({ "lua5.4", path }, { env = helper.lua_env() })
    assert.are.equal(0, code, out)
    assert.matches("run returned\tfalse", out, 1, true)
    assert.matches("timeout must be a number of seconds > 0", out, 1, true)
    assert.matches('unknown option "timout" for pgcoord.stop', out, 1, true)
  end)

  it("--stop-timeout refuses what is not a positive number", function()
    local code, out = helper.run({ "pgcoord-run", "--stop-timeout", "soon", "-e", "" })
    assert.are.equal(1, code)
    assert.matches("--stop-timeout takes a number of seconds > 0, got soon", out, 1, true)
  end)

  it("--workers children get the deadline too; the supervisor exits 1", function()
    local p = helper.start({ "pgcoord-run", "--workers", "2", "--stop-timeout", "0.5",
      script(STUBBORN) })
    helper.wait_until(function()
      return select(2, p:output():gsub("ready", "")) == 2
    end, 10, "both workers to start")
    local t0 = pgcoord.now()
    p:kill("TERM")
    local code = p:wait(15)
    local out = p:output()
    assert.are.equal(1, code, out)
    assert.is_true(pgcoord.now() - t0 < 8)
    assert.are.equal(2, select(2, out:gsub("stop deadline passed", "")), out)
  end)

  it("a job whose handler ignores the stop goes back for a retry", function()
    local group = helper.unique("jg")
    local path = script(([[
      io.stdout:setvbuf("no")
      local db = pgcoord.connect()
      pgcoord.migrate(db)
      local jobs = pgcoord.jobs(db)
      jobs:define("forever", function() while true do pgcoord.sleep(0.1) end end,
        { group = %q })
      jobs:schedule_now(db, "forever", {})
      local w = jobs:worker({ group = %q })
      w:ready()
      while w:stats().running == 0 do pgcoord.sleep(0.01) end
      print("running")
    ]]):format(group, group))
    local p = helper.start({ "pgcoord-run", "--stop-timeout", "0.5", path })
    p:wait_output("running", 20)
    p:kill("TERM")
    assert.are.equal(1, p:wait(15), p:output())
    local row = helper.admin():one(
      "SELECT state, locked_by, error_count FROM pgcoord.jobs WHERE group_name = $1", group)
    assert.is_not_nil(row)
    assert.are_not.equal("running", row.state)
    assert.is_nil(row.locked_by)
  end)
end)

describe("a graceful stop that waits", function()
  after_each(helper.cleanup)

  it("says every few seconds which services and tasks it waits for, signals by name",
    function()
    -- (a prefix of its own: the counter of helper.unique starts again in each
    -- spec file, so a "jg" group could be another file's)
    local group = helper.unique("stop_wait")
    local path = script(([[
      io.stdout:setvbuf("no")
      require("pgcoord.lifecycle").WAIT_REPORT_EVERY = 0.3 -- (5 s by default)
      local db = pgcoord.connect()
      pgcoord.migrate(db)
      local jobs = pgcoord.jobs(db)
      local release = false
      jobs:define("slow", function()
        while not release do pgcoord.sleep(0.05) end
      end, { group = %q })
      jobs:schedule_now(db, "slow", {})
      local w = jobs:worker({ group = %q })
      w:ready()
      while w:stats().running == 0 do pgcoord.sleep(0.01) end
      -- (the stop waits until it has been reported twice)
      local reports = 0
      pgcoord.log.set_sink(function(line)
        if line:find('msg="stop waiting"', 1, true) then reports = reports + 1 end
        io.stderr:write(line, "\n")
      end)
      pgcoord.on_stop(function()
        while reports < 2 do pgcoord.sleep(0.05) end
        release = true
      end, "the slow part")
      print("running")
    ]]):format(group, group))
    local p = helper.start({ "pgcoord-run", path })
    p:wait_output("running", 20)
    p:kill("TERM")
    assert.are.equal(0, p:wait(15), p:output())
    local out = p:output()
    assert.matches('msg="stopping gracefully" signal=SIGTERM', out, 1, true)
    local reports = {}
    for line in out:gmatch("[^\n]+") do
      if line:find('msg="stop waiting"', 1, true) then reports[#reports + 1] = line end
    end
    assert.is_true(#reports >= 2, out)
    -- both stop handlers, named, and the job's runner by where it was spawned
    assert.matches(' msg="stop waiting" deadline_in=%d+%.%d elapsed=%d+%.%d'
      .. ' running="?[%w_]+%.lua:%d+.* tasks=%d+ waiting_for="job worker ' .. group
      .. ', the slow part"$', reports[1])
    assert.is_nil(out:find("deadline passed", 1, true))
  end)
end)

describe("the process name of job workers and lock holders", function()
  after_each(helper.cleanup)

  -- The names a worker and a lock holder write, read back from their rows
  -- (a lock's holder is the process name and a nonce).
  local NAMES = script([[
    local group, lock_name = ...
    local db = pgcoord.connect()
    local jobs = pgcoord.jobs(db)
    jobs:define("noop", function() end, { group = group })
    local w = jobs:worker({ group = group })
    w:ready()
    print("worker=" .. db:one("SELECT name FROM pgcoord.job_workers WHERE id = $1",
      w:stats().id).name)
    w:stop()
    pgcoord.joblock(db, lock_name):run(function()
      print("holder=" .. db:one("SELECT holder FROM pgcoord.job_locks WHERE name = $1",
        lock_name).holder)
    end)
    db:close()
  ]])

  local function names(opts)
    local code, out = helper.run({ "pgcoord-run", NAMES, helper.unique("pn"),
      helper.unique("pn_lock") }, opts)
    assert.are.equal(0, code, out)
    return out
  end

  it("is HOSTNAME:pid, or the kernel's host name without HOSTNAME", function()
    local kernel = assert(io.popen("uname -n")):read("l"):gsub("%p", "%%%0")
    local out = names({ unset = { "HOSTNAME" } })
    assert.matches("worker=" .. kernel .. ":%d+\n", out)
    assert.matches("holder=" .. kernel .. ":%d+:%x+\n", out)
    out = names({ env = { HOSTNAME = "box-7" } })
    assert.matches("worker=box%-7:%d+\n", out)
    assert.matches("holder=box%-7:%d+:%x+\n", out)
  end)
end)

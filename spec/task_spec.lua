-- The runtime: tasks, sleeping, cancellation, the loop, time.
-- Busted runs in Lua's main thread, so waiting calls here drive the loop
-- themselves (the stock lua5.4 mode).
local pgcoord = require "pgcoord"
local helper = require "helper"

describe("tasks", function()
  after_each(function()
    pgcoord.log.set_sink(nil)
    helper.cleanup()
  end)

  it("spawn passes arguments and join returns all results, nils included", function()
    local t = pgcoord.spawn(function(a, b)
      pgcoord.sleep(0.001)
      return a + b, nil, "x"
    end, 40, 2)
    local r = table.pack(t:join())
    assert.are.equal(3, r.n)
    assert.are.equal(42, r[1])
    assert.is_nil(r[2])
    assert.are.equal("x", r[3])
    assert.are.equal("done", t:status())
    -- joining again returns the same results
    assert.are.equal(42, (t:join()))
  end)

  it("runs many tasks concurrently", function()
    local tasks = {}
    local t0 = pgcoord.now()
    for i = 1, 100 do
      tasks[i] = pgcoord.spawn(function()
        pgcoord.sleep(0.05)
        return i * i
      end)
    end
    for i = 1, 100 do assert.are.equal(i * i, tasks[i]:join()) end
    -- 100 sleeps of 50 ms run side by side, not one after the other (5 s)
    local elapsed = pgcoord.now() - t0
    assert.is_true(elapsed < 2.5, "took " .. elapsed)
  end)

  it("a task can join another task", function()
    local inner = pgcoord.spawn(function()
      pgcoord.sleep(0.01)
      return "inner"
    end)
    local outer = pgcoord.spawn(function() return inner:join() .. "+outer" end)
    assert.are.equal("inner+outer", outer:join())
  end)

  it("join re-raises the task's error, a string with its position", function()
    local t = pgcoord.spawn(function()
      pgcoord.sleep(0.001)
      error("boom in task")
    end)
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.are.equal("string", type(err))
    assert.matches("boom in task", err, 1, true)
    assert.matches("task_spec.lua:%d+:", err)
    assert.are.equal("failed", t:status())
  end)

  it("join re-raises a table error as the very same table", function()
    local e = { code = 42 }
    local t = pgcoord.spawn(function()
      pgcoord.sleep(0.001)
      error(e)
    end)
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.are.equal(e, err)
    assert.are.equal(42, err.code)
    -- and again on a second join
    local ok2, err2 = pcall(t.join, t)
    assert.is_false(ok2)
    assert.are.equal(e, err2)
  end)

  it("a task's error that nobody joins is logged, one short line, and kills nothing", function()
    local lines = {}
    pgcoord.log.set_sink(function(line) lines[#lines + 1] = line end)
    local survivor = pgcoord.spawn(function()
      pgcoord.sleep(0.05)
      return "still here"
    end)
    local function failing_function_name() error("unjoined failure xyz") end
    local t = pgcoord.spawn(function()
      pgcoord.sleep(0.001)
      failing_function_name()
    end)
    helper.wait_until(function() return t:status() == "failed" end, 5, "the task to fail")
    local all = helper.wait_until(function()
      for _, line in ipairs(lines) do
        if line:find("unjoined failure xyz", 1, true) then return line end
      end
    end, 5, "the log line")
    assert.matches("level=error", all, 1, true)
    assert.matches("task failed", all, 1, true)
    -- the error's first line, where it was raised; the traceback only at debug
    assert.matches('error="spec/task_spec.lua:%d+: unjoined failure xyz"', all)
    assert.is_nil(all:find("stack traceback", 1, true), all)
    assert.are.equal("still here", survivor:join())
    -- the loop still runs new tasks
    assert.are.equal(7, pgcoord.spawn(function() return 7 end):join())
  end)

  it("a table error with __tostring is logged readably", function()
    local lines = {}
    pgcoord.log.set_sink(function(line) lines[#lines + 1] = line end)
    local t = pgcoord.spawn(function()
      error(setmetatable({}, { __tostring = function() return "custom error text" end }))
    end)
    helper.wait_until(function() return t:status() == "failed" end, 5, "the task to fail")
    helper.wait_until(function()
      return table.concat(lines, "\n"):find("custom error text", 1, true)
    end, 5, "the log line")
  end)

  it("an error is not logged when somebody is joining", function()
    local lines = {}
    pgcoord.log.set_sink(function(line) lines[#lines + 1] = line end)
    local t = pgcoord.spawn(function()
      pgcoord.sleep(0.01)
      error("joined failure")
    end)
    assert.is_false(pcall(t.join, t))
    pgcoord.sleep(0) -- a report would come from the loop
    assert.is_nil(table.concat(lines, "\n"):find("joined failure", 1, true))
  end)

  it("cancels a sleeping task: status cancelled, join raises a cancellation", function()
    local started, after = false, false
    local t = pgcoord.spawn(function()
      started = true
      pgcoord.sleep(30)
      after = true
    end)
    helper.wait_until(function() return started end, 5, "the task to start")
    local t0 = pgcoord.now()
    assert.is_true(t:cancel())
    assert.are.equal("cancelled", t:status())
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.is_true(pgcoord.is_cancelled(err))
    assert.is_false(after)
    assert.is_true(pgcoord.now() - t0 < 5)
    -- cancelling again is a no-op
    assert.is_false(t:cancel())
    assert.is_false(pgcoord.is_cancelled("task cancelled"))
    assert.is_false(pgcoord.is_cancelled({ message = "task cancelled" }))
  end)

  it("cancels a task that has not started yet", function()
    local ran = false
    local t = pgcoord.spawn(function() ran = true end)
    assert.is_true(t:cancel())
    assert.are.equal("cancelled", t:status())
    pgcoord.sleep(0.001)
    assert.is_false(ran)
  end)

  it("a cancelled task's to-be-closed variables run, innermost first", function()
    local closed = {}
    local started = false
    local t = pgcoord.spawn(function()
      local outer <close> = setmetatable({}, {
        __close = function() closed[#closed + 1] = "outer" end,
      })
      local function inner()
        local guard <close> = setmetatable({}, { __close = function(_, e)
          closed[#closed + 1] = "inner"
          closed.err = e
        end })
        started = true
        assert(guard)
        pgcoord.sleep(30)
      end
      inner()
      return outer
    end)
    helper.wait_until(function() return started end, 5, "the task to start")
    t:cancel()
    assert.are.same({ "inner", "outer" }, { closed[1], closed[2] })
    assert.are.equal(2, #closed)
  end)

  it("a task can cancel another task", function()
    local victim = pgcoord.spawn(function() pgcoord.sleep(30) end)
    local killer = pgcoord.spawn(function()
      pgcoord.sleep(0.01)
      return victim:cancel()
    end)
    assert.is_true(killer:join())
    assert.are.equal("cancelled", victim:status())
    local ok, err = pcall(victim.join, victim)
    assert.is_false(ok)
    assert.is_true(pgcoord.is_cancelled(err))
  end)

  it("a task that cancels itself ends as cancelled", function()
    local after = false
    local t = pgcoord.spawn(function()
      pgcoord.sleep(0.001)
      pgcoord.current_task():cancel()
      after = true
    end)
    local ok, err = pcall(t.join, t)
    assert.is_false(ok)
    assert.is_true(pgcoord.is_cancelled(err))
    assert.are.equal("cancelled", t:status())
    assert.is_false(after)
  end)

  it("a task waiting in join can be cancelled, and the joined task goes on", function()
    local sleeper = pgcoord.spawn(function()
      pgcoord.sleep(0.05)
      return "slept"
    end)
    local joiner = pgcoord.spawn(function() return sleeper:join() end)
    pgcoord.sleep(0.001)
    joiner:cancel()
    assert.are.equal("cancelled", joiner:status())
    assert.are.equal("slept", sleeper:join())
  end)

  it("joiners that give up leave; the rest wake in the order they came", function()
    local lines = {}
    pgcoord.log.set_sink(function(line) lines[#lines + 1] = line end)
    local gate = require("pgcoord.task").signal()
    local t = pgcoord.spawn(function()
      gate:wait()
      error("failed with joiners")
    end)
    local woke, joiners = {}, {}
    for i = 1, 300 do
      joiners[i] = pgcoord.spawn(function()
        assert.is_false(pcall(t.join, t))
        woke[#woke + 1] = i
      end)
    end
    for _ = 1, 200 do assert.is_false(t:wait(0)) end -- polls that time out
    helper.wait_until(function() return t.joining == 300 end, 5, "300 joiners")
    for i = 1, 300, 3 do joiners[i]:cancel() end
    assert.are.equal(200, t.joining)
    gate:notify()
    for _, j in ipairs(joiners) do j:wait() end
    local expected = {}
    for i = 1, 300 do
      if i % 3 ~= 1 then expected[#expected + 1] = i end
    end
    assert.are.same(expected, woke)
    assert.is_nil(table.concat(lines, "\n"):find("failed with joiners", 1, true))
    -- every joiner gone: the failure is nobody's, and logged
    local lone = pgcoord.spawn(function()
      gate:wait()
      error("failed alone")
    end)
    local quitters = {}
    for i = 1, 50 do quitters[i] = pgcoord.spawn(lone.join, lone) end
    helper.wait_until(function() return lone.joining == 50 end, 5, "50 joiners")
    for _, q in ipairs(quitters) do q:cancel() end
    gate:notify()
    helper.wait_until(function()
      return table.concat(lines, "\n"):find("failed alone", 1, true)
    end, 5, "the failure's log line")
  end)

  it("sleepers wake in the order of their deadlines", function()
    local order = {}
    local tasks = {}
    for _, d in ipairs({ 0.05, 0.01, 0.03, 0.02, 0.04 }) do
      tasks[#tasks + 1] = pgcoord.spawn(function()
        pgcoord.sleep(d)
        order[#order + 1] = d
      end)
    end
    for _, t in ipairs(tasks) do t:join() end
    assert.are.same({ 0.01, 0.02, 0.03, 0.04, 0.05 }, order)
  end)

  it("sleep waits at least the time asked, in a task and in the main thread", function()
    local t0 = pgcoord.now()
    pgcoord.sleep(0.05)
    assert.is_true(pgcoord.now() - t0 >= 0.049)
    local elapsed = pgcoord.spawn(function()
      local s = pgcoord.now()
      pgcoord.sleep(0.03)
      return pgcoord.now() - s
    end):join()
    assert.is_true(elapsed >= 0.029, "slept " .. elapsed)
    assert.is_true(elapsed < 5, "slept " .. elapsed)
  end)

  it("no sleep ends before pgcoord.now() reaches its deadline, after busy work too", function()
    -- libevent times a timer from the time it read when the loop last
    -- woke, by its coarse clock: unchecked, a sleep armed after 3 ms of
    -- work would end about that much early; 2 µs is the timer's rounding
    -- (in a task, which runs inside the loop's step, as such timers are armed)
    local early = pgcoord.spawn(function()
      local early = {}
      for i = 1, 60 do
        local busy = pgcoord.now()
        while pgcoord.now() - busy < 0.003 do end
        local d = 0.001 + (i % 9) * 0.0005
        local t0 = pgcoord.now()
        pgcoord.sleep(d)
        local slept = pgcoord.now() - t0
        if slept < d - 2e-6 then early[#early + 1] = ("%.6f < %.4f"):format(slept, d) end
      end
      return early
    end):join()
    assert.are.same({}, early)
  end)

  it("sleep(0) lets the other ready tasks run", function()
    local trace = {}
    local a = pgcoord.spawn(function()
      trace[#trace + 1] = "a1"
      pgcoord.sleep(0)
      trace[#trace + 1] = "a2"
    end)
    local b = pgcoord.spawn(function()
      trace[#trace + 1] = "b1"
      pgcoord.sleep(0)
      trace[#trace + 1] = "b2"
    end)
    a:join()
    b:join()
    assert.are.same({ "a1", "b1", "a2", "b2" }, trace)
  end)

  it("sleep rejects a bad duration clearly", function()
    local ok, err = pcall(pgcoord.sleep, "soon")
    assert.is_false(ok)
    assert.matches("pgcoord.sleep", err, 1, true)
    ok, err = pcall(pgcoord.sleep, 0 / 0)
    assert.is_false(ok)
    assert.matches("seconds must be a number", err, 1, true)
  end)

  it("spawn rejects a non-function clearly", function()
    local ok, err = pcall(pgcoord.spawn, 42)
    assert.is_false(ok)
    assert.matches("expected a function, got number", err, 1, true)
  end)

  it("a task cannot join itself", function()
    local t
    t = pgcoord.spawn(function()
      pgcoord.sleep(0.001)
      return pcall(t.join, t)
    end)
    local ok, err = t:join()
    assert.is_false(ok)
    assert.matches("cannot", err, 1, true)
    assert.matches("itself", err, 1, true)
  end)

  it("waiting in a plain coroutine is a clear error", function()
    local co = coroutine.wrap(function() return pcall(pgcoord.sleep, 0.01) end)
    local ok, err = co()
    assert.is_false(ok)
    assert.matches("plain coroutine", err, 1, true)
  end)
end)

describe("the loop", function()
  after_each(helper.cleanup)

  it("tasks that keep one another ready do not hold up timers", function()
    -- two tasks that never wait, each handing over to the other with
    -- pass(): the loop must still poll for events between their turns
    local task = require "pgcoord.task"
    local t0, stop, turns = pgcoord.now(), false, 0
    local function spin()
      -- (a watchdog: ends on its own should the sleeper never wake)
      while not stop and pgcoord.now() - t0 < 5 do
        turns = turns + 1
        task.pass()
      end
    end
    local a, b = pgcoord.spawn(spin), pgcoord.spawn(spin)
    local sleeper = pgcoord.spawn(function()
      pgcoord.sleep(0.05)
      return pgcoord.now()
    end)
    local woke = sleeper:join()
    stop = true
    a:join()
    b:join()
    assert.is_true(woke - t0 < 1, ("the sleeper woke after %.3f s"):format(woke - t0))
    assert.is_true(turns > 10, "the spinning tasks hardly ran: " .. turns)
  end)

  it("step(timeout) returns by its timeout", function()
    local elapsed = helper.timed(pgcoord.step, 0.05)
    assert.is_true(elapsed < 1, "returned after " .. elapsed)
  end)

  it("step(timeout) waits about timeout when nothing happens; step() returns false then", function()
    -- A fresh process, where nothing else is registered on the loop.
    local code, out = helper.run({ "lua5.4", "-e", [[
      local pgcoord = require "pgcoord"
      local t0 = pgcoord.now()
      local r = pgcoord.step(0.05)
      print(("STEP=%.3f %s"):format(pgcoord.now() - t0, tostring(r)))
      t0 = pgcoord.now()
      r = pgcoord.step()
      print(("IDLE=%.3f %s"):format(pgcoord.now() - t0, tostring(r)))
    ]] }, { env = {
      LUA_PATH = helper.root .. "/lua/?.lua;" .. helper.root .. "/lua/?/init.lua;;",
      LUA_CPATH = helper.root .. "/lua/?.so;;",
    } })
    assert.are.equal(0, code, out)
    local step = tonumber(out:match("STEP=([%d.]+) true"))
    assert.truthy(step, out)
    assert.is_true(step >= 0.045 and step < 1, out)
    local idle = tonumber(out:match("IDLE=([%d.]+) false"))
    assert.truthy(idle, out)
    assert.is_true(idle < 0.5, out)
  end)

  it("step(0) returns at once", function()
    local keep = pgcoord.spawn(function() pgcoord.sleep(10) end)
    local elapsed = helper.timed(pgcoord.step, 0)
    assert.is_true(elapsed < 1, "returned after " .. elapsed)
    keep:cancel()
  end)

  it("step runs ready tasks and returns when an event has been handled", function()
    local ran = false
    pgcoord.spawn(function() ran = true end)
    local deadline = pgcoord.now() + 5
    while not ran and pgcoord.now() < deadline do pgcoord.step(1) end
    assert.is_true(ran)
    -- a timer firing makes step return before its timeout
    local woke = false
    local t = pgcoord.spawn(function()
      pgcoord.sleep(0.02)
      woke = true
    end)
    local elapsed = helper.timed(function()
      while not woke do pgcoord.step(5) end
    end)
    assert.is_true(elapsed < 2.5, "took " .. elapsed)  -- (step's own timeout is 5 s)
    t:join()
  end)

  it("step cannot be called from inside a task", function()
    local ok, err = pgcoord.spawn(function() return pcall(pgcoord.step, 0) end):join()
    assert.is_false(ok)
    assert.matches("main thread", tostring(err), 1, true)
  end)

  it("now is monotonic and follows sleeps", function()
    local prev = pgcoord.now()
    assert.are.equal("number", type(prev))
    for _ = 1, 1000 do
      local n = pgcoord.now()
      assert.is_true(n >= prev)
      prev = n
    end
    local t0 = pgcoord.now()
    pgcoord.sleep(0.02)
    local d = pgcoord.now() - t0
    assert.is_true(d >= 0.019 and d < 5, "slept " .. d)
  end)

  it("run() returns once the tasks are done, on_stop handlers run on stop()", function()
    -- pgcoord.stop() is once per process: run it in a child process.
    local script = helper.write_file(helper.tmpname("run") .. ".lua", [[
      local pgcoord = require "pgcoord"
      local out = {}
      pgcoord.on_stop(function() out[#out + 1] = "on_stop" end)
      pgcoord.spawn(function()
        while not pgcoord.stopping() do pgcoord.sleep(0.01) end
        out[#out + 1] = "worker saw stop"
      end)
      pgcoord.spawn(function()
        pgcoord.sleep(0.05)
        out[#out + 1] = "stopper"
        pgcoord.stop()
      end)
      pgcoord.run()
      print(table.concat(out, ","))
    ]])
    local code, out = helper.run({ "lua5.4", script }, { env = {
      LUA_PATH = helper.root .. "/lua/?.lua;" .. helper.root .. "/lua/?/init.lua;;",
      LUA_CPATH = helper.root .. "/lua/?.so;;",
    } })
    assert.are.equal(0, code, out)
    -- the stop handler and the worker both run after the stop, in either order
    local seen = {}
    for item in out:gmatch("[^,\n]+") do seen[#seen + 1] = item end
    assert.are.equal("stopper", seen[1], out)
    table.sort(seen)
    assert.are.same({ "on_stop", "stopper", "worker saw stop" }, seen)
  end)
end)

describe("signals, options and backoff", function()
  local task = require "pgcoord.task"
  local options = require "pgcoord.options"
  local backoff = require "pgcoord.backoff"
  after_each(helper.cleanup)

  it("a signal keeps a wake-up nobody waited for, once", function()
    local s = task.signal()
    s:notify()
    s:notify()
    local took, t = helper.timed(s.wait, s, 5)
    assert.is_true(t)
    assert.is_true(took < 1)
    assert.is_false(s:wait(0.02)) -- two notifies kept one wake-up
    local woke
    local waiter = helper.spawn(function() woke = s:wait(5) end)
    helper.wait_until(function() return next(s.cond.waiters) ~= nil end, 5, "the waiter")
    assert.is_true(s:notify()) -- (it says whether a task was waiting)
    waiter:join()
    assert.is_true(woke)
    assert.is_false(s:wait(0.02)) -- a wake-up a waiter took is not kept
    assert.is_false(s:notify())
    assert.is_false(s:notify())
  end)

  it("options: defaults, kinds, ranges, unknown keys, named at the caller's line", function()
    local check = options.spec("thing:new", {
      n = { "integer", default = 3, min = 1, max = 10 },
      t = { "number", default = 1, above = 0 },
      mode = { { "drop", "error" }, default = "drop" },
      name = { "string" },
    })
    assert.are.same({ n = 3, t = 1, mode = "drop" }, check(nil))
    assert.are.same({ n = 5, t = 0.5, mode = "error", name = "x" },
      check({ n = 5, t = 0.5, mode = "error", name = "x" }))
    local line = debug.getinfo(1, "l").currentline + 1
    local ok, err = pcall(function() check({ cuont = 1 }) end)
    assert.is_false(ok)
    assert.are.equal(("spec/task_spec.lua:%d: unknown option \"cuont\" for thing:new"):format(line),
      err:match("spec/.*"))
    assert.matches("thing:new: option n must be an integer >= 1 and <= 10, got 1000000",
      helper.error_of(check, { n = 1e6 }))
    assert.matches("option n must be an integer >= 1 and <= 10, got 2.5",
      helper.error_of(check, { n = 2.5 }), 1, true)
    assert.matches("option t must be a number > 0, got 0",
      helper.error_of(check, { t = 0 }), 1, true)
    assert.matches("option t must be a number > 0, got inf",
      helper.error_of(check, { t = math.huge }), 1, true)
    assert.matches('option mode must be one of "drop", "error", got "keep"',
      helper.error_of(check, { mode = "keep" }), 1, true)
    assert.matches('option name must be a non-empty string, got ""',
      helper.error_of(check, { name = "" }), 1, true)
  end)

  it("backoff grows to its cap with jitter and resets", function()
    local b = backoff.new({ base = 0.1, cap = 1 })
    local last
    for i = 1, 8 do
      last = b:next()
      local step = math.min(1, 0.1 * 2 ^ (i - 1))
      assert.is_true(last >= step / 2 and last <= step, ("try %d: %g"):format(i, last))
    end
    assert.is_true(last >= 0.5)
    b:reset()
    assert.is_true(b:next() <= 0.1)
  end)
end)

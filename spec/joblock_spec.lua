-- Job lock: several real pgcoord-run processes compete for one lock while
-- the spec kills, stops and cuts them off.  The invariant checked after
-- every scenario: each holder writes (token, clock_timestamp()) rows while
-- it holds, and no two tokens' holding intervals overlap.
local pgcoord = require "pgcoord"
local helper = require "helper"

local PING = 0.3 -- stale_after 1.2 s, check_interval 0.6 s, timeout 0.15 s

local COMPETITOR = [[
local name, fence = arg[1], arg[2]
local ping = tonumber(arg[3])
local db = pgcoord.connect(os.getenv("LOCK_DSN"), { size = 3,
  params = { application_name = os.getenv("APP") }, connect_timeout = 1 })
local pid = tonumber(io.open("/proc/self/stat"):read("l"):match("^(%d+)"))
local function say(fmt, ...)
  io.stdout:write(fmt:format(...), "\n")
  io.stdout:flush()
end
-- a subscriber hears releases, so a waiting process takes over at once
local sub = pgcoord.subscriber(db, { ping_interval = 5, ping_grace = 10 })
sub:start()
pgcoord.run_in_job_lock(db, "spec", name, { ping_interval = ping, subscriber = sub },
  function(ctx)
    local _ <close> = setmetatable({}, { __close = function()
      say("stopped token=%d at=%.6f", ctx.token, pgcoord.time())
    end })
    say("holding token=%d pid=%d", ctx.token, pid)
    while true do
      db:exec(("INSERT INTO %s (token, pid, at) VALUES ($1, $2, clock_timestamp())")
        :format(fence), ctx.token, pid)
      pgcoord.sleep(0.03)
    end
  end)
]]

-- A competitor whose writes (token, pid, at) are fenced, each after 0.5 s
-- of pg_sleep in its transaction (the spec stops the process there).  The
-- writes run in a task of their own, which losing the lock does not
-- cancel: like a write already on the wire when a paused process
-- resumes, only the fence keeps it out.
local FENCED_COMPETITOR = [[
local name, fence = arg[1], arg[2]
local ping = tonumber(arg[3])
local db = pgcoord.connect(nil, { size = 4, params = { application_name = os.getenv("APP") } })
local pid = require("pgcoord.core").getpid()
local function say(fmt, ...)
  io.stdout:write(fmt:format(...), "\n")
  io.stdout:flush()
end
pgcoord.run_in_job_lock(db, "spec", name, { ping_interval = ping }, function(ctx)
  say("holding token=%d pid=%d", ctx.token, pid)
  pgcoord.spawn(function()
    while true do
      local ok, err = pcall(db.tx, db, function(tx)
        tx:exec("SELECT pg_sleep(0.5)")
        tx:exec(("INSERT INTO %s (token, pid, at) VALUES ($1, $2, clock_timestamp())")
          :format(fence), ctx.token, pid)
        ctx.fence(tx)
      end)
      if not ok then
        say("fence refused token=%d: %s", ctx.token, tostring(err))
        return
      end
    end
  end)
  pgcoord.sleep(3600)
end)
]]

local function make_fence(db)
  local name = helper.unique("lock")
  local fence = helper.unique("fence")
  db:exec(("CREATE TABLE %s (token bigint NOT NULL, pid int NOT NULL, at timestamptz NOT NULL)")
    :format(fence))
  return name, fence
end

local function start_competitors(n, name, fence, dsn, source)
  local script = helper.write_file(helper.tmpname("competitor") .. ".lua", source or COMPETITOR)
  local procs = {}
  for i = 1, n do
    local app = helper.unique("competitor")
    procs[i] = helper.start({ "pgcoord-run", script, name, fence, tostring(PING) },
      { env = { LOCK_DSN = (type(dsn) == "table" and dsn[i] or dsn) or "", APP = app } })
    procs[i].app = app
  end
  return procs
end

-- { token, pid, first, last } per token, in token order.
local function intervals(db, fence)
  return db:query(("SELECT token, min(pid) AS pid, extract(epoch FROM min(at)) AS first,"
    .. " extract(epoch FROM max(at)) AS last, count(*) AS n FROM %s GROUP BY token ORDER BY token")
    :format(fence))
end

local function assert_no_overlap(db, fence)
  -- a token is one holding: never two processes writing under it
  local shared = db:query(("SELECT token FROM %s GROUP BY token HAVING count(DISTINCT pid) > 1")
    :format(fence))
  assert.are.equal(0, #shared, "a token written by more than one process")
  local rows = intervals(db, fence)
  for i = 2, #rows do
    assert.is_true(rows[i].first > rows[i - 1].last,
      ("token %d (until %.6f) overlaps token %d (from %.6f)"):format(rows[i - 1].token,
        rows[i - 1].last, rows[i].token, rows[i].first))
  end
  return rows
end

local function holder(db, fence)
  return db:one(("SELECT token, pid FROM %s ORDER BY at DESC LIMIT 1"):format(fence))
end

local function wait_new_token(db, fence, after, timeout)
  return helper.wait_until(function()
    local r = db:one(("SELECT token, pid, extract(epoch FROM min(at)) AS first FROM %s"
      .. " WHERE token > $1 GROUP BY token, pid ORDER BY token LIMIT 1"):format(fence), after)
    return r
  end, timeout or 10, "another process to take the lock")
end

local function process_of(procs, pid)
  for _, p in ipairs(procs) do
    if p.pid == pid then return p end
  end
  error("no competitor has pid " .. tostring(pid))
end

local function stop_all(procs)
  for _, p in ipairs(procs) do p:kill("KILL") end
  for _, p in ipairs(procs) do pcall(p.wait, p, 10) end
end

describe("pgcoord.joblock", function()
  local db

  setup(function()
    db = pgcoord.connect(nil, { size = 4 })
    pgcoord.migrate(db)
  end)

  teardown(function()
    helper.cleanup()
  end)

  it("derives its intervals from ping_interval and validates them", function()
    local lock = pgcoord.joblock(db, helper.unique("l"), { ping_interval = 2 })
    assert.are.equal(8, lock.stale_after)
    assert.are.equal(4, lock.check_interval)
    assert.are.equal(1, lock.timeout)
    local d = pgcoord.joblock(db, helper.unique("l"))
    assert.are.same({ 10, 40, 20, 5 },
      { d.ping_interval, d.stale_after, d.check_interval, d.timeout })
    local ok, err = pcall(pgcoord.joblock, db, "x", { ping_interval = 1, stale_after = 1 })
    assert.is_false(ok)
    assert.matches("stale_after", err)
    ok, err = pcall(pgcoord.joblock, db, "x", { ping_interval = 1, timeout = 1 })
    assert.is_false(ok)
    assert.matches("timeout", err)
    ok, err = pcall(pgcoord.joblock, db, "x", { ping_intervl = 1 })
    assert.is_false(ok)
    assert.matches("unknown option", err)
    ok, err = pcall(pgcoord.joblock, db, "", {})
    assert.is_false(ok)
    assert.matches("name", err)
  end)

  it("refuses intervals that would make it spin or its statements fail", function()
    local function refused(opts, text)
      local err = helper.error_of(function() pgcoord.joblock(db, "x", opts) end)
      assert.matches("pgcoord.joblock: option " .. text, err, 1, true)
      assert.matches("joblock_spec.lua:%d+:", err)   -- raised at the caller
    end
    refused({ ping_interval = 1e-9 },
      "ping_interval must be a number >= 0.1 and <= 31536000, got 1e-09")
    refused({ check_interval = 1e-9 }, "check_interval must be a number >= 0.05")
    refused({ timeout = 1e-9 }, "timeout must be a number >= 0.02")
    refused({ stale_after = 1e-9 }, "stale_after must be a number >= 0.1")
    -- now() - make_interval(secs => stale_after) would fail every acquire
    refused({ stale_after = 1e300 }, "stale_after must be a number")
    refused({ ping_interval = math.huge }, "ping_interval must be a number")
    refused({ check_interval = 0 / 0 }, "check_interval must be a number")
    refused({ timeout = "1" }, "timeout must be a number")
    -- the floors run: every statement within 0.05 s, a renewal every 0.1 s
    local lock = pgcoord.joblock(db, helper.unique("l"), { ping_interval = 0.1 })
    assert.are.same({ 0.4, 0.2, 0.05 }, { lock.stale_after, lock.check_interval, lock.timeout })
    assert.are.equal("ran", lock:run(function() pgcoord.sleep(0.3) return "ran" end))
  end)

  it("refuses unknown options and bad arguments in each function, at the caller's line",
    function()
    local function refused(fn, text)
      local err = helper.error_of(fn)
      assert.matches(text, err, 1, true)
      assert.matches("^spec/joblock_spec.lua:%d+: ", err)   -- the line below, not pgcoord's
    end
    refused(function() pgcoord.joblock(db, "x", { ping_intervl = 1 }) end,
      'unknown option "ping_intervl" for pgcoord.joblock')
    refused(function() pgcoord.run_in_job_lock(db, "svc", "x", { stale = 1 }, print) end,
      'unknown option "stale" for pgcoord.run_in_job_lock')
    refused(function() pgcoord.run_in_job_lock(db, "svc", "x", { ping_interval = 0 }, print) end,
      "pgcoord.run_in_job_lock: option ping_interval must be a number >= 0.1")
    refused(function() pgcoord.run_in_job_lock(db, "svc", "x", {}, "fn") end,
      "pgcoord.run_in_job_lock: expected a function, got string")
    refused(function() pgcoord.joblock({}, "x") end,
      "pgcoord.joblock: expected a pool from pgcoord.connect")
    refused(function() pgcoord.joblock(db, "x", { ping_interval = 1, timeout = 2 }) end,
      "pgcoord.joblock: timeout (2) must be less than ping_interval (1)")
    local lock = pgcoord.joblock(db, helper.unique("l"))
    refused(function() lock:run(42) end, "lock:run: expected a function, got number")
  end)

  it("leaves no stop handler behind: lock:run's ends with the call, runner:stop() ends its own",
    function()
    local name = helper.unique("l")
    -- every stop handler the job lock registers prints when it runs
    local path = helper.write_file(helper.tmpname("script") .. ".lua", ([[
      io.stdout:setvbuf("no")
      local pgcoord = require "pgcoord"
      local lifecycle = require "pgcoord.lifecycle"
      local on_stop = lifecycle.on_stop
      function lifecycle.on_stop(fn)
        if not debug.getinfo(2, "S").source:find("joblock.lua", 1, true) then
          return on_stop(fn)
        end
        return on_stop(function() print("joblock stop handler ran") fn() end)
      end
      local db = pgcoord.connect(nil, { size = 2 })
      local lock = pgcoord.joblock(db, %q, { ping_interval = 0.2 })
      for _ = 1, 3 do print(lock:run(function() return "ran" end)) end
      local runner = pgcoord.run_in_job_lock(db, "spec", %q, { ping_interval = 0.2 },
        function(ctx) print("holding", ctx.token) while true do pgcoord.sleep(0.05) end end)
      while lock:state() ~= "released" or runner:status() ~= "running" do pgcoord.sleep(0.01) end
      pgcoord.sleep(0.3)
      runner:stop()
      print("runner", runner:status())
      pgcoord.stop()
    ]]):format(name, name))
    local code, out = helper.run({ "pgcoord-run", path })
    assert.are.equal(0, code, out)
    local _, ran = out:gsub("\nran", "")
    assert.are.equal(3, ran, out)
    assert.matches("holding", out, 1, true)
    assert.matches("runner\tstopped", out, 1, true)
    assert.is_nil(out:find("joblock stop handler ran", 1, true), out)
  end)

  it("ctx.fence: writes commit only while the token holds; a takeover waits for them",
    function()
      local name, effects = helper.unique("l"), helper.unique("effects")
      db:exec(("CREATE TABLE %s (token bigint NOT NULL)"):format(effects))
      local insert = ("INSERT INTO %s (token) VALUES ($1)"):format(effects)
      local lock = pgcoord.joblock(db, name, { ping_interval = PING })
      local held, misuse, refused
      local ok, err = pcall(lock.run, lock, function(ctx)
        db:tx(function(tx)
          ctx.fence(tx)
          tx:exec(insert, ctx.token)
          -- the row is locked until commit: a takeover's UPDATE would wait
          held = helper.error_of(db.query, db, [[SELECT 1 FROM pgcoord.job_locks
            WHERE name = $1 FOR NO KEY UPDATE NOWAIT]], name)
        end)
        misuse = helper.error_of(ctx.fence, db)
        -- another process takes the lock over, unseen by the keeper so far
        db:exec("UPDATE pgcoord.job_locks SET holder = 'thief', token = token + 1 WHERE name = $1",
          name)
        local fenced
        fenced, refused = pcall(db.tx, db, function(tx)
          tx:exec(insert, ctx.token)
          ctx.fence(tx)
        end)
        assert.is_false(fenced)
        return "returned"   -- after catching the fence's error
      end)
      assert.matches("could not obtain lock", held, 1, true)
      assert.matches("ctx.fence: expected a transaction (the tx of db:tx), got a pool", misuse,
        1, true)
      assert.are.equal("55P03", refused.sqlstate)
      assert.matches(("ctx.fence: lock %q, token 1: another process took the lock over")
        :format(name), tostring(refused), 1, true)
      -- the lock is lost, so run raises even though fn returned
      assert.is_false(ok)
      assert.matches("was lost (a fence found the lock taken over)", tostring(err), 1, true)
      assert.are.equal("lost", lock:state())
      -- only the write made while the lock was held is there
      assert.are.same({ 1 }, { db:one(("SELECT count(*) AS n FROM %s"):format(effects)).n })
    end)

  it("runs fn while holding, releases at once, bumps the token each time", function()
    local name = helper.unique("l")
    local lock = pgcoord.joblock(db, name, { ping_interval = PING })
    assert.are.equal("", lock:state())
    local seen
    local r = lock:run(function(ctx)
      seen = ctx.token
      assert.are.equal("held", lock:state())
      assert.is_false(ctx.lost())
      pgcoord.sleep(PING * 2.5) -- renewed at least twice
      return "result", 2
    end)
    assert.are.equal("result", r)
    assert.are.equal("released", lock:state())
    local row = db:one("SELECT holder, token FROM pgcoord.job_locks WHERE name = $1", name)
    assert.is_nil(row.holder)
    assert.are.equal(seen, row.token)
    local again = pgcoord.joblock(db, name, { ping_interval = PING })
    local t0 = pgcoord.now()
    local second = again:run(function(ctx) return ctx.token end)
    assert.are.equal(seen + 1, second)
    assert.is_true(pgcoord.now() - t0 < PING, "a released lock is taken without waiting")
  end)

  it("cancels fn and raises when another process took the lock", function()
    local name = helper.unique("l")
    local lock = pgcoord.joblock(db, name, { ping_interval = PING })
    local cancelled = false
    local ok, err = pcall(lock.run, lock, function()
      local _ <close> = setmetatable({}, { __close = function() cancelled = true end })
      db:exec("UPDATE pgcoord.job_locks SET holder = 'thief', token = token + 1 WHERE name = $1",
        name)
      pgcoord.sleep(30)
    end)
    assert.is_false(ok)
    assert.matches("was lost", tostring(err))
    assert.is_true(cancelled)
    assert.are.equal("lost", lock:state())
  end)

  it("lets exactly one of three processes hold; SIGKILL hands over after stale_after",
    function()
      local name, fence = make_fence(db)
      local procs = start_competitors(3, name, fence)
      local first = wait_new_token(db, fence, 0)
      helper.wait_until(function()
        return db:one(("SELECT count(*) AS n FROM %s"):format(fence)).n > 20
      end, 10, "the holder to work")
      local before = holder(db, fence)
      assert.are.equal(first.token, before.token)
      process_of(procs, before.pid):kill("KILL")
      local after = wait_new_token(db, fence, before.token, 10)
      assert.are_not.equal(before.pid, after.pid)
      local rows = assert_no_overlap(db, fence)
      -- nobody took over before the dead holder's row went stale
      local gap = rows[#rows].first - rows[#rows - 1].last
      assert.is_true(gap >= 4 * PING - PING, ("takeover after %.3fs"):format(gap))
      stop_all(procs)
    end)

  it("hands over within a second on SIGTERM of the holder", function()
    local name, fence = make_fence(db)
    local procs = start_competitors(3, name, fence)
    local first = wait_new_token(db, fence, 0)
    local p = process_of(procs, first.pid)
    p:wait_output("holding token=", 10)
    local t0 = pgcoord.time()
    p:kill("TERM")
    assert.are.equal(0, p:wait(10))
    assert.matches("stopped token=", p:output())
    local after = wait_new_token(db, fence, first.token, 5)
    assert.is_true(after.first - t0 < 1.0, ("takeover took %.3fs"):format(after.first - t0))
    local row = db:one("SELECT holder FROM pgcoord.job_locks WHERE name = $1", "spec:" .. name)
    assert.is_not_nil(row.holder)
    assert_no_overlap(db, fence)
    stop_all(procs)
  end)

  it("never overlaps while the holder's backends are killed again and again", function()
    local name, fence = make_fence(db)
    local procs = start_competitors(3, name, fence)
    local first = wait_new_token(db, fence, 0).token
    -- at least 4 s of kills, and on until the lock has moved (15 s at most)
    local t0, kills = pgcoord.now(), 0
    local function moved() return holder(db, fence).token ~= first end
    while pgcoord.now() < t0 + 4 or (not moved() and pgcoord.now() < t0 + 15) do
      local h = holder(db, fence)
      local app = process_of(procs, h.pid).app
      kills = kills + db:one([[SELECT count(pg_terminate_backend(pid)) AS n
        FROM pg_stat_activity WHERE application_name = $1]], app).n
      pgcoord.sleep(0.1)
    end
    assert.is_true(kills > 5)
    local rows = assert_no_overlap(db, fence)
    assert.is_true(#rows >= 2, "the kills never moved the lock: nothing was compared")
    stop_all(procs)
  end)

  it("refuses a paused holder's fenced write after a takeover; the new holder's writes hold",
    function()
      local name, fence = make_fence(db)
      local procs = start_competitors(2, name, fence, nil, FENCED_COMPETITOR)
      local first = wait_new_token(db, fence, 0)
      local p = process_of(procs, first.pid)
      -- stop it inside a write's transaction, well before its pg_sleep ends
      helper.wait_until(function()
        return db:one([[SELECT 1 AS yes FROM pg_stat_activity WHERE application_name = $1
          AND state = 'active' AND query LIKE 'SELECT pg_sleep%'
          AND now() - query_start < '0.2 s']], p.app)
      end, 10, "the holder to be inside a write")
      assert.is_true(p:kill("STOP"))
      local count = ("SELECT count(*) AS n FROM %s WHERE token = $1"):format(fence)
      local old_rows = db:one(count, first.token).n
      -- stale_after is 1.2 s: the other process takes over and writes
      local after = wait_new_token(db, fence, first.token, 15)
      assert.are_not.equal(first.pid, after.pid)
      assert.is_true(p:kill("CONT"))
      p:wait_output("fence refused token=" .. first.token, 10)
      local new_rows = db:one(count, after.token).n
      helper.wait_until(function() return db:one(count, after.token).n > new_rows end, 10,
        "the new holder to write on")
      -- the write in flight at the pause was refused, and nothing came after it
      assert.are.equal(old_rows, db:one(count, first.token).n)
      assert_no_overlap(db, fence)
      stop_all(procs)
    end)

  it("cancels a cut-off holder's work before anyone else acquires", function()
    local name, fence = make_fence(db)
    local relays = { helper.relay("127.0.0.1", helper.tcp_parts().port),
                     helper.relay("127.0.0.1", helper.tcp_parts().port) }
    local procs = start_competitors(2, name, fence, { relays[1].dsn(), relays[2].dsn() })
    local first = wait_new_token(db, fence, 0)
    local idx = procs[1].pid == first.pid and 1 or 2
    local p = procs[idx]
    p:wait_output("holding token=", 10)
    relays[idx].blackhole()
    local after = wait_new_token(db, fence, first.token, 15)
    assert.are_not.equal(first.pid, after.pid)
    local out = p:wait_output("stopped token=" .. first.token, 10)
    local stopped_at = tonumber(out:match("stopped token=" .. first.token .. " at=([%d%.]+)"))
    local acquired = db:one([[SELECT extract(epoch FROM acquired_at) AS t
      FROM pgcoord.job_locks WHERE name = $1]], "spec:" .. name).t
    assert.is_true(stopped_at < acquired,
      ("work stopped at %.6f, lock taken at %.6f"):format(stopped_at, acquired))
    assert_no_overlap(db, fence)
    stop_all(procs)
    for _, r in ipairs(relays) do r.stop() end
  end)
end)

-- pgcoord.log: what a line may show (no password in any conninfo form),
-- how much of a value it shows (capped), and that neither costs more than
-- linear time in the size of what is logged.
local pgcoord = require "pgcoord"
local helper = require "helper"

local log = pgcoord.log

-- Text big and shaped to make a backtracking pattern quadratic: long
-- alphanumeric runs, and many "://" or "password" with no end in sight.
local function hostile(size)
  return {
    hex = ("0123456789abcdef"):rep(size // 16),
    uris = ("a://b:"):rep(size // 6),
    keys = ("password "):rep(size // 9),
    quotes = ("password='\\"):rep(size // 11),
  }
end

describe("pgcoord.log", function()
  after_each(function()
    log.set_sink(nil)
    log.set_format("logfmt")
    log.set_level("info")
    helper.cleanup()
  end)

  it("masks the password of every conninfo form", function()
    local cases = {
      -- libpq key=value: quoted (backslash escapes), unquoted, spaced, any case
      { [[host=h password='se\'cret word' dbname=d]], "host=h password=*** dbname=d" },
      { "host=h password=hunter2 dbname=d", "host=h password=*** dbname=d" },
      { [[host=h password=se\ cret dbname=d]], "host=h password=*** dbname=d" },
      { "host=h PassWord = 'a b'", "host=h PassWord = ***" },
      { "host=h password='never closed", "host=h password=***" },
      { "PGPASSWORD=hunter2 psql", "PGPASSWORD=*** psql" },
      -- URIs: the user's password, and password parameters
      { "postgresql://u:TopSecret@h/d", "postgresql://u:***@h/d" },
      { "postgres://u:Top Secret@h:5432/d", "postgres://u:***@h:5432/d" },
      { "postgresql://u@h/d?password=Secret&sslmode=disable",
        "postgresql://u@h/d?password=***&sslmode=disable" },
      { "postgresql://u@h/d?sslmode=disable&password=Secret",
        "postgresql://u@h/d?sslmode=disable&password=***" },
      { "a postgresql://u:p1@h/d\nand postgresql://v:p2@h/d",
        "a postgresql://u:***@h/d\nand postgresql://v:***@h/d" },
      -- JSON
      { [[{"password":"se\"cret","user":"u"}]], [[{"password":***,"user":"u"}]] },
      -- nothing to mask
      { 'password authentication failed for "u"', 'password authentication failed for "u"' },
      { "postgresql://u@h:5432/d", "postgresql://u@h:5432/d" },
    }
    for _, case in ipairs(cases) do
      assert.are.equal(case[2], log.redact(case[1]))
    end
  end)

  it("no password reaches a line through the message, a field or a table field", function()
    for _, fmt in ipairs({ "logfmt", "json" }) do
      log.set_format(fmt)
      local lines = helper.capture_log(function()
        log.error([[cannot connect: password='se\'cretX wordY']], {
          conninfo = "postgresql://u:TopSecret@h/d",
          options = { dsn = "host=h password=hunter2" },
          password = "plain",
        })
      end)
      assert.are.equal(1, #lines)
      for _, secret in ipairs({ "cretX", "wordY", "TopSecret", "hunter2", "plain" }) do
        assert.is_nil(lines[1]:find(secret, 1, true), fmt .. ": " .. lines[1])
      end
    end
  end)

  it("caps a logged value at log.MAX_VALUE bytes, on a character boundary", function()
    assert.are.equal(4096, log.MAX_VALUE)
    local long = ("é"):rep(5000) -- 10,000 bytes; "x" .. long is cut inside a character
    local lines = helper.capture_log(function()
      log.info(long, { detail = "x" .. long, short = "kept whole" })
    end)
    local line = lines[1]
    assert.is_truthy(utf8.len(line), "whole UTF-8 characters")
    assert.matches('msg="' .. ("é"):rep(2048) .. '…%(10000 bytes%)" ', line)
    assert.matches('detail="x' .. ("é"):rep(2047) .. '…%(10001 bytes%)" ', line)
    assert.matches('short="kept whole"', line, 1, true)
    assert.is_true(#line < 3 * log.MAX_VALUE)
    -- redacted before it is cut: a cut never leaves half a password showing
    lines = helper.capture_log(function()
      log.info("m", { e = ("x"):rep(4000) .. " postgresql://u:" .. ("S"):rep(100) .. "@h/d" })
    end)
    assert.is_nil(lines[1]:find("SSS", 1, true), lines[1])
    assert.matches("postgresql://u:***@h/d", lines[1], 1, true)
    log.set_format("json")
    lines = helper.capture_log(function() log.info("m", { detail = long }) end)
    local detail = pgcoord.json.decode(lines[1]).detail
    assert.are.equal(("é"):rep(2048) .. "…(10000 bytes)", detail)
  end)

  -- CPU time, not wall time: the machine may be busy.  Linear code takes
  -- milliseconds here; the backtracking pattern took ~30 s per 64 KB.
  it("redacts and logs 64 KB of hostile text in well under a second", function()
    for shape, s in pairs(hostile(64 * 1024)) do
      local lines = {}
      log.set_sink(function(line) lines[#lines + 1] = line end)
      local t0 = os.clock()
      log.redact(s)
      log.error("job failed", { error = s })
      log.error(s)
      local cpu = os.clock() - t0
      assert.is_true(cpu < 1, ("%s: %.3f s"):format(shape, cpu))
      assert.are.equal(2, #lines)
    end
  end)

  -- In a child with a deadline, so that quadratic code fails the spec
  -- instead of holding it for hours.
  it("redacts and logs a 1 MB field in under a second", function()
    local code, out = helper.run({ "pgcoord-run", "-e", [[
      local log = pgcoord.log
      log.set_sink(function() end)
      local shapes = {
        hex = ("0123456789abcdef"):rep(65536),
        uris = ("a://b:"):rep(174763),
        keys = ("password "):rep(116509),
        quotes = ("password='\\"):rep(95325),
      }
      for shape, s in pairs(shapes) do
        local t0 = os.clock()
        log.info("big field", { field = s })
        print(("%s cpu=%.3f"):format(shape, os.clock() - t0))
      end
    ]] }, { timeout = 60 })
    assert.are.equal(0, code, out)
    local n = 0
    for shape, cpu in out:gmatch("(%w+) cpu=([%d.]+)") do
      n = n + 1
      assert.is_true(tonumber(cpu) < 1, shape .. ": " .. cpu .. " s")
    end
    assert.are.equal(4, n, out)
  end)

  it("rejects a 100 KB conninfo at once, its password masked", function()
    local t0 = os.clock()
    local err = helper.error_of(function()
      pgcoord.connect("host=/nonexistent password=hunter2 " .. ("ab"):rep(50000), { size = 1 })
    end)
    local cpu = os.clock() - t0
    assert.is_true(cpu < 1, ("%.3f s"):format(cpu))
    assert.matches("pgcoord.connect", err, 1, true)
    assert.is_nil(err:find("hunter2", 1, true))
  end)

  -- ---- the shape of a failure, signals, stop lines ----------------------------------

  local TRACED = "spec/x.lua:3: boom\nstack traceback:\n\t[C]: in function 'error'"
    .. "\n\tspec/x.lua:3: in function <spec/x.lua:1>"

  it("logs a failure as its first line in error=, the traceback only at debug", function()
    local lines = helper.capture_log(function()
      log.error("job failed", { job = 1, error = TRACED })
      log.warn("queue handler failed", { error = "spec/x.lua:3: boom", traceback = TRACED })
      log.set_level("debug")
      log.error("job failed", { job = 2, error = TRACED })
      log.set_format("json")
      log.error("job failed", { job = 3, error = TRACED })
    end)
    assert.matches(' msg="job failed" error="spec/x.lua:3: boom" job=1$', lines[1])
    assert.matches(' msg="queue handler failed" error="spec/x.lua:3: boom"$', lines[2])
    assert.matches(' msg="job failed" error="spec/x.lua:3: boom" job=2 traceback="spec/x.lua:3:'
      .. ' boom\\nstack traceback:\\n', lines[3], 1, true)
    local obj = pgcoord.json.decode(lines[4])
    assert.are.same({ "spec/x.lua:3: boom", TRACED }, { obj.error, obj.traceback })
    -- an error object (a failed query's) is its text, first line too
    log.set_format("logfmt")
    log.set_level("info")
    lines = helper.capture_log(function()
      log.warn("x", { error = setmetatable({}, { __tostring = function() return "a\nb" end }) })
    end)
    assert.matches(' msg=x error=a$', lines[1])
  end)

  it("names signals: SIGTERM, not 15", function()
    assert.are.same({ "SIGTERM", "SIGINT", "SIGKILL", "SIGSEGV", "signal 99" },
      { log.signal_name(15), log.signal_name(2), log.signal_name(9), log.signal_name(11),
        log.signal_name(99) })
  end)

  describe("from the services", function()
    local db, started

    setup(function()
      db = helper.connect({ size = 4 })
      pgcoord.migrate(db)
    end)

    teardown(function() db:close() end)

    before_each(function() started = helper.started() end)
    after_each(function() started:stop() end)

    local function line_of(lines, msg)
      for _, line in ipairs(lines) do
        if line:find(' msg="' .. msg .. '"', 1, true) then return line end
      end
      error(("no %q line in:\n%s"):format(msg, table.concat(lines, "\n")), 2)
    end

    it("a failed job: one short line (its traceback at debug); the stop line counts",
      function()
      local g = helper.unique("lg")
      local jobs = pgcoord.jobs(db)
      local line
      jobs:define("fails", function()
        line = debug.getinfo(1, "l").currentline; error("boom")
      end, { group = g, retry = { max = 0 } })
      jobs:define("works", function() end, { group = g })
      jobs:schedule_now(db, "fails", {})
      jobs:schedule_now(db, "works", {})
      local lines = helper.capture_log(function()
        local w = started:worker(jobs, { group = g, poll_interval = 0.05, flush_age = 0.01 })
        helper.wait_until(function() return w:stats().handled == 2 end, 10, "both jobs run")
        assert.are.equal(1, w:stats().failed)
        started:stop()
      end)
      local failed = line_of(lines, "job failed")
      assert.matches((' error="spec/log_spec.lua:%d: boom" job=%%d+ type=fails$'):format(line),
        failed)
      assert.is_true(#failed < 200, failed)
      assert.matches(' msg="job worker stopped" failed=1 group=' .. g .. ' handled=2 worker=%d+$',
        line_of(lines, "job worker stopped"))
      -- at debug, the same line carries the traceback
      jobs:schedule_now(db, "fails", {})
      log.set_level("debug")
      lines = helper.capture_log(function()
        local w = started:worker(jobs, { group = g, poll_interval = 0.05, flush_age = 0.01 })
        helper.wait_until(function() return w:stats().handled == 1 end, 10, "the job to run")
      end)
      assert.matches(' traceback="spec/log_spec.lua:%d+: boom\\nstack traceback:',
        line_of(lines, "job failed"))
    end)

    it("the queue consumer's and the outbox relay's stop lines count", function()
      local q = pgcoord.queue(db, helper.unique("lq"))
      q:subscribe("s")
      q:publish_many(db, { "ok", "bad", "raises" })
      local ob = pgcoord.outbox(db, { table = helper.unique("lob"), max_retries = 0 })
      ob:migrate()
      ob:save(nil, { topic = "ok" }, { topic = "bad" })
      local lines = helper.capture_log(function()
        local c = q:consume("s", function(msg)
          if msg.payload == "raises" then error("no") end
          return msg.payload == "ok"
        end, { max_deliveries = 1 })
        local r = ob:relay(function(msg) return msg.topic == "ok" end, { poll_interval = 0.05 })
        helper.wait_until(function() return c:stats().dead == 2 end, 10, "two dead letters")
        helper.wait_until(function() return r:stats().failed == 1 end, 10, "one failed publish")
        c:stop()
        r:stop()
      end)
      db:exec(("DROP TABLE %s"):format(ob.quoted))
      assert.matches(' msg="queue consumer stopped" dead=2 failed=2 handled=3 queue=',
        line_of(lines, "queue consumer stopped"), 1, true)
      assert.matches(' msg="outbox relay stopped" failed=1 published=1 table=',
        line_of(lines, "outbox relay stopped"), 1, true)
    end)
  end)
end)

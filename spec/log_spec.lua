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
end)

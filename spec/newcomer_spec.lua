-- What a newcomer meets first: errors that say where and what to do (the
-- caller's line on a failed query, the fix for a missing schema, libpq's
-- sentences kept apart), a database never migrated said once, the rock
-- installed with luarocks, and `make test` output without the specs' logs.
local pgcoord = require "pgcoord"
local helper = require "helper"

local pools = {}

local function pool(conninfo)
  local p = helper.connect({ size = 2 }, conninfo)
  pools[#pools + 1] = p
  return p
end

-- A pool on a fresh database that was never migrated.
local function unmigrated_pool()
  return pool(helper.conninfo_for(helper.create_database("unmigrated")))
end

local function errors(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  return err
end

local function this_line()
  return debug.getinfo(2, "l").currentline
end

local MIGRATE_HINT = "pgcoord's tables are missing or out of date:"
  .. " run `pgcoord-run --migrate` or pgcoord.migrate(db)"

-- The captured lines at `level` whose msg starts with `msg`.
local function lines_of(lines, level, msg)
  local found = {}
  for _, line in ipairs(lines) do
    if line:find(" level=" .. level .. " ", 1, true)
       and (line:find(' msg="' .. msg, 1, true) or line:find(" msg=" .. msg, 1, true)) then
      found[#found + 1] = line
    end
  end
  return found
end

-- Captures the log at debug level while fn runs.
local function capture_debug(fn)
  pgcoord.log.set_level("debug")
  local ok, lines = pcall(helper.capture_log, fn)
  pgcoord.log.set_level("info")
  if not ok then error(lines, 0) end
  return lines
end

describe("a failed query's error", function()
  after_each(function()
    for _, p in ipairs(pools) do pcall(p.close, p) end
    pools = {}
    helper.cleanup()
  end)

  it("carries the caller's file and line in err.where and tostring, message unchanged", function()
    local db = pool()
    local line = this_line() + 1
    local _, err = pcall(db.query, db, "SELEC 1")
    assert.are.equal('syntax error at or near "SELEC"', err.message)
    assert.are.equal("42601", err.sqlstate)
    assert.matches("newcomer_spec%.lua:" .. line .. "$", err.where)
    assert.are.equal(err.where .. ': syntax error at or near "SELEC" (SQLSTATE 42601)',
      tostring(err))
    -- inside a transaction, the line in the function given to tx
    local tx_line
    _, err = pcall(db.tx, db, function(tx)
      tx_line = this_line() + 1
      tx:exec("SELECT 1/0")
    end)
    assert.are.equal("22012", err.sqlstate)
    assert.matches("newcomer_spec%.lua:" .. tx_line .. "$", err.where)
  end)

  it("under a stock lua5.4, names the script's line where it was not caught", function()
    local script = helper.write_file(helper.tmpname("query") .. ".lua", table.concat({
      'local pgcoord = require "pgcoord"',
      "local db = pgcoord.connect()",
      'db:query("SELEC 1")',
    }, "\n"))
    local code, out = helper.run({ "lua5.4", script }, { env = helper.lua_env() })
    assert.are.equal(1, code, out)
    assert.matches(("lua5.4: %s:3: syntax error at or near \"SELEC\" (SQLSTATE 42601)")
      :format(script), out, 1, true)
  end)

  it("for a missing pgcoord relation, names the fix (migrate) in its hint", function()
    local db = unmigrated_pool()
    local err = errors(db.query, db, "SELECT * FROM pgcoord.jobs")
    assert.are.equal("42P01", err.sqlstate)
    assert.are.equal('relation "pgcoord.jobs" does not exist', err.message)
    assert.are.equal(MIGRATE_HINT, err.hint)
    assert.matches('relation "pgcoord.jobs" does not exist (SQLSTATE 42P01) HINT: '
      .. MIGRATE_HINT, tostring(err), 1, true)
    -- through a module's function too, at the caller's line
    local jobs = pgcoord.jobs(db)
    jobs:define("nothing", function() end)
    local line = this_line() + 1
    local _, jerr = pcall(jobs.schedule_now, jobs, db, "nothing", {})
    assert.are.equal(MIGRATE_HINT, jerr.hint, tostring(jerr))
    assert.matches("newcomer_spec%.lua:" .. line .. "$", jerr.where)
    -- other missing relations keep the server's own words
    err = errors(db.query, db, "SELECT * FROM no_such_table_here")
    assert.are.equal("42P01", err.sqlstate)
    assert.is_nil(err.hint)
  end)

  it("keeps libpq's sentences apart: 'Connection refused. Is the server running'", function()
    local err = errors(pgcoord.connect, "postgresql://nobody@127.0.0.1:1/nothing")
    assert.are.equal("08001", err.sqlstate)
    assert.matches('port 1 failed: Connection refused. Is the server running on that host'
      .. ' and accepting TCP/IP connections?', err.message, 1, true)
    assert.is_nil(err.message:find("[\n\t]"))
  end)
end)

describe("a database never migrated", function()
  after_each(function()
    for _, p in ipairs(pools) do pcall(p.close, p) end
    pools = {}
    helper.cleanup()
  end)

  it("a job worker says so once, with the fix, and retries quietly", function()
    local db = unmigrated_pool()
    local group = helper.unique("jg")
    local w
    local lines = capture_debug(function(lines)
      local jobs = pgcoord.jobs(db)
      jobs:define("nothing", function() end, { group = group })
      w = jobs:worker({ group = group })
      helper.wait_until(function()
        return #lines_of(lines, "debug", "job worker:") >= 2
      end, 10, "two quiet retries")
      -- (w:stop() waits for a registration that cannot happen here)
      w.main:cancel()
      helper.wait_until(function() return w.main:status() ~= "running"
        and w.main:status() ~= "ready" end, 5, "the worker to end")
    end)
    local said = lines_of(lines, "error", "job worker:")
    assert.are.equal(1, #said, table.concat(lines, "\n"))
    assert.matches("pgcoord-run --migrate", said[1], 1, true)
  end)

  it("a job lock says so once, with the fix, and keeps trying quietly", function()
    local db = unmigrated_pool()
    local runner
    local lines = capture_debug(function(lines)
      runner = pgcoord.run_in_job_lock(db, "spec", helper.unique("lock"),
        { check_interval = 0.05 }, function() end)
      helper.wait_until(function()
        return #lines_of(lines, "debug", "job lock acquire failed") >= 3
      end, 10, "three quiet retries")
      runner:stop(1)
    end)
    local said = lines_of(lines, "warn", "job lock acquire failed")
    assert.are.equal(1, #said, table.concat(lines, "\n"))
    assert.matches("pgcoord-run --migrate", said[1], 1, true)
  end)
end)

describe("installing with luarocks", function()
  after_each(helper.cleanup)

  it("builds, lists the command where it is, and migrates without PGCOORD_SQL_DIR", function()
    if helper.sh("command -v luarocks >/dev/null 2>&1") ~= 0 then
      pending("luarocks is not installed (scripts/install-deps installs it)")
      return
    end
    local code, out = helper.run({ helper.root .. "/scripts/check-luarocks" }, { timeout = 600 })
    assert.are.equal(0, code, out)
    assert.matches("check-luarocks: ok", out, 1, true)
  end)
end)

describe("scripts/test", function()
  after_each(helper.cleanup)

  -- Runs scripts/test on one spec file whose test runs body; returns the
  -- exit code and the output.
  local function nested(body, env)
    local spec = helper.write_file(helper.tmpname("nested") .. "_spec.lua", ([[
      local pgcoord = require "pgcoord"
      describe("nested", function()
        it("runs", function()
          %s
        end)
      end)
    ]]):format(body))
    env = env or {}
    env.PGCOORD_TEST_STDERR_LOG = helper.tmpname("stderr")
    return helper.run({ helper.root .. "/scripts/test", spec }, { env = env, timeout = 120 })
  end

  -- A test that logs a line and passes or fails.
  local function nested_run(passes)
    return nested(([[
          pgcoord.log.info("a line the spec logged", { marker = "m%s" })
          assert.is_true(%s)]]):format(helper.pid, tostring(passes)))
  end

  it("prints progress and summary, not the specs' log lines, when all pass", function()
    local code, out = nested_run(true)
    assert.are.equal(0, code, out)
    assert.is_nil(out:find("a line the spec logged", 1, true), out)
    assert.matches("1 success / 0 failures", out, 1, true)
    assert.matches("\n1 passed, 0 failed\n$", out)
  end)

  it("shows the specs' log lines after a failure, then the count", function()
    local code, out = nested_run(false)
    assert.are.equal(1, code, out)
    assert.matches("the last 100 lines the specs wrote to stderr", out, 1, true)
    assert.matches('msg="a line the spec logged" marker=m' .. helper.pid, out, 1, true)
    assert.matches("\n0 passed, 1 failed\n$", out)
  end)

  it("names a test that hangs in a wait and ends the run at TEST_WATCHDOG", function()
    local code, out = nested([[
          pgcoord.spawn(function() pgcoord.sleep(1000) end):join()]], { TEST_WATCHDOG = "1" })
    assert.are.equal(1, code, out)
    assert.matches("watchdog: nested runs %(.*_spec%.lua:3%) has run for 1 s", out)
    assert.matches("\n0 passed, 1 failed\n$", out)
  end)
end)

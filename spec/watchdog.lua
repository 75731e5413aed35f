-- Loaded by scripts/test (busted --helper): a test still running after
-- TEST_WATCHDOG seconds (default 120; 0: never) is named and ends the
-- run.  A test that hangs in a wait (a join whose task never ends, a
-- condition never met) would otherwise hold the run until TEST_TIMEOUT,
-- 30 minutes, and end it without a word of where.  The watchdog is a
-- timer of pgcoord's loop, so it sees a test that hangs waiting, which is
-- how they hang; not one spinning in plain Lua, which never waits.
local busted = require "busted"
local core = require "pgcoord.core"

local setting = os.getenv("TEST_WATCHDOG") or "120"
local limit = tonumber(setting)
if not limit or limit < 0 then
  error(("TEST_WATCHDOG must be a number of seconds (0: never), got %q"):format(setting), 0)
end
if limit == 0 then return end

-- "describe ... it", and where the test is.
local function describe_test(element)
  local names = { element.name }
  local parent = busted.parent(element)
  while parent and parent.descriptor ~= "file" do
    if parent.name then table.insert(names, 1, parent.name) end
    parent = busted.parent(parent)
  end
  local trace = element.trace
  local where = trace and (" (%s:%d)"):format(trace.short_src, trace.currentline) or ""
  return table.concat(names, " ") .. where
end

local timer = nil

busted.subscribe({ "test", "start" }, function(element)
  local name = describe_test(element)
  timer = core.timer(limit, function()
    local line = ("watchdog: %s has run for %g s, TEST_WATCHDOG's limit: the run ends here\n")
      :format(name, limit)
    io.stdout:write("\n", line)
    io.stderr:write(line)
    io.stdout:flush()
    io.stderr:flush()
    os.exit(1)
  end)
  return nil, true
end)

busted.subscribe({ "test", "end" }, function()
  if timer then timer:cancel() end
  timer = nil
  return nil, true
end)

-- Failover to a streaming standby, against the real thing: a fresh primary
-- and a synchronous standby (scripts/pg-tmp with PGCOORD_TEST_STANDBY=1,
-- its own pair, so the rest of the suite keeps its single server), and
-- scripts/soak/failover.lua for one round: a jobs worker, a queue consumer,
-- an outbox relay, a subscriber and two job-lock competitors in separate
-- pgcoord-run processes on `host=P,S target_session_attrs=read-write`, the
-- primary crashed with -m immediate and the standby promoted while jobs are
-- scheduled and messages published, then the old primary back as a standby.
local helper = require "helper"

-- The subscriber's ping_grace in scripts/soak/failover.lua, and the "few
-- seconds" the issue allows on top of it.
local PING_GRACE, SLACK = 1.5, 5

describe("failover to a streaming standby", function()
  local code, out

  setup(function()
    code, out = helper.run({ helper.root .. "/scripts/pg-tmp", "run", helper.run_bin,
      "scripts/soak/failover.lua", "1" },
      { env = { PGCOORD_TEST_STANDBY = "1" }, timeout = 120 })
  end)

  teardown(function()
    helper.cleanup()
  end)

  -- The captures of pattern in the round's output.
  local function figure(pattern)
    local found = table.pack(out:match(pattern))
    assert(found[1], ("%q not in the output:\n%s"):format(pattern, out))
    return table.unpack(found, 1, found.n)
  end

  it("runs the round to its end and finds nothing wrong", function()
    assert.are.equal(0, code, out)
    assert.matches("\nresult: ok\n", out, 1, true)
  end)

  it("refuses a writer whose conninfo names only the standby, saying why, at once", function()
    local took, why = figure("standby%-only writer: refused in ([%d.]+)s: ([^\n]*)")
    assert.matches("session is read-only", why, 1, true)
    assert.matches("target_session_attrs=read-write", why, 1, true)
    assert.is_true(tonumber(took) < 3, "took " .. took .. "s")
  end)

  it("has every primitive working on the new primary within ping_grace + a few seconds", function()
    for _, kind in ipairs({ "write", "job", "queue", "outbox", "notify", "lock" }) do
      local took = tonumber(figure("worst recovery " .. kind .. " +([%d.]+)s after the crash"))
      assert.is_true(took < PING_GRACE + SLACK, ("%s recovered in %.2fs"):format(kind, took))
    end
  end)

  it("ran every committed job and delivered every committed message", function()
    assert.is_true(tonumber(figure("committed (%d+)")) > 0, out)
    for _, kind in ipairs({ "job", "queue", "outbox" }) do
      assert.are.equal("0", figure(kind .. " +missing (%S+),"), kind)
      -- duplicates are allowed for what was in flight, and counted
      assert.matches("^%d+$", figure(kind .. " +missing %S+, duplicates (%S+)"))
    end
  end)

  it("keeps lock holders apart with growing fencing tokens, across the failover", function()
    assert.is_true(tonumber(figure("lock tokens (%d+),")) >= 2, "no takeover seen:\n" .. out)
    assert.are.equal("0", figure("overlaps (%d+),"))
    assert.are.equal("0", figure("tokens going backwards (%d+)"))
  end)

  it("does not split: the old primary comes back as a standby, refuses writes and replicates",
    function()
      assert.matches("old primary back as a standby (sync)", out, 1, true)
      assert.is_nil(out:find("ACCEPTED", 1, true), out)
    end)
end)

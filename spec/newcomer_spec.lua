-- What a newcomer meets first: errors that say where and what to do (the
-- caller's line on a failed query, the fix for a missing schema, libpq's
-- sentences kept apart), a database never migrated said once, the rock
-- installed with luarocks, and `make test` output without the specs' logs.
local helper = require "helper"

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

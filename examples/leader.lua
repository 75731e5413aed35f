-- Leader election: start this in several terminals (or hosts); one of them
-- runs the report loop, the others wait and take over when it dies or stops.
--
--   pgcoord-run --migrate && pgcoord-run examples/leader.lua
local db = pgcoord.connect(nil, { size = 2 })

pgcoord.run_in_job_lock(db, "example", "nightly-report", { ping_interval = 1 }, function(ctx)
  pgcoord.log.info("leading", { token = ctx.token })
  while true do
    -- Write the fencing token beside every effect, so a stale leader's
    -- late writes can be told apart.
    print(("report tick under token %d"):format(ctx.token))
    pgcoord.sleep(2)
  end
end)

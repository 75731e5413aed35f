-- Periodic jobs: a nightly report, a cache warm-up every 5 minutes, a
-- weekday reminder at 09:00 local time and a heartbeat every 2 seconds.
-- Start it in several terminals (or hosts): one process schedules (it
-- holds the periodic lock), every one of them works the jobs, and each
-- slot is enqueued once.  With `demo` it stops after two heartbeats.
--
--   pgcoord-run --migrate && pgcoord-run examples/cron.lua [demo]
local mode = ...
local db = pgcoord.connect(nil, { size = 4 })
-- (shared by the worker and the scheduler's lock, which then hears at
-- once when the scheduling process stops)
local sub = pgcoord.subscriber(db)
sub:start()
local jobs = pgcoord.jobs(db, { subscriber = sub })

local function slot(job) return os.date("!%Y-%m-%d %H:%M:%S UTC", math.floor(job.run_at)) end

local beats = 0
jobs:define("report", function(job)
  print(("report (%s) for the slot %s"):format(job.params.kind, slot(job)))
end, { group = "cron" })
jobs:define("warm_cache", function(job) print("warming the cache, slot " .. slot(job)) end,
  { group = "cron" })
jobs:define("remind", function(job) print("stand-up in " .. job.params.room) end,
  { group = "cron" })
jobs:define("heartbeat", function(job)
  beats = beats + 1
  print("heartbeat, slot " .. slot(job))
end, { group = "cron" })

-- A job is enqueued for each slot with run_at = the slot time.  After a
-- time with no scheduler running, missed slots no older than backfill
-- seconds are enqueued (default 0: skipped, the next slot is awaited).
jobs:periodic("nightly-report", "0 3 * * *", "report", { kind = "daily" },
  { backfill = 6 * 3600 })
jobs:periodic("warm-cache", "*/5 * * * *", "warm_cache")
jobs:periodic("standup", "0 9 * * mon-fri", "remind", { room = "ops" }, { timezone = "local" })
jobs:periodic("heartbeat", "@every 2s", "heartbeat")

-- The first worker starts the scheduler (jobs:scheduler() starts it in a
-- process that runs no worker).
local w = jobs:worker({ group = "cron", concurrency = 2 })
w:ready()
for _, p in ipairs(jobs:periodic_list()) do
  print(("%-15s %-16s next %s"):format(p.name, p.spec,
    os.date("!%Y-%m-%d %H:%M:%S UTC", math.floor(p.next_run))))
end

if mode == "demo" then
  local deadline = pgcoord.now() + 30
  while beats < 2 do
    if pgcoord.now() > deadline then error("no two heartbeats within 30 s") end
    pgcoord.sleep(0.1)
  end
  pgcoord.stop()
end

-- A job worker for group "example": two job types, retries, a keyed job
-- and a job for later.  Without arguments it works the group until
-- SIGTERM/Ctrl-C; with `demo` it first schedules a few jobs, waits until
-- they are done, prints their run history and stops.
--
--   pgcoord-run --migrate && pgcoord-run examples/jobs_worker.lua demo
--
-- A graceful stop (first SIGTERM or Ctrl-C) stops fetching, hands claimed
-- jobs that have not started back to other workers, lets running handlers
-- finish and writes their results.
local mode = ...
local db = pgcoord.connect(nil, { size = 4 })
local jobs = pgcoord.jobs(db)

-- A handler that returns finishes the job; one that raises fails this run,
-- and the job runs again after base_delay x attempt seconds until retry.max
-- retries are spent.  Then it is kept as failed: jobs:failed(), jobs:retry().
jobs:define("send_email", function(job)
  print(("send_email #%d to %s, attempt %d"):format(job.id, job.params.to, job.error_count + 1))
  if job.params.flaky and job.error_count < 2 then error("SMTP server did not answer") end
end, { group = "example", retry = { max = 5, base_delay = 0.5 } })

-- error(pgcoord.retry_at(t, why)) retries at an exact time instead.
jobs:define("rebuild_index", function(job)
  if pgcoord.time() < job.params.not_before then
    error(pgcoord.retry_at(job.params.not_before, "too early"))
  end
  db:exec("SELECT pg_sleep(0.2)")   -- handlers may wait: other jobs run meanwhile
  print(("rebuild_index #%d of %s done"):format(job.id, job.params.table))
end, { group = "example" })

local w = jobs:worker({
  group = "example", concurrency = 4, poll_interval = 5,
  should_log_run = pgcoord.jobs.log_final_runs,   -- history: final runs only
})
w:ready()
print("worker ready")

if mode == "demo" then
  local now = pgcoord.time()
  -- In the caller's transaction: the job exists (and a worker hears of it)
  -- only if the transaction commits.
  db:tx(function(tx)
    jobs:schedule_now(tx, "send_email", { to = "alice@example.com" })
  end)
  jobs:schedule(db, "send_email", { to = "bob@example.com", flaky = true })
  jobs:schedule(db, "send_email", { to = "carol@example.com" }, { run_at = now + 2 })
  -- A key makes a job unique while it waits: the second is refused.
  local params = { table = "products", not_before = now + 1 }
  jobs:schedule(db, "rebuild_index", params, { key = "rebuild:products" })
  local id, why = jobs:schedule(db, "rebuild_index", params, { key = "rebuild:products" })
  print(("second rebuild_index: %s (%s)"):format(tostring(id), why))
  -- Many in one statement; lower priority numbers run first.
  local many = {}
  for i = 1, 5 do
    many[i] = { type = "send_email", params = { to = ("user%d@example.com"):format(i) },
                priority = i % 2 }
  end
  jobs:schedule_many(db, many)

  local deadline = pgcoord.now() + 30
  while db:one([[SELECT count(*)::int AS n FROM pgcoord.jobs
                  WHERE group_name = 'example' AND state <> 'failed']]).n > 0 do
    if pgcoord.now() > deadline then error("the demo jobs did not finish within 30 s") end
    pgcoord.sleep(0.1)
  end
  w:shutdown()   -- writes the last results
  for _, r in ipairs(db:query([[
      SELECT type, count(*)::int AS runs, max(attempt) AS last_attempt
        FROM pgcoord.job_runs WHERE group_name = 'example'
       GROUP BY type ORDER BY type]])) do
    print(("history: %-14s %d final runs, highest attempt %d"):format(r.type, r.runs,
      r.last_attempt))
  end
  pgcoord.stop()
end

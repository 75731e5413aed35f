-- The pgcoord side of scripts/bench/cpu, run by pgcoord-run (under
-- valgrind or not): fixed amounts of work, ended by a count, never by a
-- clock, so that two runs do the same work whatever the machine's load.
--   cpu.lua query N CLIENTS
--       N x db:one("SELECT 1") through a pool of CLIENTS, from CLIENTS tasks
--   cpu.lua listen CHANNEL N
--       one fan:on callback on CHANNEL; prints "ready" once listening and
--       returns once N notifications have reached it
--   cpu.lua jobs-schedule GROUP N
--       schedules N no-op jobs of GROUP (one statement)
--   cpu.lua jobs-drain GROUP N CONCURRENCY
--       a worker with the documented defaults and CONCURRENCY runs the N
--       jobs of GROUP, then stops (writing every result)
--   cpu.lua queue-setup QUEUE
--       creates QUEUE with one unordered subscription, s1
--   cpu.lua queue-publish QUEUE N
--       N x q:publish from one task (one message per statement)
--   cpu.lua queue-stream QUEUE N RATE
--       N x q:publish from one task, RATE a second
--   cpu.lua queue-drain QUEUE N CONCURRENCY
--       a consumer of s1 with a no-op handler; prints "ready" once
--       listening, acks N messages, then stops (writing every ack)
-- Each mode ends with "done ops=N".
local pgcoord = require "pgcoord"

package.path = (arg[0]:match("^(.*/)") or "./") .. "?.lua;" .. package.path
local bench = require "benchlib"
local say = bench.say

local args = bench.args("cpu.lua", ...)
local mode = args.mode

-- A local fan-out that fn's last call signals: waits for it (at most limit s).
-- (describe, if given, says how far it got when the time is up)
local function until_done(limit, what, start, describe)
  local done = pgcoord.fanout("bench_cpu_done")
  local waiter = done:listen()
  start(function() done:notify(true) end)
  local got, err = waiter:receive(limit)
  waiter:close()
  if not got then
    error(("no %s within %d s (%s)%s"):format(what, limit, tostring(err),
      describe and "; " .. describe() or ""))
  end
end
local LIMIT = tonumber(os.getenv("BENCH_CPU_LIMIT")) or 600

local n
if mode == "query" then
  n = args:integer(2, "N")
  local clients = args:integer(3, "CLIENTS")
  local db = pgcoord.connect(nil, { size = clients })
  bench.warm(db, clients)
  local tasks = {}
  for c = 1, clients do
    local share = n // clients + (c <= n % clients and 1 or 0)
    tasks[c] = pgcoord.spawn(function()
      for _ = 1, share do db:one("SELECT 1") end
    end)
  end
  for _, t in ipairs(tasks) do t:join() end
  db:close()

elseif mode == "listen" then
  local channel = args[2]
  n = args:integer(3, "N")
  local db = pgcoord.connect(nil, { size = 1 })
  local sub = pgcoord.subscriber(db)
  local fan = sub:add(pgcoord.fanout(channel))
  sub:start()
  local deadline = pgcoord.now() + 30
  while not sub:connected() do
    if pgcoord.now() > deadline then error("the subscriber did not connect within 30 s") end
    pgcoord.sleep(0.01)
  end
  local listener
  local calls = 0
  until_done(LIMIT, "last notification", function(finish)
    listener = fan:on(function()
      calls = calls + 1
      if calls == n then finish() end
    end)
    say("ready")
  end, function()
    local f, s = fan:stats(), sub:stats()
    return ("%d of %d calls; fan-out: notifications=%d drops=%d;"
      .. " subscriber: notifications=%d reconnects=%d generation=%d state=%s")
      :format(calls, n, f.notifications, f.drops, s.notifications, s.reconnects, s.generation,
              s.state)
  end)
  listener:close()
  sub:stop()
  db:close()

elseif mode == "jobs-schedule" then
  local group = args[2]
  n = args:integer(3, "N")
  local db = pgcoord.connect(nil, { size = 1 })
  pgcoord.migrate(db)
  local list = {}
  for i = 1, n do list[i] = { type = "noop", params = {} } end
  local jobs = pgcoord.jobs(db)
  jobs:define("noop", function() end, { group = group })
  assert(#jobs:schedule_many(db, list) == n)
  db:exec("VACUUM ANALYZE pgcoord.jobs")
  db:close()

elseif mode == "jobs-drain" then
  local group = args[2]
  n = args:integer(3, "N")
  local concurrency = args:integer(4, "CONCURRENCY")
  local db = pgcoord.connect(nil, { size = 4 })
  local jobs = pgcoord.jobs(db)
  local w
  until_done(LIMIT, "last job", function(finish)
    local done = 0
    jobs:define("noop", function()
      done = done + 1
      if done == n then finish() end
    end, { group = group })
    w = jobs:worker({ group = group, concurrency = concurrency })
  end)
  w:shutdown()
  local left = db:one("SELECT count(*)::int AS n FROM pgcoord.jobs WHERE group_name = $1", group).n
  if left ~= 0 then error(("%d jobs left in group %s"):format(left, group)) end
  db:close()

elseif mode == "queue-setup" then
  n = 0
  local db = pgcoord.connect(nil, { size = 1 })
  pgcoord.migrate(db)
  pgcoord.queue(db, args[2]):subscribe("s1")
  db:close()

elseif mode == "queue-publish" then
  n = args:integer(3, "N")
  local db = pgcoord.connect(nil, { size = 1 })
  local q = pgcoord.queue(db, args[2])
  bench.warm(db, 1)
  for i = 1, n do q:publish(db, { n = i }) end
  db:close()

elseif mode == "queue-stream" then
  n = args:integer(3, "N")
  local rate = args:number(4, "RATE")
  local db = pgcoord.connect(nil, { size = 1 })
  local q = pgcoord.queue(db, args[2])
  local started = pgcoord.now()
  for i = 1, n do
    q:publish(db, { n = i })
    pgcoord.sleep(started + i / rate - pgcoord.now())
  end
  db:close()

elseif mode == "queue-drain" then
  n = args:integer(3, "N")
  local concurrency = args:integer(4, "CONCURRENCY")
  local db = pgcoord.connect(nil, { size = concurrency + 2 })
  local q = pgcoord.queue(db, args[2])
  local c
  until_done(LIMIT, "last message", function(finish)
    local handled = 0
    c = q:consume("s1", function()
      handled = handled + 1
      if handled == n then finish() end
    end, { concurrency = concurrency })
    local deadline = pgcoord.now() + 30
    while not (q.sub and q.sub:connected()) do
      if pgcoord.now() > deadline then error("the subscriber did not connect within 30 s") end
      pgcoord.sleep(0.01)
    end
    say("ready")
  end)
  c:stop()
  local acked = c:stats().acked
  if acked ~= n then error(("acked %d of %d"):format(acked, n)) end
  db:close()

else
  error(("cpu.lua: unknown mode %s"):format(tostring(mode)))
end
say(("done ops=%d"):format(n))

-- The pgcoord side of scripts/bench/notify, run by pgcoord-run:
--   notify.lua listen CHANNEL LISTENERS SECONDS WAIT
--       LISTENERS fan:on callbacks on CHANNEL; prints "ready", then counts
--       the callbacks run in a window of SECONDS that opens with the first
--       notification (waiting at most WAIT seconds for it); prints
--       "notifications=N callbacks=C seconds=S rate=R drops=D cpu=T" (T: the
--       process's CPU seconds in the window)
--   notify.lua latency ROUND_TRIPS
--       publish -> fan:on callback round trips, one at a time; prints
--       "round_trips=N p50_ms=.. p99_ms=.. max_ms=.. mean_ms=.."
--   notify.lua memory LISTENERS
--       Private_Dirty/Rss (kB) and Lua heap before and after creating
--       LISTENERS idle fan:listen listeners (then fan:on ones, for context)
local pgcoord = require "pgcoord"

package.path = (arg[0]:match("^(.*/)") or "./") .. "?.lua;" .. package.path
local bench = require "benchlib"
local say = bench.say

local args = bench.args("notify.lua", ...)
local mode = args.mode


-- A pool, a started subscriber and a fan-out on channel, once listening.
local function subscribe(channel, pool_size)
  local db = pgcoord.connect(nil, { size = pool_size or 1 })
  local sub = pgcoord.subscriber(db)
  local fan = sub:add(pgcoord.fanout(channel))
  sub:start()
  local deadline = pgcoord.now() + 10
  while not sub:connected() do
    if pgcoord.now() > deadline then error("the subscriber did not connect within 10 s") end
    pgcoord.sleep(0.01)
  end
  return db, sub, fan
end

if mode == "listen" then
  local channel = args[2]
  local n = args:integer(3, "LISTENERS")
  local window, wait = args:integer(4, "SECONDS"), args:integer(5, "WAIT")
  local db, sub, fan = subscribe(channel)
  local calls, started, cpu_started = 0, nil, nil
  local function count()
    calls = calls + 1
    if not started then started, cpu_started = pgcoord.now(), os.clock() end
  end
  local listeners = {}
  for i = 1, n do listeners[i] = fan:on(count) end
  say("ready")

  local give_up = pgcoord.now() + wait
  while not started do
    if pgcoord.now() > give_up then error(("no notification within %d s"):format(wait)) end
    pgcoord.sleep(0.01)
  end
  pgcoord.sleep(started + window - pgcoord.now())
  local counted, cpu = calls, os.clock() - cpu_started
  local stats = fan:stats()
  for _, l in ipairs(listeners) do l:close() end
  sub:stop()
  db:close()
  say(("notifications=%d callbacks=%d seconds=%d rate=%.1f drops=%d cpu=%.3f")
    :format(counted // n, counted, window, counted / n / window, stats.drops, cpu))

elseif mode == "latency" then
  local rounds = args:integer(2, "ROUND_TRIPS")
  local warmup = 20
  local db, sub, fan = subscribe("bench_latency", 2)
  -- The callback records the latency, then wakes the publishing loop
  -- through a local fan-out (no database involved).
  local done = pgcoord.fanout("bench_latency_done")
  local waiter = done:listen()
  local sent_at, latency = {}, {}
  local callback = fan:on(function(msg)
    latency[msg.i] = pgcoord.now() - sent_at[msg.i]
    done:notify(msg.i)
  end)
  for i = 1, warmup + rounds do
    sent_at[i] = pgcoord.now()
    pgcoord.publish(db, "bench_latency", { i = i })
    local got, err = waiter:receive(5)
    if got ~= i then
      error(("round trip %d: got %s (%s)"):format(i, tostring(got), tostring(err)))
    end
  end
  callback:close()
  waiter:close()
  sub:stop()
  db:close()

  say(bench.latency_line("round_trips", table.move(latency, warmup + 1, warmup + rounds, 1, {})))

elseif mode == "memory" then
  local n = args:integer(2, "LISTENERS")
  local function snapshot()
    collectgarbage("collect")
    local f = assert(io.open("/proc/self/smaps_rollup"))
    local text = f:read("a")
    f:close()
    return { pd = tonumber(text:match("\nPrivate_Dirty:%s+(%d+)")),
             rss = tonumber(text:match("\nRss:%s+(%d+)")),
             lua = collectgarbage("count") }
  end
  local function report(name, before, after)
    say(("%s pd_kb=%d rss_kb=%d lua_kb=%.0f"):format(name, after.pd - before.pd,
      after.rss - before.rss, after.lua - before.lua))
  end
  local db, sub, fan = subscribe("bench_memory")

  local base = snapshot()
  say(("base pd_kb=%d rss_kb=%d lua_kb=%.0f"):format(base.pd, base.rss, base.lua))
  local listeners = {}
  for i = 1, n do listeners[i] = fan:listen() end
  local idle = snapshot()
  report("listen", base, idle)

  -- One notification over the wire, to show they all work.
  pgcoord.publish(db, "bench_memory", { hello = "world" })
  local got = 0
  local deadline = pgcoord.now() + 5
  while got < n and pgcoord.now() < deadline do
    got = 0
    pgcoord.sleep(0.01)
    for _, l in ipairs(listeners) do got = got + l:pending() end
  end
  say(("delivered listeners=%d of=%d"):format(got, n))
  for _, l in ipairs(listeners) do l:close() end
  listeners = nil -- luacheck: ignore 311

  -- For context: fan:on listeners, a task each.
  local before_on = snapshot()
  local callbacks = {}
  for i = 1, n do callbacks[i] = fan:on(function() end) end
  report("on", before_on, snapshot())
  for _, l in ipairs(callbacks) do l:close() end
  sub:stop()
  db:close()

else
  error(("notify.lua: unknown mode %s (listen, latency or memory)"):format(tostring(mode)))
end

-- pgcoord inside a luv (libuv) program, run by a stock lua5.4:
--
--   lua5.4 examples/embed_luv.lua [demo|latency N|idle]
--
-- libuv owns the loop; pgcoord says what to wait for (a descriptor and its
-- next deadline) and does its work in pgcoord.step(0).  Nothing polls.
local uv = require "luv"
local pgcoord = require "pgcoord"

-- ---- the recipe ----------------------------------------------------------
local function drive() pgcoord.step(0) end
local poll = uv.new_poll(pgcoord.pollfd())
poll:start("r", drive)
-- Before every wait, a timer for pgcoord's next deadline (0: work is
-- ready now; nil: none).  A prepare handle runs just before libuv polls,
-- so work started from a libuv callback is seen too.
local timer = uv.new_timer()
local prepare = uv.new_prepare()
prepare:start(function()
  local t = pgcoord.next_timeout()
  if t then timer:start(math.ceil(t * 1000), 0, drive) else timer:stop() end
end)
local function stop_driving()
  for _, h in ipairs({ poll, timer, prepare }) do h:close() end
end
-- ----------------------------------------------------------------------------

local mode, n = arg[1] or "demo", tonumber(arg[2]) or 200
local db = pgcoord.connect(nil, { size = 2 })

if mode == "demo" then
  -- a libuv timer ticks while a pgcoord task waits for its query
  local ticks = uv.new_timer()
  local count = 0
  ticks:start(20, 20, function()
    count = count + 1
    print("tick " .. count)
  end)
  pgcoord.spawn(function()
    print("query start")
    local row = db:one("SELECT pg_sleep(0.3), 42 AS answer")
    print("query done " .. row.answer)
    ticks:close()
    stop_driving()
  end)
elseif mode == "latency" then
  -- n notifications, each timed from publish to arrival
  local sub = pgcoord.subscriber(db):start()
  local fan = sub:channel(("embed_%d"):format(math.random(1, 1e9)))
  local l = fan:listen()
  pgcoord.spawn(function()
    sub:ready(10)
    local times = {}
    for i = 1, n do
      local t0 = pgcoord.now()
      fan:publish(db, { i = i })
      assert(l:receive(5).i == i)
      times[i] = pgcoord.now() - t0
    end
    table.sort(times)
    print(("latency p50_ms=%.3f p90_ms=%.3f"):format(times[n // 2] * 1e3,
      times[math.ceil(n * 0.9)] * 1e3))
    sub:stop()
    stop_driving()
  end)
elseif mode == "idle" then
  -- a pool and a listening subscriber with nothing to do
  local sub = pgcoord.subscriber(db):start()
  pgcoord.spawn(function()
    sub:ready(10)
    print("idle")
    io.stdout:flush()
  end)
end

uv.run()
db:close()

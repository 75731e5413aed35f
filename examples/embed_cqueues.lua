-- pgcoord inside a cqueues program, run by a stock lua5.4:
--
--   lua5.4 examples/embed_cqueues.lua [demo|latency N|idle]
--
-- cqueues owns the loop; pgcoord says what to wait for (a descriptor and
-- its next deadline) and does its work in pgcoord.step(0).  Nothing polls.
local cqueues = require "cqueues"
local pgcoord = require "pgcoord"

-- ---- the recipe ----------------------------------------------------------
-- A coroutine that waits for pgcoord's descriptor makes cq:step return when
-- it is readable; pgcoord's next deadline (0: work is ready now; nil: none)
-- bounds each cq:step; pgcoord.step(0) runs after every one.  pgcoord is
-- stepped from the main thread: pgcoord.step refuses a coroutine.
local cq = cqueues.new()
local pollable = { pollfd = pgcoord.pollfd(), events = "r" }
local driving = true
cq:wrap(function()
  while driving do cqueues.poll(pollable) end
end)
local function run()
  while driving do
    assert(cq:step(pgcoord.next_timeout()))
    pgcoord.step(0)
  end
end
local function stop_driving() driving = false end
-- ----------------------------------------------------------------------------

local mode, n = arg[1] or "demo", tonumber(arg[2]) or 200
local db = pgcoord.connect(nil, { size = 2 })

if mode == "demo" then
  -- a cqueues coroutine ticks while a pgcoord task waits for its query
  local ticking = true
  cq:wrap(function()
    local count = 0
    while ticking do
      cqueues.sleep(0.02)
      count = count + 1
      print("tick " .. count)
    end
  end)
  pgcoord.spawn(function()
    print("query start")
    local row = db:one("SELECT pg_sleep(0.3), 42 AS answer")
    print("query done " .. row.answer)
    ticking = false
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

run()
db:close()

-- The pgcoord side of scripts/bench/query, run by pgcoord-run:
--   query.lua rate SECONDS CONCURRENCY POOL_SIZE
--       prints "queries=N seconds=S qps=R" for `SELECT 1` through the pool
--   query.lua idle SECONDS POOL_SIZE
--       opens POOL_SIZE connections, prints "ready open=N", then idles until
--       SECONDS pass or a signal stops it (the bench reads its memory meanwhile)
--   query.lua bare SECONDS
--       prints "ready" and idles without touching the database
local pgcoord = require "pgcoord"

local mode = ...
local args = table.pack(...)

local function number_arg(i, name)
  local v = tonumber(args[i])
  if not v then
    error(("query.lua %s: %s must be a number, got %s"):format(mode, name, tostring(args[i])))
  end
  return v
end

local function say(line)
  io.stdout:write(line, "\n")
  io.stdout:flush()
end

-- Sleeps in short steps so that SIGTERM (a graceful stop) ends it promptly.
local function idle(seconds)
  local deadline = pgcoord.now() + seconds
  while not pgcoord.stopping() and pgcoord.now() < deadline do pgcoord.sleep(0.2) end
end

if mode == "rate" then
  local seconds = number_arg(2, "SECONDS")
  local concurrency = math.tointeger(number_arg(3, "CONCURRENCY"))
  local size = math.tointeger(number_arg(4, "POOL_SIZE"))
  local db = pgcoord.connect(nil, { size = size })

  -- Warm up: open every connection before the clock starts.
  local warm = {}
  for i = 1, size do warm[i] = pgcoord.spawn(db.query, db, "SELECT pg_sleep(0.05)") end
  for _, t in ipairs(warm) do t:join() end

  local counts, tasks = {}, {}
  local started = pgcoord.now()
  local deadline = started + seconds
  for i = 1, concurrency do
    counts[i] = 0
    tasks[i] = pgcoord.spawn(function()
      local n = 0
      while pgcoord.now() < deadline do
        db:query("SELECT 1")
        n = n + 1
      end
      counts[i] = n
    end)
  end
  for _, t in ipairs(tasks) do t:join() end
  local elapsed = pgcoord.now() - started
  local total = 0
  for _, n in ipairs(counts) do total = total + n end
  db:close()
  say(("queries=%d seconds=%.3f qps=%.1f"):format(total, elapsed, total / elapsed))

elseif mode == "idle" then
  local seconds = number_arg(2, "SECONDS")
  local size = math.tointeger(number_arg(3, "POOL_SIZE"))
  local db = pgcoord.connect(nil, { size = size })
  -- Queries that overlap make the pool open all its connections.
  local tasks = {}
  for i = 1, size do tasks[i] = pgcoord.spawn(db.query, db, "SELECT pg_sleep(0.05)") end
  for _, t in ipairs(tasks) do t:join() end
  collectgarbage()
  say(("ready open=%d"):format(db:stats().open))
  idle(seconds)
  db:close()

elseif mode == "bare" then
  collectgarbage()
  say("ready")
  idle(number_arg(2, "SECONDS"))

else
  error(("query.lua: unknown mode %s (rate, idle or bare)"):format(tostring(mode)))
end

-- The pgcoord side of scripts/bench/query, run by pgcoord-run:
--   query.lua rate SECONDS CONCURRENCY POOL_SIZE
--       prints "queries=N seconds=S qps=R" for `SELECT 1` through the pool
--   query.lua idle SECONDS POOL_SIZE
--       opens POOL_SIZE connections, prints "ready open=N", then idles until
--       SECONDS pass or a signal stops it (the bench reads its memory meanwhile)
--   query.lua bare SECONDS
--       prints "ready" and idles without touching the database
local pgcoord = require "pgcoord"

package.path = (arg[0]:match("^(.*/)") or "./") .. "?.lua;" .. package.path
local bench = require "benchlib"
local say = bench.say

local args = bench.args("query.lua", ...)
local mode = args.mode

-- Sleeps in short steps so that SIGTERM (a graceful stop) ends it promptly.
local function idle(seconds)
  local deadline = pgcoord.now() + seconds
  while not pgcoord.stopping() and pgcoord.now() < deadline do pgcoord.sleep(0.2) end
end

if mode == "rate" then
  local seconds = args:number(2, "SECONDS")
  local concurrency = args:integer(3, "CONCURRENCY")
  local size = args:integer(4, "POOL_SIZE")
  local db = pgcoord.connect(nil, { size = size })
  bench.warm(db, size)
  local total, elapsed = bench.clients(concurrency, seconds, function()
    db:query("SELECT 1")
  end)
  db:close()
  say(("queries=%d seconds=%.3f qps=%.1f"):format(total, elapsed, total / elapsed))

elseif mode == "idle" then
  local seconds = args:number(2, "SECONDS")
  local size = args:integer(3, "POOL_SIZE")
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
  idle(args:number(2, "SECONDS"))

else
  error(("query.lua: unknown mode %s (rate, idle or bare)"):format(tostring(mode)))
end

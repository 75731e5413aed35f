-- The body of scripts/soak/joblock (run by pgcoord-run).
package.path = "./spec/?.lua;" .. package.path
local helper = require "helper"

local n, m = tonumber(arg[1]) or 4, tonumber(arg[2]) or 12
local PING = 0.3

local COMPETITOR = [[
local name, fence = arg[1], arg[2]
local db = pgcoord.connect(nil, { size = 3, params = { application_name = os.getenv("APP") } })
local pid = tonumber(io.open("/proc/self/stat"):read("l"):match("^(%d+)"))
pgcoord.run_in_job_lock(db, "soak", name, { ping_interval = tonumber(arg[3]) }, function(ctx)
  while true do
    db:exec(("INSERT INTO %s (token, pid, at) VALUES ($1, $2, clock_timestamp())"):format(fence),
      ctx.token, pid)
    pgcoord.sleep(0.02)
  end
end)
]]

pgcoord.log.set_level("warn")
local db = pgcoord.connect(nil, { size = 3 })
pgcoord.migrate(db)
local name, fence = helper.unique("soak"), helper.unique("fence")
db:exec(("CREATE TABLE %s (token bigint, pid int, at timestamptz)"):format(fence))
local script = helper.write_file(helper.tmpname("competitor") .. ".lua", COMPETITOR)

local procs = {}
local function spawn()
  local app = helper.unique("soak")
  local p = helper.start({ "pgcoord-run", script, name, fence, tostring(PING) },
    { env = { APP = app } })
  p.app = app
  procs[#procs + 1] = p
end
for _ = 1, n do spawn() end

local function current()
  return db:one(("SELECT token, pid FROM %s ORDER BY at DESC LIMIT 1"):format(fence))
end
local function next_token(after)
  return helper.wait_until(function()
    return db:one(("SELECT token, pid, extract(epoch FROM min(at)) AS first FROM %s"
      .. " WHERE token > $1 GROUP BY token, pid ORDER BY token LIMIT 1"):format(fence), after)
  end, 30, "a takeover")
end
local function proc_of(pid)
  for _, p in ipairs(procs) do if p.pid == pid and p:alive() then return p end end
end

local kinds = { "SIGKILL", "SIGTERM", "backend kills" }
local worst, done, survived = {}, 0, 0
next_token(0)
for i = 1, m do
  local h = current()
  local p = proc_of(h.pid)
  local kind = kinds[(i - 1) % #kinds + 1]
  local t0 = pgcoord.time()
  if kind == "SIGKILL" then
    p:kill("KILL")
  elseif kind == "SIGTERM" then
    p:kill("TERM")
  else
    -- Kill the holder's backends for a while: it fails over, or heals in place.
    local stop_at = pgcoord.now() + 1.5
    while pgcoord.now() < stop_at do
      db:query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        .. " WHERE application_name = $1", p.app)
      pgcoord.sleep(0.05)
    end
  end
  if kind ~= "backend kills" or current().token > h.token then
    local nt = next_token(h.token)
    local took = nt.first - t0
    worst[kind] = math.max(worst[kind] or 0, took)
    done = done + 1
    io.write(("failover %d/%d by %-13s token %d -> %d in %.3fs\n"):format(i, m, kind, h.token,
      nt.token, took))
  else
    survived = survived + 1
    io.write(("attempt  %d/%d by %-13s token %d kept (the holder healed)\n"):format(i, m, kind,
      h.token))
  end
  if kind ~= "backend kills" then spawn() end
end

local rows = db:query(("SELECT token, extract(epoch FROM min(at)) AS first,"
  .. " extract(epoch FROM max(at)) AS last FROM %s GROUP BY token ORDER BY token"):format(fence))
local overlaps = 0
for i = 2, #rows do
  if rows[i].first <= rows[i - 1].last then overlaps = overlaps + 1 end
end
for _, p in ipairs(procs) do p:kill("KILL") end
io.write(("\njob lock soak: %d processes, %d forced failures, %d failovers done,"
  .. " %d healed in place; ping_interval %.1fs (stale_after %.1fs)\n")
  :format(n, m, done, survived, PING, 4 * PING))
for _, kind in ipairs(kinds) do
  if worst[kind] then
    io.write(("  worst takeover after %-13s %.3fs\n"):format(kind, worst[kind]))
  end
end
io.write(("  tokens seen %d, overlaps found %d (must be 0)\n"):format(#rows, overlaps))
helper.cleanup()
os.exit(overlaps == 0 and 0 or 1)

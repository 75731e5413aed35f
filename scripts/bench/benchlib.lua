-- What the Lua halves of scripts/bench/* share: arguments, output, a pool
-- opened before the clock starts, clients looping until a deadline, and
-- latency percentiles.  Each script finds it beside itself:
--   package.path = (arg[0]:match("^(.*/)") or "./") .. "?.lua;" .. package.path
local pgcoord = require "pgcoord"

local bench = {}

-- args = bench.args("query.lua", ...): args.mode, args[i], and
-- args:number(i, name [, min]) / args:integer(i, name [, min]), which raise
-- naming the argument when it is missing or below min (default: > 0).
function bench.args(script, ...)
  local a = table.pack(...)
  a.mode = a[1]
  local function check(self, i, name, v, min, what)
    if not v or (min and v < min) or (not min and v <= 0) then
      error(("%s %s: %s must be %s, got %s"):format(script, tostring(self.mode), name,
        min and ("%s >= %s"):format(what, min) or ("a positive " .. what), tostring(self[i])), 3)
    end
    return v
  end
  function a.number(self, i, name, min)
    return check(self, i, name, tonumber(self[i]), min, "number")
  end
  function a.integer(self, i, name, min)
    return check(self, i, name, math.tointeger(tonumber(self[i])), min, "integer")
  end
  return a
end

-- One line on stdout, flushed (the shell half reads it as it comes).
function bench.say(line)
  io.stdout:write(line, "\n")
  io.stdout:flush()
end

-- Opens n connections of db before the clock starts.
function bench.warm(db, n)
  local tasks = {}
  for i = 1, n do tasks[i] = pgcoord.spawn(db.query, db, "SELECT pg_sleep(0.05)") end
  for _, t in ipairs(tasks) do t:join() end
end

-- Runs fn(client, i) in `clients` tasks until `seconds` pass (i counts
-- calls from 1); returns the calls made and the elapsed seconds.
function bench.clients(clients, seconds, fn)
  local counts, tasks = {}, {}
  local started = pgcoord.now()
  local deadline = started + seconds
  for c = 1, clients do
    counts[c] = 0
    tasks[c] = pgcoord.spawn(function()
      local n = 0
      while pgcoord.now() < deadline do
        n = n + 1
        fn(c, n)
      end
      counts[c] = n
    end)
  end
  for _, t in ipairs(tasks) do t:join() end
  local elapsed = pgcoord.now() - started
  local total = 0
  for _, n in ipairs(counts) do total = total + n end
  return total, elapsed
end

-- Waits (polling every ms) until fn() is true; raises after limit seconds,
-- naming what it waited for.
function bench.wait_for(fn, limit, what)
  local deadline = pgcoord.now() + limit
  while not fn() do
    if pgcoord.now() > deadline then error(("no %s within %d s"):format(what, limit), 2) end
    pgcoord.sleep(0.001)
  end
end

-- "n=.. p50_ms=.. p99_ms=.. max_ms=.. mean_ms=.." of latencies in seconds.
function bench.latency_line(label, seconds)
  local ms = {}
  for i, v in ipairs(seconds) do ms[i] = v * 1000 end
  table.sort(ms)
  local sum = 0
  for _, v in ipairs(ms) do sum = sum + v end
  local function pct(p) return ms[math.max(1, math.ceil(p * #ms))] end
  return ("%s=%d p50_ms=%.3f p99_ms=%.3f max_ms=%.3f mean_ms=%.3f")
    :format(label, #ms, pct(0.50), pct(0.99), ms[#ms], sum / #ms)
end

return bench

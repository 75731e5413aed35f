-- The body of scripts/soak/failover (run by pgcoord-run under
-- `PGCOORD_TEST_STANDBY=1 scripts/pg-tmp run`), and of spec/failover_spec.lua.
--
-- A jobs worker, a queue consumer, an outbox relay, a subscriber and two
-- job-lock competitors run in separate pgcoord-run processes on
-- `host=P,S target_session_attrs=read-write`.  This process schedules a job,
-- publishes a queue message and saves an outbox message in one transaction
-- every few milliseconds, and NOTIFYs the subscriber.  Each round crashes
-- the primary (pg_ctl stop -m immediate), promotes the standby, measures
-- how long each primitive takes to work again, and brings the old primary
-- back as a standby of the new one (which then takes the next round's
-- failover).  At the end: every committed job ran and every committed
-- message was delivered (duplicates counted), lock tokens only grew and no
-- two holders overlapped.  Exit status 1 when anything did not hold.
--   args: ROUNDS (default 3)
package.path = "./spec/?.lua;" .. package.path
local helper = require "helper"

local rounds = math.tointeger(tonumber(arg[1] or "3"))
if not rounds or rounds < 1 then
  io.stderr:write("failover: ROUNDS must be a positive integer, got ", tostring(arg[1]), "\n")
  os.exit(2)
end

local function env(name)
  local v = os.getenv(name)
  if not v or v == "" then
    io.stderr:write(("failover: %s is not set; run me as: PGCOORD_TEST_STANDBY=1"
      .. " scripts/pg-tmp run scripts/soak/failover\n"):format(name))
    os.exit(2)
  end
  return v
end

local DSN = env("PGCOORD_TEST_FAILOVER_DSN")
local servers = {
  { pgdata = env("PGCOORD_TEST_PGDATA"), port = tonumber(env("PGPORT")) },
  { pgdata = env("PGCOORD_TEST_STANDBY_PGDATA"),
    port = tonumber(env("PGCOORD_TEST_STANDBY_PORT")) },
}
local PING_INTERVAL, PING_GRACE = 0.5, 1.5   -- the subscriber's
local LOCK_PING = 0.3                        -- the job lock's (stale after 4 pings)

-- One script for every process: argv[1] says which primitive it runs.  Each
-- records what it handles in `runs`, on whichever server is the primary.
local CHILD = [[
local role, runs, names = arg[1], arg[2], pgcoord.json.decode(arg[3])
io.stdout:setvbuf("no")
local db = pgcoord.connect(nil, { size = 8, connect_timeout = 3 })
local pid = tonumber(io.open("/proc/self/stat"):read("l"):match("^(%d+)"))
local insert = ("INSERT INTO %s (kind, k, pid) VALUES ($1, $2, $3)"):format(runs)
if role == "jobs" then
  local jobs = pgcoord.jobs(db)
  jobs:define(names.job, function(job) db:exec(insert, "job", job.params.k, pid) end,
    { group = names.group, retry = { max = 100, base_delay = 0.1 } })
  jobs:worker({ group = names.group, concurrency = 4, poll_interval = 0.5, flush_age = 0.1 })
    :ready()
elseif role == "queue" then
  local q = pgcoord.queue(db, names.queue)
  q:consume(names.sub, function(msg)
    db:exec(insert, "queue", msg.payload.k, pid)
    return true
  end, { concurrency = 4, retry_delay = 0.1, max_deliveries = 100, visibility_timeout = 5 })
elseif role == "outbox" then
  local ob = pgcoord.outbox(db, { table = names.outbox, max_retries = 100, retry_delay = 0.1,
    retry_delay_max = 1, visibility_timeout = 5 })
  ob:relay(function(msg)
    db:exec(insert, "outbox", msg.payload.k, pid)
    return true
  end, { poll_interval = 0.2 })
elseif role == "subscriber" then
  local sub = pgcoord.subscriber(db, { ping_interval = tonumber(arg[4]),
    ping_grace = tonumber(arg[5]), reconnect_min = 0.05, reconnect_max = 0.5 })
  local fan = pgcoord.fanout(names.channel)
  sub:add(fan)
  fan:on(function(msg) db:exec(insert, "notify", msg.k, pid) end)
  sub:start()
elseif role == "lock" then
  pgcoord.run_in_job_lock(db, "failover", names.lock, { ping_interval = tonumber(arg[4]) },
    function(ctx)
      while true do
        db:tx(function(tx)
          ctx.fence(tx)
          tx:exec(("INSERT INTO %s (token, pid) VALUES ($1, $2)"):format(names.fence),
            ctx.token, pid)
        end)
        pgcoord.sleep(0.02)
      end
    end)
end
print("ready " .. role)
]]

pgcoord.log.set_level("warn")
local db = pgcoord.connect(DSN, { size = 4, connect_timeout = 3 })

-- The standby-only conninfo for a writer: refused at once, naming the cause.
do
  local t0 = pgcoord.now()
  local standby = ("postgresql://%s@127.0.0.1:%d/%s?target_session_attrs=read-write")
    :format(DSN:match("^postgresql://([^@]+)@"), servers[2].port, DSN:match("/([^/?]+)%?"))
  local ok, err = pcall(pgcoord.connect, standby, { size = 1, connect_timeout = 3 })
  local took = pgcoord.now() - t0
  io.write(("standby-only writer: %s in %.3fs: %s\n"):format(ok and "ACCEPTED" or "refused", took,
    tostring(err)))
  if ok or not tostring(err):find("read-only", 1, true) then os.exit(1) end
end

pgcoord.migrate(db)
local names = {
  job = helper.unique("fo_job"), group = helper.unique("fo_group"), queue = helper.unique("fo_q"),
  sub = "relay", outbox = helper.unique("fo_outbox"), channel = helper.unique("fo_ch"),
  lock = helper.unique("fo_lock"), fence = helper.unique("fo_fence"),
}
local runs = helper.unique("fo_runs")
db:exec(("CREATE TABLE %s (kind text, k bigint, pid int, at timestamptz DEFAULT clock_timestamp())")
  :format(runs))
db:exec(("CREATE TABLE %s (token bigint, pid int, at timestamptz DEFAULT clock_timestamp())")
  :format(names.fence))
local jobs = pgcoord.jobs(db)
-- (defined here to schedule it; the worker process runs it)
jobs:define(names.job, function() end, { group = names.group })
local q = pgcoord.queue(db, names.queue)
q:subscribe(names.sub)
local ob = pgcoord.outbox(db, { table = names.outbox })
ob:migrate()

local script = helper.write_file(helper.tmpname("failover") .. ".lua", CHILD)
local procs = {}
for _, role in ipairs({ "jobs", "queue", "outbox", "subscriber", "lock", "lock" }) do
  local p = helper.start({ "pgcoord-run", script, role, runs, pgcoord.json.encode(names),
    tostring(role == "lock" and LOCK_PING or PING_INTERVAL), tostring(PING_GRACE) },
    { env = { PGCOORD_DATABASE_URL = DSN } })
  p:wait_output("ready " .. role, 20)
  procs[#procs + 1] = p
end

-- The producer: one transaction per k (a job, a queue message, an outbox
-- message); a commit that raised may or may not have happened (in doubt).
local committed, in_doubt, k, producing, last_error = {}, {}, 0, true, nil
local last_commit = 0
local producer = helper.spawn(function()
  while producing do
    k = k + 1
    local ok, err = pcall(db.tx, db, function(tx)
      jobs:schedule(tx, names.job, { k = k })
      q:publish(tx, { k = k })
      ob:save(tx, { topic = "failover", payload = { k = k } })
    end)
    if ok then
      committed[#committed + 1] = k
      last_commit = pgcoord.time()
    else
      in_doubt[#in_doubt + 1] = k
      last_error = err
      pgcoord.sleep(0.05)
    end
    pgcoord.sleep(0.01)
  end
end)
-- The subscriber gets a NOTIFY now and then (they are not durable: only
-- that they flow again counts).
local pinger = helper.spawn(function()
  local n = 0
  while producing do
    n = n + 1
    pcall(pgcoord.publish, db, names.channel, { k = n })
    pgcoord.sleep(0.1)
  end
end)

-- Epoch seconds of the first `kind` row written at or after t (nil if none).
local function first_since(kind, t)
  local ok, row = pcall(db.one, db, ("SELECT extract(epoch FROM min(at)) AS at FROM %s"
    .. " WHERE kind = $1 AND at >= to_timestamp($2)"):format(runs), kind, t)
  return ok and row and row.at
end
local function first_token_since(t)
  local ok, row = pcall(db.one, db, ("SELECT extract(epoch FROM min(at)) AS at FROM %s"
    .. " WHERE at >= to_timestamp($1)"):format(names.fence), t)
  return ok and row and row.at
end

local KINDS = { "job", "queue", "outbox", "notify" }
local worst, failures = {}, 0
local function note(kind, took)
  worst[kind] = math.max(worst[kind] or 0, took)
end

local function ctl(action, pgdata, extra)
  local cmd = ("PGCOORD_TEST_PGDATA=%s %s %s%s >/dev/null 2>&1"):format(helper.quote(pgdata),
    os.getenv("PGCOORD_TEST_PGCTL"), action, extra and (" " .. extra) or "")
  assert(helper.sh(cmd) == 0, "pg-tmp ctl " .. action .. " failed")
end

-- What went wrong where, for a failure.
local function explain(what)
  io.write(("failover: %s; last producer error: %s\n"):format(what, tostring(last_error)))
  for _, p in ipairs(procs) do
    io.write(("--- %s (%s)\n%s\n"):format(p.argv[3], p:alive() and "running" or "ended",
      p:output():sub(-3000)))
  end
end

-- Everything flows before the first failover.
local t_start = pgcoord.time()
for _, kind in ipairs(KINDS) do
  if not pcall(helper.wait_until, function() return first_since(kind, t_start - 60) end, 30) then
    explain(kind .. " does not flow")
    os.exit(1)
  end
end
helper.wait_until(function() return first_token_since(t_start - 60) end, 30, "a lock holder")

local primary = 1
for round = 1, rounds do
  pgcoord.sleep(1)
  local old, new = servers[primary], servers[3 - primary]
  local t0 = pgcoord.time()
  ctl("stop-immediate", old.pgdata)
  ctl("promote", new.pgdata)
  local t_promoted = pgcoord.time()
  local line = { ("round %d/%d: primary :%d crashed, :%d promoted in %.2fs;"):format(round, rounds,
    old.port, new.port, t_promoted - t0) }
  local write_at = helper.wait_until(function() return last_commit > t_promoted and last_commit end,
    PING_GRACE + 15, "a commit on the new primary")
  note("write", write_at - t0)
  line[#line + 1] = ("write %.2fs"):format(write_at - t0)
  for _, kind in ipairs(KINDS) do
    local ok, at = pcall(helper.wait_until, function() return first_since(kind, t_promoted) end,
      PING_GRACE + 15, kind .. " on the new primary")
    if ok then
      note(kind, at - t0)
      line[#line + 1] = ("%s %.2fs"):format(kind, at - t0)
    else
      failures = failures + 1
      line[#line + 1] = kind .. " NEVER"
    end
  end
  local ok, at = pcall(helper.wait_until, function() return first_token_since(t_promoted) end,
    PING_GRACE + 15, "a lock holder on the new primary")
  if ok then
    note("lock", at - t0)
    line[#line + 1] = ("lock %.2fs"):format(at - t0)
  else
    failures = failures + 1
    line[#line + 1] = "lock NEVER"
  end
  -- The old primary comes back, as a standby of the new one: it refuses
  -- writes, and the conninfo (which names it first) skips it.
  ctl("rejoin", old.pgdata, tostring(new.port))
  local direct = ("postgresql://%s@127.0.0.1:%d/%s"):format(DSN:match("^postgresql://([^@]+)@"),
    old.port, DSN:match("/([^/?]+)%?"))
  local odb = pgcoord.connect(direct, { size = 1 })
  local wrote = pcall(odb.exec, odb, ("INSERT INTO %s (kind, k) VALUES ('split', 0)"):format(runs))
  odb:close()
  if wrote then failures = failures + 1 end
  line[#line + 1] = wrote and "old primary ACCEPTED a write" or "old primary back as a standby"
  -- and replicating synchronously again, so the next round loses nothing
  local sync = pcall(helper.wait_until, function()
    local asked, row = pcall(db.one, db,
      "SELECT count(*)::int AS n FROM pg_stat_replication WHERE sync_state = 'sync'")
    return asked and row.n == 1
  end, 30)
  if not sync then failures = failures + 1 end
  line[#line + 1] = sync and "(sync)" or "NOT SYNCHRONOUS"
  io.write(table.concat(line, " "), "\n")
  primary = 3 - primary
end
pgcoord.sleep(1)
producing = false
producer:join()
pinger:join()

-- Every committed k reached each durable primitive; duplicates counted.
local missing, dups = {}, {}
local function check_delivered(kind)
  return helper.wait_until(function()
    local rows = db:query(("SELECT k, count(*)::int AS n FROM %s WHERE kind = $1 GROUP BY k")
      :format(runs), kind)
    local seen = {}
    local d = 0
    for _, r in ipairs(rows) do
      seen[r.k] = true
      d = d + r.n - 1
    end
    local m = 0
    for _, c in ipairs(committed) do if not seen[c] then m = m + 1 end end
    if m == 0 then return { missing = 0, dups = d } end
  end, 60, "every committed " .. kind)
end
for _, kind in ipairs({ "job", "queue", "outbox" }) do
  local ok, r = pcall(check_delivered, kind)
  if not ok then io.write(("failover: %s: %s\n"):format(kind, tostring(r))) end
  if ok then
    missing[kind], dups[kind] = r.missing, r.dups
  else
    missing[kind], dups[kind] = "some", "?"
    failures = failures + 1
  end
end

-- The lock: tokens grow with time, and no two holders' writes interleave.
local tokens = db:query(("SELECT token, extract(epoch FROM min(at)) AS first,"
  .. " extract(epoch FROM max(at)) AS last, count(DISTINCT pid)::int AS pids FROM %s"
  .. " GROUP BY token ORDER BY min(at)"):format(names.fence))
local overlaps, backwards = 0, 0
for i = 1, #tokens do
  if tokens[i].pids > 1 then overlaps = overlaps + 1 end
  if i > 1 then
    if tokens[i].first <= tokens[i - 1].last then overlaps = overlaps + 1 end
    if tokens[i].token <= tokens[i - 1].token then backwards = backwards + 1 end
  end
end
if overlaps > 0 or backwards > 0 then failures = failures + 1 end

for _, p in ipairs(procs) do p:kill("TERM") end
for _, p in ipairs(procs) do
  if p:alive() and not pcall(p.wait, p, 35) then p:kill("KILL") end
end

io.write(("\nfailover soak: %d round(s); ping_grace %.1fs (subscriber), lock stale after %.1fs\n")
  :format(rounds, PING_GRACE, 4 * LOCK_PING))
io.write(("  committed %d, in doubt %d (raised at commit)\n"):format(#committed, #in_doubt))
for _, kind in ipairs({ "write", "job", "queue", "outbox", "notify", "lock" }) do
  io.write(("  worst recovery %-7s %s\n"):format(kind,
    worst[kind] and ("%.2fs after the crash"):format(worst[kind]) or "never"))
end
for _, kind in ipairs({ "job", "queue", "outbox" }) do
  io.write(("  %-7s missing %s, duplicates %s\n"):format(kind, missing[kind], dups[kind]))
end
io.write(("  lock tokens %d, overlaps %d, tokens going backwards %d (must be 0)\n")
  :format(#tokens, overlaps, backwards))
io.write(("result: %s\n"):format(failures == 0 and "ok" or ("FAILED (" .. failures .. ")")))
helper.cleanup()
os.exit(failures == 0 and 0 or 1)

-- Operations: the metrics and health endpoint, --status, --workers, logs.
local pgcoord = require "pgcoord"
local helper = require "helper"

local function http_get(port, path, method)
  local p = assert(io.popen(("curl -s -m 5 -X %s -o - -w '\\n%%{http_code}' http://127.0.0.1:%d%s")
    :format(method or "GET", port, path)))
  local out = p:read("a")
  p:close()
  local body, code = out:match("^(.*)\n(%d+)$")
  return tonumber(code), body
end

local WORKER = [[
local group = arg[1]
local db = pgcoord.connect(nil, { size = 3 })
local jobs = pgcoord.jobs(db)
jobs:define("work", function(job)
  pgcoord.sleep(job.params.sleep or 0)
  -- at least once: a job of a killed worker runs again
  db:exec("INSERT INTO " .. arg[2] .. " (id) VALUES ($1) ON CONFLICT DO NOTHING", job.id)
end, { group = group })
local w = jobs:worker({ group = group, concurrency = 4, poll_interval = 0.5,
  heartbeat_interval = 0.3, reclaim_after = 1.5, flush_age = 0.05 })
w:ready()
print("worker ready")
]]

-- The port an --http process logged.
local function logged_port(p)
  local out = p:wait_output("http endpoint listening", 10)
  return tonumber(out:match("address=[%d%.]+:(%d+)"))
end

-- GET through curl in a child process, the loop running meanwhile (for a
-- server in this process); returns status code and body.
local function http_get_async(port, path)
  local _, out = helper.run({ "curl", "-s", "-m", "5", "-o", "-", "-w", "\n%{http_code}",
    ("http://127.0.0.1:%d%s"):format(port, path) })
  local body, code = out:match("^(.*)\n(%d+)$")
  return tonumber(code), body
end

local HOLD_BIN = helper.root .. "/build/tcp-hold"

-- Holds n connections to 127.0.0.1:port (see spec/tools/tcp-hold.c), idle,
-- or sending a request that never ends a byte every `dribble` seconds;
-- returns the process once all are connected.
local function hold(port, n, dribble)
  local f = io.open(HOLD_BIN, "rb")
  if f then
    f:close()
  else
    assert(helper.sh("make -s -C " .. helper.quote(helper.root) .. " build/tcp-hold >/dev/null")
      == 0, "cannot build build/tcp-hold")
  end
  local p = helper.start({ HOLD_BIN, tostring(port), tostring(n), dribble and tostring(dribble) })
  p:wait_output("connected " .. n, 10)
  return p
end

-- The closes a tcp-hold reported: { { after = seconds, status = "503" | "none" }, ... }.
local function closes(p)
  local t = {}
  for after, status in p:output():gmatch("closed %d+ after ([%d%.]+) status=(%w+)") do
    t[#t + 1] = { after = tonumber(after), status = status }
  end
  return t
end

describe("operations", function()
  local db

  setup(function()
    db = pgcoord.connect(nil, { size = 3 })
    pgcoord.migrate(db)
  end)

  teardown(function()
    helper.cleanup()
  end)

  it("serves /metrics and /healthz while jobs run, 503 while the server is down", function()
    local group, done = helper.unique("g"), helper.unique("done")
    db:exec(("CREATE TABLE %s (id bigint PRIMARY KEY)"):format(done))
    local script = helper.write_file(helper.tmpname("worker") .. ".lua", WORKER)
    local p = helper.start({ "pgcoord-run", "--http", "127.0.0.1:0", script, group, done })
    local port = logged_port(p)
    p:wait_output("worker ready", 10)
    local jobs = pgcoord.jobs(db)
    jobs:define("work", function() end, { group = group })
    local list = {}
    for i = 1, 50 do list[i] = { type = "work", params = { sleep = 0.01 * (i % 3) } } end
    jobs:schedule_many(db, list)
    helper.wait_until(function()
      return db:one(("SELECT count(*) AS n FROM %s"):format(done)).n == 50
    end, 20, "the jobs to run")
    local code, body = http_get(port, "/healthz")
    assert.are.equal(200, code, body)
    helper.wait_until(function()
      local _, metrics = http_get(port, "/metrics")
      return metrics:find(('pgcoord_jobs_completed_total{group="%s",type="work"} 50')
        :format(group), 1, true)
    end, 10, "the completed counter")
    code, body = http_get(port, "/metrics")
    assert.are.equal(200, code)
    assert.matches("# TYPE pgcoord_job_duration_seconds histogram", body, 1, true)
    assert.matches(('pgcoord_job_duration_seconds_count{group="%s",type="work"} 50'):format(group),
      body, 1, true)
    assert.matches('pgcoord_pool_connections{pool="pgcoord-http",state="idle"}', body, 1, true)
    assert.matches('pgcoord_notifications_received_total{channel="pgcoord_jobs"}', body, 1, true)
    assert.matches("pgcoord_database_up 1", body, 1, true)
    -- bad requests
    assert.are.equal(404, (http_get(port, "/nope")))
    assert.are.equal(405, (http_get(port, "/metrics", "POST")))
    if helper.can_pgctl() then
      helper.pgctl("stop")
      local ok, err = pcall(helper.wait_until, function()
        local c = http_get(port, "/healthz")
        return c == 503
      end, 10, "/healthz to say 503")
      local _, reason = http_get(port, "/healthz")
      helper.pgctl("start")
      assert(ok, err)
      assert.matches("database", reason)
      helper.wait_until(function() return http_get(port, "/healthz") == 200 end, 15,
        "/healthz to recover")
      db = pgcoord.connect(nil, { size = 3 })
    end
    p:kill("TERM")
    assert.are.equal(0, p:wait(15))
  end)

  it("closes connections that complete no request within idle_timeout, idle or dribbling",
    function()
    local server = pgcoord.http.serve("127.0.0.1:0", { idle_timeout = 1 })
    finally(function() server:close() end)
    local idle = hold(server.port, 100)
    -- slowloris: a header byte every 0.2 s, never the blank line
    local slow = hold(server.port, 100, 0.2)
    for _, p in ipairs({ idle, slow }) do
      p:wait_output("all closed", 8)
      local c = closes(p)
      assert.are.equal(100, #c)
      for _, x in ipairs(c) do
        assert.are.equal("none", x.status)
        assert.is_true(x.after >= 0.9, ("closed after %.3fs, before idle_timeout"):format(x.after))
      end
    end
    local stats = server.server:stats()
    assert.are.same({ 0, 200 }, { stats.open, stats.timed_out })
    local code, body = http_get_async(server.port, "/healthz")
    assert.are.equal(200, code, body)
  end)

  it("caps open connections: more get a 503 at once, /healthz answers again below the cap",
    function()
    local server = pgcoord.http.serve("127.0.0.1:0", { max_connections = 20, idle_timeout = 30 })
    finally(function() server:close() end)
    local held = hold(server.port, 20)
    helper.wait_until(function() return server.server:stats().open == 20 end, 10,
      "20 open connections")
    local extra = hold(server.port, 5)
    extra:wait_output("all closed", 5)
    local c = closes(extra)
    assert.are.equal(5, #c)
    for _, x in ipairs(c) do
      assert.are.equal("503", x.status)
      assert.is_true(x.after < 1, ("refused only after %.3fs"):format(x.after))
    end
    local code, body = http_get_async(server.port, "/healthz")
    assert.are.equal(503, code)
    assert.matches("too many connections", body, 1, true)
    held:kill("TERM")
    helper.wait_until(function() return server.server:stats().open == 0 end, 10,
      "the held connections to be closed")
    code, body = http_get_async(server.port, "/healthz")
    assert.are.equal(200, code, body)
    assert.are.equal(6, server.server:stats().refused)
    code, body = http_get_async(server.port, "/metrics")
    assert.are.equal(200, code)
    assert.matches("pgcoord_http_connections_refused_total 6", body, 1, true)
  end)

  it("--http :0 binds 127.0.0.1 and logs the port; limits come from the command line",
    function()
    local p = helper.start({ "pgcoord-run", "--http", ":0", "--http-timeout", "1",
      "--http-max-connections", "7", "-e",
      "while not pgcoord.stopping() do pgcoord.sleep(0.1) end" })
    local out = p:wait_output("http endpoint listening", 10)
    local port = tonumber(out:match("address=127%.0%.0%.1:(%d+)"))
    assert.is_not_nil(port, out)
    assert.matches("idle_timeout=1 max_connections=7", out, 1, true)
    assert.are.equal(200, (http_get(port, "/healthz")))
    -- not every interface: another address of this host is refused
    local curl = assert(io.popen(("curl -s -m 5 -o /dev/null -w '%%{http_code}' "
      .. "http://127.0.0.2:%d/healthz"):format(port)))
    local other = curl:read("a")
    curl:close()
    assert.are.equal("000", other)
    local idle = hold(port, 1)
    idle:wait_output("all closed", 8)   -- --http-timeout 1
    p:kill("TERM")
    assert.are.equal(0, p:wait(15))
    -- bad limits are refused, naming the option
    local code
    code, out = helper.run({ "pgcoord-run", "--http", ":0", "--http-timeout", "0", "-e", "" })
    assert.are.equal(1, code)
    assert.matches("--http-timeout takes a number of seconds > 0, got 0", out, 1, true)
    code, out = helper.run({ "pgcoord-run", "--http-max-connections", "0", "-e", "" })
    assert.are.equal(1, code)
    assert.matches("--http-max-connections takes an integer from 1 to 1000000, got 0", out, 1, true)
    assert.matches("option idle_timeout must be a number > 0, got 0",
      helper.error_of(pgcoord.http.serve, ":0", { idle_timeout = 0 }), 1, true)
    assert.matches("option max_connections must be an integer >= 1 and <= 1000000, got 1.5",
      helper.error_of(pgcoord.http.serve, ":0", { max_connections = 1.5 }), 1, true)
    assert.matches('unknown option "timeout" for pgcoord.http.serve',
      helper.error_of(pgcoord.http.serve, ":0", { timeout = 1 }), 1, true)
  end)

  it("prints --status for an empty database and a busy one", function()
    local empty = helper.create_database("empty")
    local code, out = helper.run({ "pgcoord-run", "--status" }, { env = { PGDATABASE = empty } })
    assert.are.equal(0, code, out)
    assert.matches("no pgcoord.jobs table", out, 1, true)
    assert.matches("no outbox table", out, 1, true)
    code, out = helper.run({ "pgcoord-run", "--status", "--json" },
      { env = { PGDATABASE = empty } })
    assert.are.equal(0, code, out)
    local s = pgcoord.json.decode(out)
    assert.are.equal(pgcoord.null, s.jobs)
    -- busy: jobs in several states, a lock held
    local group = helper.unique("g")
    local jobs = pgcoord.jobs(db)
    jobs:define("t", function() end, { group = group })
    for _ = 1, 3 do jobs:schedule_now(db, "t", {}) end
    jobs:schedule(db, "t", {}, { run_at = pgcoord.time() + 3600 })
    local lock = pgcoord.joblock(db, helper.unique("lock"), { ping_interval = 1 })
    local holding = helper.spawn(function()
      return lock:run(function() pgcoord.sleep(30) end)
    end)
    helper.wait_until(function() return lock:state() == "held" end, 10, "the lock")
    code, out = helper.run({ "pgcoord-run", "--status", "--json" })
    assert.are.equal(0, code, out)
    s = pgcoord.json.decode(out)
    local mine
    for _, g in ipairs(s.jobs) do if g.group == group then mine = g end end
    assert.are.same({ 3, 1, 0, 0 }, { mine.ready, mine.scheduled, mine.running, mine.failed })
    local held
    for _, l in ipairs(s.locks) do if l.name == lock.name then held = l end end
    assert.is_not_nil(held.holder)
    code, out = helper.run({ "pgcoord-run", "--status" })
    assert.are.equal(0, code, out)
    assert.matches(group, out, 1, true)
    holding:cancel()
  end)

  it("counts the outbox's messages by status in --status, processed ones left out", function()
    local name = helper.create_database("outbox_status")
    local odb = pgcoord.connect("dbname=" .. name, { size = 1 })
    local ok, err = pcall(function()
      local ob = pgcoord.outbox(odb)   -- the default table, outbox_messages
      ob:migrate()
      local ids = {}
      for i = 1, 5 do ids[i] = ob:save(nil, { topic = "t", payload = { n = i } }) end
      ob:mark_processed(ids[1], ids[2])
      odb:exec("UPDATE outbox_messages SET status = 'processing' WHERE id = $1", ids[3])
      odb:exec("UPDATE outbox_messages SET status = 'failed' WHERE id = $1", ids[4])
      local code, out = helper.run({ "pgcoord-run", "--status", "--json" },
        { env = { PGDATABASE = name } })
      assert.are.equal(0, code, out)
      local counts = pgcoord.json.decode(out).outbox[1]
      assert.are.same({ "outbox_messages", 1, 1, 1 },
        { counts.table, counts.pending, counts.processing, counts.failed })
    end)
    odb:close()
    if not ok then error(err, 0) end
  end)

  it("restarts a worker process killed by SIGKILL and stops all on SIGTERM", function()
    local group, done = helper.unique("g"), helper.unique("done")
    db:exec(("CREATE TABLE %s (id bigint PRIMARY KEY)"):format(done))
    local script = helper.write_file(helper.tmpname("worker") .. ".lua", WORKER)
    local p = helper.start({ "pgcoord-run", "--workers", "2", script, group, done })
    helper.wait_until(function()
      local _, n = p:output():gsub("worker ready", "")
      return n >= 2
    end, 15, "two workers")
    local jobs = pgcoord.jobs(db)
    jobs:define("work", function() end, { group = group })
    local list = {}
    for i = 1, 200 do list[i] = { type = "work", params = { sleep = 0.02 } } end
    jobs:schedule_many(db, list)
    helper.wait_until(function()
      return db:one(("SELECT count(*) AS n FROM %s"):format(done)).n > 20
    end, 20, "some jobs done")
    local child = tonumber(p:output():match('msg="child started" pid=(%d+) slot=1'))
    assert.is_not_nil(child, p:output())
    assert.is_true(helper.sh("kill -KILL " .. child) == 0)
    helper.wait_until(function()
      local _, n = p:output():gsub("worker ready", "")
      return n >= 3
    end, 15, "the worker restarted")
    helper.wait_until(function()
      return db:one(("SELECT count(*) AS n FROM %s"):format(done)).n == 200
    end, 30, "every job done despite the kill")
    helper.wait_until(function()
      return db:one("SELECT count(*) AS n FROM pgcoord.jobs WHERE group_name = $1", group).n == 0
    end, 15, "every job written back as done")
    p:kill("TERM")
    assert.are.equal(0, p:wait(20))
    local out = p:output()
    local _, stopped = out:gsub('msg="child stopped" pid=%d+ slot=%d status=0', "")
    assert.are.equal(2, stopped, out)
    -- the supervisor's lines: a slot and signal names, never a "worker"
    assert.matches('msg="child died" pid=' .. child .. ' signal=SIGKILL slot=1', out)
    assert.matches('msg="stopping the children" children=2 signal=SIGTERM', out, 1, true)
    assert.is_nil(out:find('msg="[^"]*child[^\n]* worker=', 1), out)
  end)

  it("writes log lines that parse back, in both formats, with no password", function()
    local chunk = 'pgcoord.log.info("hello there", { job = 42, queue = "q \\"x\\"",'
      .. ' password = "hunter2" })'
    local code, out = helper.run({ "pgcoord-run", "--log-format", "json", "-e", chunk })
    assert.are.equal(0, code, out)
    local line = out:match("[^\n]*hello there[^\n]*")
    local t = pgcoord.json.decode(line)
    assert.are.equal("info", t.level)
    assert.are.equal("hello there", t.msg)
    assert.are.equal(42, t.job)
    assert.are.equal('q "x"', t.queue)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT", t.time)
    assert.are_not.equal("hunter2", t.password)
    assert.is_nil(out:find("hunter2", 1, true))
    code, out = helper.run({ "pgcoord-run", "-e", chunk })
    assert.are.equal(0, code, out)
    line = out:match("[^\n]*hello there[^\n]*")
    local fields = {}
    for k, v in line:gmatch('(%w+)=("[^"\\]*[^"]*"?)') do fields[k] = v end
    for k, v in line:gmatch('(%w+)=([^%s"]+)') do fields[k] = fields[k] or v end
    assert.are.equal("info", fields.level)
    assert.are.equal('"hello there"', fields.msg)
    assert.are.equal("42", fields.job)
    assert.is_nil(line:find("hunter2", 1, true))
    -- levels filter
    code, out = helper.run({ "pgcoord-run", "--log-level", "warn", "-e", chunk })
    assert.are.equal(0, code)
    assert.is_nil(out:find("hello there", 1, true))
    -- a password in the conninfo never reaches an error or a log line
    code, out = helper.run({ "pgcoord-run", "--db",
      "postgresql://u:s3cr3t-pw@127.0.0.1:1/x", "-e", "pgcoord.connect()" })
    assert.are.equal(1, code)
    assert.is_nil(out:find("s3cr3t-pw", 1, true), out)
  end)
end)

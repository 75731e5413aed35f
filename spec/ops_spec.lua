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

-- s as a Lua pattern that matches it literally.
local function lit(s)
  return (tostring(s):gsub("%p", "%%%0"))
end

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

  it("serves metrics by the conventions: shortest bounds, build and process metrics, stable"
    .. " labels, queue and outbox counters; promtool check metrics passes", function()
    local task = require "pgcoord.task"
    local pool_name, app = helper.unique("ops_pool"), helper.unique("ops_app")
    local named = pgcoord.connect(nil, { size = 1, name = pool_name })
    local by_app = pgcoord.connect(nil, { size = 1, params = { application_name = app } })
    local started = helper.started()
    local server = pgcoord.http.serve("127.0.0.1:0", { db = named })
    finally(function()
      server:close()
      started:stop()
      named:close()
      by_app:close()
    end)
    local sub_name = helper.unique("ops_listener")
    local sub = started:own(pgcoord.subscriber(by_app, { name = sub_name }))
    sub:start()
    -- a job run: its duration histogram
    local group, jobs = helper.unique("ops_group"), pgcoord.jobs(db)
    jobs:define("quick", function() end, { group = group })
    started:worker(jobs, { group = group, flush_age = 0.05 })
    jobs:schedule_now(db, "quick", {})
    -- a lock held, then released: the same series, other values
    local lock = pgcoord.joblock(db, helper.unique("ops_lock"), { ping_interval = 1 })
    local unlock, unlocked = task.cond(), false
    local holding = helper.spawn(function()
      return lock:run(function() if not unlocked then unlock:wait(30) end end)
    end)
    -- a queue: 1 acked at once, 1 requeued then acked, 1 requeued then dead
    local qname = helper.unique("ops_queue")
    local q = pgcoord.queue(db, qname)
    q:subscribe("s")
    for n = 1, 3 do q:publish(db, { n = n }) end
    local consumer = q:consume("s", function(msg)
      return msg.payload.n == 1 or (msg.payload.n == 2 and msg.deliveries > 1)
    end, { max_deliveries = 2, retry_delay = 0.01, poll_interval = 0.1 })
    finally(function() consumer:stop(1) end)
    -- an outbox: 2 relayed, the other failing
    local ob = pgcoord.outbox(db, { table = helper.unique("ops_outbox"), retry_delay = 0.05 })
    ob:migrate()
    ob:save(nil, { topic = "good", payload = {} }, { topic = "good", payload = {} },
      { topic = "bad", payload = {} })
    local relay = ob:relay(function(msg) return msg.topic == "good" end, { poll_interval = 0.1 })
    finally(function() relay:stop(1) end)
    local body
    local function scrape()
      local code
      code, body = http_get_async(server.port, "/metrics")
      assert.are.equal(200, code, body)
      return body
    end
    local function has(line) return scrape():find("\n" .. line .. "\n", 1, true) end
    helper.wait_until(function() return lock:state() == "held" end, 10, "the lock")
    local outcomes = {
      ('pgcoord_queue_published_total{queue="%s"} 3'):format(qname),
      ('pgcoord_queue_acked_total{queue="%s",subscription="s"} 2'):format(qname),
      ('pgcoord_queue_requeued_total{queue="%s",subscription="s"} 2'):format(qname),
      ('pgcoord_queue_dead_total{queue="%s",subscription="s"} 1'):format(qname),
      ('pgcoord_outbox_relayed_total{table="%s"} 2'):format(ob.name),
      ('pgcoord_jobs_completed_total{group="%s",type="quick"} 1'):format(group),
    }
    helper.wait_until(function()
      for _, line in ipairs(outcomes) do if not has(line) then return false end end
      return true
    end, 20, "the queue, outbox and job counters:\n" .. table.concat(outcomes, "\n"))
    local failed = tonumber(scrape():match(('\npgcoord_outbox_failed_total{table="%s"} (%%d+)\n')
      :format(lit(ob.name))))
    assert(failed and failed >= 1, body)
    local function line(text) assert.matches("\n" .. lit(text) .. "\n", body) end
    -- bounds printed shortest
    line(('pgcoord_job_duration_seconds_bucket{group="%s",type="quick",le="0.005"} 1')
      :format(group))
    assert.not_matches("0%.00500000", body)
    -- build and process
    line(('pgcoord_build_info{version="%s"} 1'):format(require("pgcoord.core").version))
    local function value(name) return tonumber(body:match("\n" .. name .. " (%S+)\n")) end
    assert(value("process_cpu_seconds_total") > 0, body)
    assert(value("process_resident_memory_bytes") > 1e6, body)
    assert(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"), body)
    assert(value("process_open_fds") >= 3 and value("process_open_fds") <= value("process_max_fds"))
    local start = value("process_start_time_seconds")
    assert(start <= pgcoord.time() and start > pgcoord.time() - 86400, body)
    -- names, not creation order
    line(('pgcoord_pool_connections{pool="%s",state="in_use"} 0'):format(pool_name))
    assert.matches(('\npgcoord_pool_connections{pool="%s",state="idle"} %%d'):format(lit(app)),
      body)
    line(('pgcoord_subscriber_reconnects_total{subscriber="%s"} 0'):format(sub_name))
    assert.not_matches('pool="pool%d+"', body)
    assert.not_matches('subscriber="subscriber%d+"', body)
    assert.matches("pgcoord.connect: option name must be a string, got 5",
      helper.error_of(pgcoord.connect, nil, { name = 5 }), 1, true)
    assert.matches('pgcoord.subscriber: option name must be a non-empty string, got ""',
      helper.error_of(pgcoord.subscriber, by_app, { name = "" }), 1, true)
    -- the lock's state is a value: each state keeps its series
    local function lock_lines(held, state)
      local t = { ('pgcoord_job_lock_held{lock="%s"} %d'):format(lock.name, held) }
      for _, st in ipairs({ "held", "lost", "released", "waiting" }) do
        t[#t + 1] = ('pgcoord_job_lock_state{lock="%s",state="%s"} %d')
          :format(lock.name, st, st == state and 1 or 0)
      end
      return t
    end
    for _, l in ipairs(lock_lines(1, "held")) do line(l) end
    unlocked = true
    unlock:signal()
    helper.wait_until(function() return holding:status() == "done" end, 10, "the lock's run")
    scrape()
    for _, l in ipairs(lock_lines(0, "released")) do line(l) end
    -- promtool's lint of the exposition format
    if helper.sh("command -v promtool >/dev/null 2>&1") ~= 0 then
      pending("promtool is not installed (scripts/install-deps installs Debian's prometheus)")
      return
    end
    local file = helper.write_file(helper.tmpname("metrics"), body)
    local code, out = helper.run({ "sh", "-c", "promtool check metrics < " .. helper.quote(file) })
    assert.are.equal(0, code, out)
    assert.are.equal("", out)
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

  it("/healthz asked before the first probe came back waits for its answer, not a 503",
    function()
    local t = helper.tcp_parts()
    local relay = helper.relay(t.host, t.port)
    local pool = pgcoord.connect(relay.dsn(), { size = 1 })
    -- the first probe's connection hangs in the relay until a /healthz waits
    relay.blackhole()
    local server = pgcoord.http.serve("127.0.0.1:0", { db = pool, dashboard = false })
    finally(function()
      relay.stop()
      server:stop(5)
      pool:close()
    end)
    helper.spawn(function()
      helper.wait_until(function() return server.server:stats().open == 1 end, 5,
        "the /healthz request")
      relay.resume()
    end)
    local code, body = http_get_async(server.port, "/healthz")
    assert.are.equal(200, code, body)
  end)

  it("/healthz stays 200 while dashboard pages hold every connection of the pool", function()
    local pool = pgcoord.connect(nil, { size = 2 })
    local ob = pgcoord.outbox(db, { table = helper.unique("ops_busy_outbox") })
    ob:migrate()
    local server = pgcoord.http.serve("127.0.0.1:0", { db = pool, outbox_tables = { ob.name } })
    helper.wait_until(function() return http_get_async(server.port, "/healthz") == 200 end, 5,
      "the first probe")
    -- a lock holds every page of the failed messages (and so the pool) busy
    local release, released = require("pgcoord.task").cond(), false
    local locked = false
    helper.spawn(function()
      db:tx(function(tx)
        tx:exec(("LOCK TABLE %s IN ACCESS EXCLUSIVE MODE"):format(ob.quoted))
        locked = true
        if not released then release:wait(30) end
      end)
    end)
    finally(function()
      released = true
      release:signal()
      server:stop(5)
      pool:close()
    end)
    helper.wait_until(function() return locked end, 5, "the lock")
    local pages = {}
    for i = 1, 4 do
      pages[i] = helper.start({ "curl", "-s", "-m", "20", "-o", "/dev/null",
        ("http://127.0.0.1:%d/outbox/failed?table=%s"):format(server.port, ob.name) })
    end
    helper.wait_until(function()
      local s = pool:stats()
      return s.in_use == 2 and s.waiting >= 2
    end, 10, "the pages to hold the pool")
    -- past the 2.5 s after which a probe stuck behind them made /healthz stale
    local until_t = pgcoord.now() + 3
    while pgcoord.now() < until_t do
      local code, body = http_get_async(server.port, "/healthz")
      assert.are.equal(200, code, body)
      pgcoord.sleep(0.1)
    end
    released = true
    release:signal()
    for _, p in ipairs(pages) do assert.are.equal(0, p:wait(15)) end
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

  it("--status aligns columns for long names and tells running handlers from claimed jobs",
    function()
    local group = helper.unique("a_job_group_whose_name_is_longer_than_any_column_was")
    local queue = helper.unique("a_queue_with_a_rather_long_name")
    local lock = pgcoord.joblock(db, helper.unique("a_job_lock_named_at_great_length_too"),
      { ping_interval = 1 })
    pgcoord.queue(db, queue):subscribe("a_subscription_named_at_length_as_well")
    local jobs = pgcoord.jobs(db)
    local release, released = require("pgcoord.task").cond(), false
    jobs:define("t", function() if not released then release:wait(30) end end, { group = group })
    for _ = 1, 4 do jobs:schedule_now(db, "t", {}) end
    -- one handler runs, the other three jobs are claimed (prefetched) and wait
    local started = helper.started()
    finally(function()
      released = true
      release:signal()
      started:stop()
    end)
    started:worker(jobs, { group = group, concurrency = 1, prefetch = 4,
      heartbeat_interval = 0.1 })
    local holding = helper.spawn(function() return lock:run(function() pgcoord.sleep(30) end) end)
    helper.wait_until(function() return lock:state() == "held" end, 10, "the lock")
    local mine
    helper.wait_until(function()
      local code, out = helper.run({ "pgcoord-run", "--status", "--json" })
      assert.are.equal(0, code, out)
      for _, g in ipairs(pgcoord.json.decode(out).jobs) do
        if g.group == group then mine = g end
      end
      return mine and mine.running == 1 and mine.claimed == 3
    end, 10, "--status to count 1 running and 3 claimed")
    assert.are.same({ 0, 0 }, { mine.ready, mine.failed })
    local code, out = helper.run({ "pgcoord-run", "--status" })
    assert.are.equal(0, code, out)
    -- every row of a section has each column where its header has it:
    -- counts end under the header's end, names start under its start
    local section
    local sections = {}
    for line in out:gmatch("[^\n]+") do
      if line:match("^%S") then
        section = { title = line }
        sections[#sections + 1] = section
      elseif section.head then
        section[#section + 1] = line
      else
        section.head = line
      end
    end
    local function column(sec, header, right)
      local from, to = sec.head:find(header, 1, true)
      assert(from, ("no %s column in:\n%s"):format(header, out))
      for _, row in ipairs(sec) do
        if right then
          assert(row:sub(to, to):match("%S") and not row:sub(to + 1, to + 1):match("%S"),
            ("%s not aligned in:\n%s"):format(header, out))
        else
          assert(row:sub(from, from):match("%S") and row:sub(from - 1, from - 1) == " ",
            ("%s not aligned in:\n%s"):format(header, out))
        end
      end
    end
    local by_title = {}
    for _, sec in ipairs(sections) do by_title[sec.title] = sec end
    local jobs_sec, queues, locks = by_title["job groups"], by_title["queue subscriptions"],
      by_title["job locks"]
    for _, h in ipairs({ "READY", "SCHEDULED", "RUNNING", "CLAIMED", "FAILED" }) do
      column(jobs_sec, h, true)
    end
    column(jobs_sec, "OLDEST READY")
    column(queues, "SUBSCRIPTION")
    column(queues, "ORDERED")
    column(queues, "PENDING", true)
    column(locks, "HOLDER")
    column(locks, "TOKEN", true)
    column(locks, "RENEWED", true)
    assert.matches(lit(group) .. "%s+0%s+0%s+1%s+3%s+0%s", out)
    assert.matches(lit(queue) .. "%s+a_subscription_named_at_length_as_well", out)
    assert.matches(lit(lock.name) .. "%s+%S", out)
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

  it("--workers logs every 5 s of a graceful stop which children it still waits for",
    function()
    local release = helper.tmpname("release")
    -- each child's stop lasts until the spec has seen the supervisor's line
    local script = helper.write_file(helper.tmpname("slow_stop") .. ".lua", [[
      io.stdout:setvbuf("no")
      local function released()
        local f = io.open(arg[1])
        if f then f:close() end
        return f ~= nil
      end
      pgcoord.on_stop(function()
        while not released() do pgcoord.sleep(0.05) end
      end, "the slow part")
      print("child ready")
      while not pgcoord.stopping() do pgcoord.sleep(0.1) end
    ]])
    local p = helper.start({ "pgcoord-run", "--workers", "2", script, release })
    -- (the supervisor's "child started" and the child's own line are
    -- written by two processes: either may come first)
    local pids = helper.wait_until(function()
      local out = p:output()
      local _, n = out:gsub("child ready", "")
      local found = {}
      for pid, slot in out:gmatch('msg="child started" pid=(%d+) slot=(%d)') do
        found[tonumber(slot)] = pid
      end
      return n >= 2 and found[1] and found[2] and found
    end, 15, "two children")
    p:kill("TERM")
    local line = helper.wait_until(function()
      return p:output():match('[^\n]* msg="stop waiting" children=2[^\n]*')
    end, 15, "the supervisor's stop waiting line")
    helper.write_file(release, "")
    assert.are.equal(0, p:wait(20), p:output())
    assert.matches(('^time=%%S+ level=info msg="stop waiting" children=2 elapsed=%%d+%%.%%d'
      .. ' kill_in=%%d+%%.%%d pids="%s %s" slots="1 2"$'):format(pids[1], pids[2]), line)
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

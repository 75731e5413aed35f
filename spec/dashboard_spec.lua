-- The dashboard over plain HTTP (curl): pages, headers, escaping, bad
-- input, authentication, CSRF, and what each action does to the database.
-- (spec/browser_spec.lua drives the same pages in a real browser.)
local pgcoord = require "pgcoord"
local helper = require "helper"

local db
local fixture = helper.started()
local TOKEN = "spec-token-" .. helper.unique("t")

-- One request through curl in a child process (the loop runs meanwhile):
-- code, headers (lower-case names), body.  opts: headers, form (a list
-- of { name, value }, sent form-encoded), raw (the body as is).
local function request(port, method, path, opts)
  opts = opts or {}
  local argv = { "curl", "-s", "-m", "10", "-i", "-X", method }
  for k, v in pairs(opts.headers or {}) do
    argv[#argv + 1] = "-H"
    argv[#argv + 1] = k .. ": " .. v
  end
  for _, f in ipairs(opts.form or {}) do
    argv[#argv + 1] = "--data-urlencode"
    argv[#argv + 1] = f[1] .. "=" .. tostring(f[2])
  end
  argv[#argv + 1] = ("http://127.0.0.1:%d%s"):format(port, path)
  local _, out = helper.run(argv)
  local head, body = out:match("^(.-)\r\n\r\n(.*)$")
  assert(head, "no HTTP answer: " .. out)
  local code = tonumber(head:match("^HTTP/1%.1 (%d+)"))
  local h = {}
  for k, v in head:gmatch("\r\n([^:\r\n]+): ([^\r\n]*)") do h[k:lower()] = v end
  return code, h, body
end

local function get(port, path, opts) return request(port, "GET", path, opts) end

local function bearer() return { Authorization = "Bearer " .. TOKEN } end

-- The CSRF field of a page this server rendered.
local function csrf(port)
  local _, _, body = get(port, "/login")
  return assert(body:match('name="csrf" value="(%x+)"'), "no CSRF field on /login")
end

local function serve(opts, address)
  opts.db = opts.db or db
  local server = pgcoord.http.serve(address or "127.0.0.1:0", opts)
  finally(function() server:stop(5) end)
  return server, server.port
end

local function state_of(id)
  local row = db:one("SELECT state FROM pgcoord.jobs WHERE id = $1", id)
  return row and row.state
end

-- A job inserted as it is once its retries ran out.
local function failed_job(group, params)
  return db:one([[INSERT INTO pgcoord.jobs (group_name, type, state, params, error_count,
      last_error) VALUES ($1, 'work', 'failed', $2, 3, 'boom') RETURNING id]], group, params).id
end

setup(function()
  db = helper.connect({ size = 4 })
  pgcoord.migrate(db)
end)

teardown(function()
  fixture:stop()
  helper.cleanup()
end)

describe("the dashboard", function()
  it("serves every page with its security headers, a <script> in params shown as text",
    function()
      local group = helper.unique("g") .. [[ "quoted" ünï]]
      local id = failed_job(group, { note = "<script>alert(1)</script>" })
      db:exec([[INSERT INTO pgcoord.job_runs (job_id, group_name, type, attempt, ok, error,
          started_at, finished_at) VALUES ($1, $2, 'work', 1, false, '<b>boom</b>',
          now() - interval '2 s', now() - interval '1 s')]], id, group)
      local lock, periodic = helper.unique("lock"), helper.unique("nightly")
      db:exec([[INSERT INTO pgcoord.job_locks (name, holder, token, acquired_at, renewed_at)
        VALUES ($1, 'host:1:<x>', 42, now() - interval '90 s', now())]], lock)
      db:exec([[INSERT INTO pgcoord.job_periodic (name, spec, group_name, type, next_slot)
        VALUES ($1, '@daily', $2, 'work', '2031-01-02 00:00:00+00')]], periodic, group)
      local _, port = serve({ token = TOKEN })
      local enc = group:gsub("[^%w]", function(c) return ("%%%02X"):format(c:byte()) end)
      for _, path in ipairs({ "/", "/group?name=" .. enc, "/jobs?group=" .. enc .. "&state=failed",
                              "/jobs/" .. id, "/periodic", "/login" }) do
        local code, h, body = get(port, path)
        assert.are.equal(200, code, path .. ": " .. body)
        assert.are.equal("default-src 'self'", h["content-security-policy"], path)
        assert.are.equal("DENY", h["x-frame-options"], path)
        assert.are.equal("nosniff", h["x-content-type-options"], path)
        assert.matches("^text/html; charset=utf%-8", h["content-type"], path)
        assert.is_nil(body:find("<script>alert", 1, true), path)
        assert.is_nil(body:find("<b>boom", 1, true), path)
      end
      local _, _, overview = get(port, "/")
      assert.matches("&quot;quoted&quot; ünï", overview, 1, true)
      assert.matches(("<tr><td>%s</td><td>host:1:&lt;x&gt;</td><td class=\"num\">42</td>"
        .. "<td>9%%d%%.%%ds</td>"):format(lock), overview)
      local _, _, schedules = get(port, "/periodic")
      assert.matches(("<tr><td>%s</td><td>@daily</td>.-<td>2031%%-01%%-02 00:00:00Z</td>")
        :format(periodic), schedules)
      local _, _, page = get(port, "/jobs/" .. id)
      assert.matches("&lt;script&gt;alert(1)&lt;/script&gt;", page, 1, true)
      assert.matches("&lt;b&gt;boom&lt;/b&gt;", page, 1, true)
      local _, _, chart = get(port, "/group?name=" .. enc)
      assert.matches('<polyline class="failed"', chart, 1, true)
      local code, h = get(port, "/static/dashboard.css")
      assert.are.equal(200, code)
      assert.matches("^text/css", h["content-type"])
      assert.are.equal(200, (get(port, "/static/dashboard.js")))
      -- /metrics and /healthz carry the headers too
      code, h = get(port, "/healthz")
      assert.are.equal(200, code)
      assert.are.equal("nosniff", h["x-content-type-options"])
    end)

  it("pages jobs by keyset and filters them by type, in each state's order", function()
    local group = helper.unique("g")
    -- (run_at ties, priorities that repeat: the cursor carries the id too)
    db:exec([[INSERT INTO pgcoord.jobs (group_name, type, state, priority, run_at)
      SELECT $1, CASE WHEN g % 2 = 0 THEN 'even' ELSE 'odd' END, s, g % 3,
             now() + (g % 7) * interval '1.000001 s'
        FROM generate_series(1, 120) g, unnest(ARRAY['ready', 'scheduled', 'failed']) s]], group)
    local _, port = serve({})
    for _, state in ipairs({ "ready", "scheduled", "failed" }) do
      local seen, after, pages = {}, nil, 0
      repeat
        local code, _, body = get(port, "/jobs?group=" .. group .. "&state=" .. state
          .. "&type=even" .. (after and ("&after=" .. after) or ""))
        assert.are.equal(200, code, body)
        for id in body:gmatch('<a href="/jobs/(%d+)">') do
          assert.is_nil(seen[id], "a job on two pages")
          seen[id] = true
        end
        after = body:match('id="next%-page" href="[^"]*after=([^"]+)"')
        pages = pages + 1
      until not after
      local n = 0
      for _ in pairs(seen) do n = n + 1 end
      assert.are.equal(60, n, state)
      assert.are.equal(2, pages, state)
    end
  end)

  it("reads pgcoord.jobs, job_runs and failed outbox messages only through indexes, in every"
    .. " statement", function()
    local sql = require "pgcoord.dashboard.sql"
    local group = helper.unique("g")
    local statements = {
      { sql.GROUPS, { 100, 1000 } }, { sql.GROUP, { group, sql.CAP } }, { sql.CHART, { group } },
    }
    for _, state in ipairs(sql.STATES) do
      statements[#statements + 1] = { sql.LIST[state], { group, "t", 1, 1, 51 } }
      statements[#statements + 1] = { sql.LIST[state], { group, pgcoord.null, pgcoord.null,
        pgcoord.null, 51 } }
    end
    -- with sequential scans priced out, a plan still scans only where no
    -- index can serve
    local one = helper.connect({ size = 1 })
    one:exec("SET enable_seqscan = off")
    local function explain(s)
      local plan = {}
      for i, r in ipairs(one:query("EXPLAIN " .. s[1], table.unpack(s[2]))) do
        plan[i] = r["QUERY PLAN"]
      end
      return table.concat(plan, "\n")
    end
    for _, s in ipairs(statements) do
      local plan = explain(s)
      assert.is_nil(plan:find("Seq Scan on jobs", 1, true), plan)
      assert.is_nil(plan:find("Seq Scan on job_runs", 1, true), plan)
    end
    -- the failed outbox messages, listed and counted: each through its
    -- partial index, no row filtered (an index of all rows would read past
    -- the processed ones)
    local ob = pgcoord.outbox(db, { table = helper.unique("dash_outbox") })
    ob:migrate()
    for _, s in ipairs({ { sql.outbox_counts(ob.quoted), { sql.CAP } },
      { ob.sql.failed_list, { 50 } } }) do
      local plan = explain(s)
      assert.is_nil(plan:find("Seq Scan", 1, true), plan)
      assert.is_nil(plan:find("Filter:", 1, true), plan)
    end
    one:close()
  end)

  it("answers bad input with a clear page and the right status, never a 500", function()
    local group = helper.unique("g")
    local id = failed_job(group)
    local _, port = serve({ token = TOKEN })
    local cases = {
      { "GET", "/jobs/abc", 400 }, { "GET", "/jobs/-1", 400 },
      { "GET", "/jobs/99999999999999999999", 400 }, { "GET", "/jobs/987654321", 404 },
      { "GET", "/nope", 404 }, { "GET", "/group?name=" .. helper.unique("none"), 404 },
      { "GET", "/group", 400 }, { "GET", "/jobs?group=" .. group .. "&state=bogus", 400 },
      { "GET", "/jobs?group=" .. group .. "&state=failed&after=x", 400 },
      { "GET", "/group?name=%zz", 400 }, { "GET", "/group?name=%FF", 400 },
      { "GET", "/?" .. ("x"):rep(5000), 413 }, { "GET", "/?" .. ("x"):rep(12000), 413 },
      { "GET", "/queues/dead?queue=nope&subscription=nope", 404 },
      { "GET", "/outbox/failed?table=pg_authid", 404 },
      { "DELETE", "/", 405 }, { "POST", "/periodic", 405 }, { "GET", "/logout", 404 },
      { "PUT", "/jobs/" .. id, 405 }, { "DELETE", "/login", 405 },
    }
    for _, c in ipairs(cases) do
      local code, h, body = request(port, c[1], c[2])
      assert.are.equal(c[3], code, c[1] .. " " .. c[2] .. ": " .. body)
      assert.matches("^text/html", h["content-type"], c[2])
      assert.is_nil(body:lower():find("traceback", 1, true), c[2])
      assert.is_nil(body:find("%.lua:%d+"), c[2])
    end
    -- a body over 64 kB: evhttp's own 413
    assert.are.equal(413, (request(port, "POST", "/group",
      { headers = bearer(), form = { { "name", ("x"):rep(70000) } } })))
    -- an action on an unknown job, or with an unknown action
    local form = { { "csrf", csrf(port) }, { "action", "retry" } }
    assert.are.equal(404, (request(port, "POST", "/jobs/987654321",
      { headers = bearer(), form = form })))
    assert.are.equal(400, (request(port, "POST", "/jobs/" .. id,
      { headers = bearer(), form = { form[1], { "action", "explode" } } })))
    assert.are.equal("failed", state_of(id))
  end)

  it("needs the token and a valid CSRF field for an action; without, nothing changes",
    function()
      local group = helper.unique("g")
      local id = failed_job(group)
      local _, port = serve({ token = TOKEN })
      local field = csrf(port)
      local retry = { { "csrf", field }, { "action", "retry" } }
      -- no token
      local code = request(port, "POST", "/jobs/" .. id, { form = retry })
      assert.are.equal(401, code)
      code = request(port, "POST", "/jobs/" .. id,
        { form = retry, headers = { Authorization = "Bearer wrong" } })
      assert.are.equal(401, code)
      -- no CSRF field, a stale one
      code = request(port, "POST", "/jobs/" .. id,
        { form = { { "action", "retry" } }, headers = bearer() })
      assert.are.equal(403, code)
      code = request(port, "POST", "/jobs/" .. id,
        { form = { { "csrf", ("0"):rep(32) }, { "action", "retry" } }, headers = bearer() })
      assert.are.equal(403, code)
      assert.are.equal("failed", state_of(id))
      -- a page of another server (another process) has another CSRF field
      local _, other = serve({ token = TOKEN })
      code = request(other, "POST", "/jobs/" .. id, { form = retry, headers = bearer() })
      assert.are.equal(403, code)
      assert.are.equal("failed", state_of(id))
      -- the login form sets an HttpOnly, SameSite=Strict cookie that acts
      local h
      code, h = request(port, "POST", "/login",
        { form = { { "csrf", field }, { "token", "no" } } })
      assert.are.equal(403, code)
      assert.is_nil(h["set-cookie"])
      code, h = request(port, "POST", "/login",
        { form = { { "csrf", field }, { "token", TOKEN } } })
      assert.are.equal(303, code)
      local cookie = h["set-cookie"]
      assert.matches("HttpOnly", cookie, 1, true)
      assert.matches("SameSite=Strict", cookie, 1, true)
      code, h = request(port, "POST", "/jobs/" .. id,
        { form = retry, headers = { Cookie = cookie:match("^[^;]+") } })
      assert.are.equal(303, code)
      assert.are.equal("/jobs/" .. id, h.location)
      assert.are.equal("ready", state_of(id))
      -- the notice comes back in a cookie, shown once, never from the URL
      local notice = h["set-cookie"]:match("^(pgcoord_notice=[^;]+)")
      assert.are.equal("pgcoord_notice=job%20" .. id .. "%20retried", notice)
      local _, shown, body = get(port, h.location, { headers = { Cookie = notice } })
      assert.matches('<p class="notice" id="notice">job ' .. id .. " retried</p>", body, 1, true)
      assert.matches("^pgcoord_notice=; .*Max%-Age=0", shown["set-cookie"])
      _, _, body = get(port, h.location .. "?notice=forged")
      assert.is_nil(body:find("forged", 1, true))
    end)

  it("without a token: no actions; off loopback: pages need the token, none without one",
    function()
      local group = helper.unique("g")
      local id = failed_job(group)
      local _, open = serve({})
      assert.are.equal(200, (get(open, "/")))
      local code = request(open, "POST", "/jobs/" .. id,
        { form = { { "csrf", ("0"):rep(32) }, { "action", "retry" } } })
      assert.are.equal(403, code)
      assert.are.equal("failed", state_of(id))
      -- every interface, no token: no dashboard, /metrics and /healthz still
      local _, bare = serve({}, "0.0.0.0:0")
      assert.are.equal(404, (get(bare, "/")))
      assert.are.equal(404, (get(bare, "/jobs/" .. id)))
      assert.are.equal(200, (get(bare, "/metrics")))
      assert.are.equal(200, (get(bare, "/healthz")))
      -- every interface with a token: pages need it
      local _, guarded = serve({ token = TOKEN }, "0.0.0.0:0")
      assert.are.equal(401, (get(guarded, "/")))
      assert.are.equal(401, (get(guarded, "/jobs/" .. id)))
      assert.are.equal(200, (get(guarded, "/", { headers = bearer() })))
      assert.are.equal(200, (get(guarded, "/login")))
      assert.are.equal(200, (get(guarded, "/static/dashboard.css")))
    end)

  it("says what to do on a database without the schema, and holds a page on ?refresh=0",
    function()
      local bare = helper.connect({ size = 2 }, helper.conninfo_for(helper.create_database("dash")))
      local _, port = serve({ db = bare })
      local code, _, body = get(port, "/")
      assert.are.equal(200, code)
      assert.matches("no pgcoord.jobs table: run pgcoord-run --migrate", body, 1, true)
      assert.matches('data-refresh="5"', body, 1, true)
      code, _, body = get(port, "/jobs?group=g&state=ready")
      assert.are.equal(503, code)
      assert.matches("the pgcoord schema is missing: run pgcoord-run --migrate", body, 1, true)
      _, _, body = get(port, "/?refresh=0")
      assert.matches('data-refresh=""', body, 1, true)
      bare:close()
    end)

  it("pgcoord-run takes the token from --http-token, else PGCOORD_HTTP_TOKEN", function()
    local group = helper.unique("g")
    local id = failed_job(group)
    local idle = "while not pgcoord.stopping() do pgcoord.sleep(0.1) end"
    local function started(argv, env)
      local p = helper.start(argv, { env = env })
      local out = p:wait_output("http endpoint listening", 10)
      return p, tonumber(out:match("address=[%d%.]+:(%d+)"))
    end
    local function retry(port, token)
      return (request(port, "POST", "/jobs/" .. id,
        { headers = { Authorization = "Bearer " .. token },
          form = { { "csrf", csrf(port) }, { "action", "retry" } } }))
    end
    local p, port = started({ "pgcoord-run", "--http", "127.0.0.1:0", "--http-token", "flag-token",
      "-e", idle }, { PGCOORD_HTTP_TOKEN = TOKEN })
    assert.are.equal(401, retry(port, TOKEN))
    assert.are.equal("failed", state_of(id))
    assert.are.equal(303, retry(port, "flag-token"))
    assert.are.equal("ready", state_of(id))
    p:kill("TERM")
    assert.are.equal(0, p:wait(15))
    db:exec("UPDATE pgcoord.jobs SET state = 'failed' WHERE id = $1", id)
    p, port = started({ "pgcoord-run", "--http", "127.0.0.1:0", "-e", idle },
      { PGCOORD_HTTP_TOKEN = TOKEN })
    assert.are.equal(303, retry(port, TOKEN))
    assert.are.equal("ready", state_of(id))
    p:kill("TERM")
    assert.are.equal(0, p:wait(15))
  end)

  it("changes the database as each action says", function()
    local group = helper.unique("g")
    local _, port = serve({ token = TOKEN, outbox_tables = { "outbox_messages" } })
    local field = csrf(port)
    local function act(path, fields)
      local form = { { "csrf", field } }
      for _, f in ipairs(fields) do form[#form + 1] = f end
      local code, h, body = request(port, "POST", path, { headers = bearer(), form = form })
      assert.are.equal(303, code, body)
      return h.location, h["set-cookie"]
    end
    -- retry, cancel, delete one job
    local a, b = failed_job(group), failed_job(group)
    act("/jobs/" .. a, { { "action", "retry" } })
    assert.are.equal("ready", state_of(a))
    act("/jobs/" .. a, { { "action", "cancel" } })
    assert.are.equal("cancelled", state_of(a))
    local back = act("/jobs/" .. a, { { "action", "delete" } })
    assert.is_nil(state_of(a))
    assert.matches("^/jobs%?group=", back)
    -- retry all failed of a group (the other group's stay failed)
    local c = failed_job(group)
    local elsewhere = failed_job(helper.unique("g"))
    local _, notice = act("/group", { { "name", group }, { "action", "retry-failed" } })
    assert.matches("pgcoord_notice=2%20failed%20jobs", notice, 1, true)
    assert.are.equal("ready", state_of(b))
    assert.are.equal("ready", state_of(c))
    assert.are.equal("failed", state_of(elsewhere))
    -- pause and resume
    act("/group", { { "name", group }, { "action", "pause" } })
    assert.is_true(db:one("SELECT paused FROM pgcoord.job_groups WHERE name = $1", group).paused)
    local _, _, page = get(port, "/group?name=" .. group)
    assert.matches('id="paused">paused<', page, 1, true)
    act("/group", { { "name", group }, { "action", "resume" } })
    assert.is_false(db:one("SELECT paused FROM pgcoord.job_groups WHERE name = $1", group).paused)
    -- requeue one dead letter, then all
    local qname, sub = helper.unique("q"), "s"
    local q = pgcoord.queue(db, qname)
    q:subscribe(sub)
    for i = 1, 3 do q:publish(db, { n = i }) end
    db:exec([[UPDATE pgcoord.queue_deliveries d SET state = 'dead', last_error = '<i>bad</i>'
      FROM pgcoord.queue_subscriptions s JOIN pgcoord.queues q ON q.id = s.queue_id
     WHERE d.subscription_id = s.id AND q.name = $1]], qname)
    local dead_path = "/queues/dead?queue=" .. qname .. "&subscription=" .. sub
    local code, _, body = get(port, dead_path, { headers = bearer() })
    assert.are.equal(200, code)
    assert.matches("&lt;i&gt;bad&lt;/i&gt;", body, 1, true)
    local first = tonumber(body:match('name="id" value="(%d+)"'))
    act("/queues/dead", { { "queue", qname }, { "subscription", sub }, { "id", first },
                          { "action", "requeue" } })
    assert.are.equal(2, q:stats(sub).dead)
    act("/queues/dead", { { "queue", qname }, { "subscription", sub }, { "action", "requeue" } })
    assert.are.equal(0, q:stats(sub).dead)
    -- retry a failed outbox message
    local ob = pgcoord.outbox(db)
    ob:migrate()
    local mid = ob:save(db, { topic = "t", payload = { x = 1 } })
    db:exec("UPDATE outbox_messages SET status = 'failed', last_error = 'nope' WHERE id = $1", mid)
    code, _, body = get(port, "/outbox/failed?table=outbox_messages")
    assert.are.equal(200, code)
    assert.matches(mid, body, 1, true)
    act("/outbox/failed", { { "table", "outbox_messages" }, { "id", mid }, { "action", "retry" } })
    assert.are.equal("pending",
      db:one("SELECT status FROM outbox_messages WHERE id = $1", mid).status)
  end)

  it("lets go of a page whose client left, or whose server stopped, while it waited", function()
    local pool, app = helper.connect({ size = 2 })
    local server, port = serve({ db = pool })
    local function waiting_page()
      return helper.wait_until(function()
        return #helper.backends(app) > 0 and helper.admin():one([[SELECT count(*)::int AS n
          FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock']],
          app).n > 0
      end, 10, "the page to wait on the lock")
    end
    -- the overview reads pgcoord.job_locks: a lock on it holds the page
    local blocker = helper.connect({ size = 1 })
    blocker:tx(function(tx)
      tx:exec("LOCK TABLE pgcoord.job_locks IN ACCESS EXCLUSIVE MODE")
      local _, out = helper.run({ "curl", "-s", "-m", "1", "-o", "/dev/null", "-w", "%{http_code}",
        ("http://127.0.0.1:%d/"):format(port) })
      assert.are.equal("000", out) -- curl gave up
      waiting_page()
    end)
    -- the page was answered to nobody; the server goes on
    helper.wait_until(function() return server.server:stats().open == 0 end, 10,
      "the connection to close")
    assert.are.equal(200, (get(port, "/")))
    -- a server stopped under a waiting page
    local curl
    blocker:tx(function(tx)
      tx:exec("LOCK TABLE pgcoord.job_locks IN ACCESS EXCLUSIVE MODE")
      curl = helper.start({ "curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
        ("http://127.0.0.1:%d/"):format(port) })
      waiting_page()
      server:stop(0)
    end)
    curl:wait(15)
    assert.are.equal("000", curl:output())
    helper.wait_until(function() return #helper.backends(app) == 0 or
      helper.admin():one([[SELECT count(*)::int AS n FROM pg_stat_activity
        WHERE application_name = $1 AND state = 'active']], app).n == 0 end, 10,
      "the page's query to end")
    pool:close()
    blocker:close()
  end)

  it("shows this process's subscribers: channels, reconnects, the last ping's age", function()
    local sub = fixture:own(pgcoord.subscriber(db, { ping_interval = 0.2 }))
    local channel = helper.unique("ch")
    sub:channel(channel)
    sub:start()
    helper.wait_until(function() return sub:stats().last_ping_age end, 10, "a ping to come back")
    local _, port = serve({})
    local _, _, body = get(port, "/")
    local rows = body:match('<table id="subscribers">.-</table>')
    local row = rows:match("<tr><td>subscriber%d+</td><td>running</td><td>[^<]*" .. channel
      .. "[^<]*</td>.-</tr>")
    assert(row, rows)
    assert.matches('<td class="num">0</td><td>[%d%.]+s ago</td>', row)
  end)

  it("answers its pages while workers run jobs", function()
    local group = helper.unique("g")
    local jobs = pgcoord.jobs(db)
    local done = 0
    jobs:define("work", function(job)
      pgcoord.sleep(job.params.sleep)
      done = done + 1
    end, { group = group })
    local list = {}
    for i = 1, 200 do list[i] = { type = "work", params = { sleep = 0.005 * (i % 4) } } end
    jobs:schedule_many(db, list)
    local _, port = serve({ token = TOKEN })
    fixture:worker(jobs, { group = group, concurrency = 8, poll_interval = 0.2, flush_age = 0.05 })
    local answered = 0
    helper.wait_until(function()
      for _, path in ipairs({ "/", "/group?name=" .. group, "/jobs?group=" .. group
                              .. "&state=ready" }) do
        local code, _, body = get(port, path)
        assert.are.equal(200, code, path .. ": " .. body)
        answered = answered + 1
      end
      return done == 200
    end, 60, "the jobs to run")
    assert.is_true(answered >= 3)
    local _, _, overview = get(port, "/")
    local subscribers = overview:match('<table id="subscribers">.-</table>')
    assert.matches("<td>[^<]*pgcoord_jobs[^<]*</td>", subscribers)
    helper.wait_until(function()
      return db:one("SELECT count(*)::int AS n FROM pgcoord.job_runs WHERE group_name = $1",
        group).n == 200
    end, 20, "the runs to be logged")
    -- every job done and no worker left: the group's page still charts them
    fixture:stop()
    assert.are.equal(0,
      db:one("SELECT count(*)::int AS n FROM pgcoord.job_workers WHERE group_name = $1", group).n)
    local code, _, body = get(port, "/group?name=" .. group)
    assert.are.equal(200, code, body)
    local completed = body:match('<polyline class="completed" points="([^"]+)"')
    local above = 0 -- points above the baseline (y = 122): minutes with runs
    for y in completed:gmatch(",([%d%.]+)") do
      if tonumber(y) < 122 then above = above + 1 end
    end
    assert.is_true(above >= 1, completed)
  end)
end)

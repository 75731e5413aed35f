-- The dashboard in a real browser: Debian's headless chromium, driven
-- through the DevTools protocol (spec/tools/browser.lua), against a real
-- `pgcoord-run --http`.  Pending, saying so, where chromium is not
-- installed (scripts/install-deps installs it).
local pgcoord = require "pgcoord"
local helper = require "helper"
local browser = require "tools.browser"

local SCREENSHOTS = helper.root .. "/build/screenshots"
local BROWSER_LOG = helper.root .. "/build/chromium.log" -- kept after a failed run

-- A running pgcoord-run --http on a free loopback port, and its base URL.
local function serve(argv_tail)
  local argv = { "pgcoord-run", "--http", "127.0.0.1:0" }
  for _, a in ipairs(argv_tail) do argv[#argv + 1] = a end
  local p = helper.start(argv)
  local out = p:wait_output("http endpoint listening", 10)
  return p, ("http://127.0.0.1:%d"):format(tonumber(out:match("address=[%d%.]+:(%d+)")))
end

-- Runs fn(b) with a started browser, which is closed afterwards, also
-- when fn fails; pending when chromium is absent.
local function with_browser(fn, opts)
  if not browser.path() then
    pending("chromium is not installed (scripts/install-deps installs it)")
    return
  end
  opts = opts or {}
  opts.log = BROWSER_LOG
  local b = browser.start(opts)
  local ok, err = xpcall(fn, debug.traceback, b)
  b:close()
  if not ok then error(err, 0) end
end

describe("the browser driver (spec/tools/browser.lua)", function()
  after_each(helper.cleanup)

  it("loads a page, evaluates JS, clicks and writes a PNG screenshot", function()
    with_browser(function(b)
      local _, base = serve({ "-e", "pgcoord.sleep(300)" })
      local page = b:open(base .. "/healthz")
      assert.are.equal("ok", page:eval("document.body.innerText.trim()"))
      assert.are.same({ 1, 2 }, page:eval("[1, 2]"))
      -- (a listener, not an onclick attribute: the page's CSP forbids inline script)
      page:eval([[document.body.innerHTML = '<button id="b">press</button>';
        document.getElementById('b').addEventListener('click',
          () => { window.clicked = (window.clicked || 0) + 1; })]])
      page:click("#b")
      assert.are.equal(1, page:wait_for("window.clicked", 5, "the click"))
      local err = helper.error_of(page.click, page, "#missing")
      assert.matches("no element matches #missing", err, 1, true)
      local path = SCREENSHOTS .. "/driver-healthz.png"
      assert.is_true(page:screenshot(path) > 100)
      assert.are.equal("\137PNG\r\n\26\n", helper.read_file(path):sub(1, 8))
      assert.matches("timed out after 0.2s waiting for never",
        helper.error_of(page.wait_for, page, "false", 0.2, "never"), 1, true)
    end, { width = 400, height = 300 })
  end)

  it("reports console errors, exceptions and failed requests", function()
    with_browser(function(b)
      local _, base = serve({ "-e", "pgcoord.sleep(300)" })
      local page = b:open(base .. "/healthz")
      local before = #page:problems()
      page:eval("console.error('spec says', 42)")
      page:eval("setTimeout(() => { throw new Error('thrown later') }, 0)")
      page:eval("fetch('/no-such-page').catch(() => {})")
      local found = b:wait(function()
        local text = table.concat(page:problems(), "\n", before + 1)
        return text:find("thrown later", 1, true) and text:find("/no-such-page", 1, true)
          and text:find("spec says 42", 1, true) and text
      end, 10, "the page's problems to be reported")
      assert.matches("console.error: spec says 42", found, 1, true)
      assert.matches("exception: Error: thrown later", found, 1, true)
      assert.matches("HTTP 404: " .. base .. "/no-such-page", found, 1, true)
      local err = helper.error_of(page.navigate, page, "http://127.0.0.1:9/")
      assert.matches("cannot load http://127.0.0.1:9/", err, 1, true)
    end)
  end)
end)

-- ---- the dashboard ---------------------------------------------------------------

-- The served process: a jobs worker of the group (a "flaky" job fails its
-- first run, then succeeds; "quick" jobs just finish), a periodic
-- schedule, a subscriber, and a held job lock.
local SERVED = [[
local group, service = arg[1], arg[2]
local db = pgcoord.connect(nil, { size = 4 })
local sub = pgcoord.subscriber(db)
sub:start()
local jobs = pgcoord.jobs(db, { subscriber = sub })
local failed_once = {}
jobs:define("flaky", function(job)
  if not failed_once[job.id] then
    failed_once[job.id] = true
    error("the first run fails: " .. tostring(job.params.note))
  end
end, { group = group, retry = { max = 0 } })
jobs:define("quick", function() end, { group = group })
jobs:periodic(group .. "-hourly", "@hourly", "quick", nil, { group = group })
pgcoord.run_in_job_lock(db, service, "leader", {}, function()
  print("lock held")
  pgcoord.sleep(3600)
end)
local w = jobs:worker({ group = group, concurrency = 2, poll_interval = 0.2 })
w:ready()
print("worker ready")
]]

local TOKEN = "spec-token-" .. helper.pid
local PAYLOAD = "<script>window.__xss=1</script>"
local ERROR_PAYLOAD = [[<img src="x" onerror="window.__xss=2">]]

describe("the dashboard in a real browser", function()
  local db, jobs, b, page, base
  local group, service, queue, sub = helper.unique("dash"), helper.unique("svc"),
    helper.unique("q"), helper.unique("sub")
  local flaky_id, xss_id

  -- problems seen so far, each with the page it was seen on
  local seen = 0
  local function new_problems()
    local list, out = page:problems(), {}
    for i = seen + 1, #list do out[#out + 1] = list[i] end
    seen = #list
    return out
  end

  local function load(path)
    page:navigate(base .. path)
    assert.are.same({}, new_problems(), "problems on " .. path)
  end

  -- The text of the element with that id (nil: none).
  local function text(id)
    return page:eval(("document.getElementById(%q)?.textContent"):format(id))
  end

  -- Clicks a form's button and checks the page it leads to: no problems,
  -- and the one-line notice.
  local function press(selector, notice)
    page:click(selector, { navigate = true })
    assert.are.same({}, new_problems(), "problems after pressing " .. selector)
    assert.are.equal(notice, text("notice"), "the notice after pressing " .. selector)
  end

  setup(function()
    if not browser.path() then return end
    local dbname = helper.create_database("browser")
    local conninfo = helper.conninfo_for(dbname)
    db = helper.connect({ size = 2 }, conninfo)
    pgcoord.migrate(db)
    jobs = pgcoord.jobs(db)
    jobs:define("flaky", function() end, { group = group })
    jobs:define("quick", function() end, { group = group })

    local served = helper.write_file(helper.tmpname("served") .. ".lua", SERVED)
    local p
    p, base = serve({ "--db", conninfo, "--http-token", TOKEN, served, group, service })
    p:wait_output("worker ready", 20)
    p:wait_output("lock held", 20)

    -- jobs: a few that complete (for the charts), two that fail
    local quick = {}
    for i = 1, 20 do quick[i] = { type = "quick", params = { n = i }, group = group } end
    jobs:schedule_many(db, quick)
    jobs:schedule(db, "quick", { later = true }, { group = group, run_at = pgcoord.time() + 3600 })
    flaky_id = jobs:schedule(db, "flaky", { note = "retried from the dashboard" },
      { group = group })
    xss_id = jobs:schedule(db, "flaky", { note = PAYLOAD .. " " .. ERROR_PAYLOAD },
      { group = group })
    helper.wait_until(function()
      return db:one([[SELECT count(*)::int AS n FROM pgcoord.jobs
                       WHERE group_name = $1 AND state = 'failed']], group).n == 2
    end, 20, "the two flaky jobs to fail")

    -- a queue subscription with a dead letter
    local q = pgcoord.queue(db, queue)
    q:subscribe(sub)
    q:publish(db, { order = 7, note = PAYLOAD })
    local consumer = q:consume(sub, function() error("refused: " .. ERROR_PAYLOAD) end,
      { max_deliveries = 1, retry_delay = 0.01 })
    helper.wait_until(function() return q:stats(sub).dead == 1 end, 20, "a dead letter")
    consumer:stop()

    -- an outbox (the table the dashboard knows by default) with a failed message
    local ob = pgcoord.outbox(db, { table = "outbox_messages", max_retries = 1 })
    ob:migrate()
    ob:save(db, { topic = "orders", key = "o-1", payload = { n = 1 } })
    ob:save(db, { topic = "orders", key = "o-2", payload = { n = 2 } })
    local claimed = ob:fetch_pending(1)
    ob:mark_failed(claimed[1].id, "broker down: " .. ERROR_PAYLOAD)

    b = browser.start({ width = 1280, height = 900, log = BROWSER_LOG })
    page = b:open(base .. "/login")
    page:type("#login-form input[name=token]", TOKEN)
    page:click("#login-form button[value=login]", { navigate = true })
    assert.are.same({}, new_problems(), "problems logging in")
  end)

  teardown(function()
    if b then b:close() end
    if db then db:close() end
    helper.cleanup()
  end)

  -- pending when chromium is absent; else the test's body, and on its
  -- failure a screenshot of where the page was (build/screenshots/failed.png)
  local function test(name, fn)
    it(name, function()
      if not browser.path() then
        pending("chromium is not installed (scripts/install-deps installs it)")
        return
      end
      local ok, err = pcall(fn)
      if not ok then
        if page then
          pcall(page.screenshot, page, SCREENSHOTS .. "/failed.png", { full_page = true })
        end
        error(err, 0)
      end
    end)
  end

  test("logs in with the token and shows the overview of what is in the database", function()
    load("/")
    assert.matches("^/$", page:eval("location.pathname"))
    -- logged in: a log-out button instead of the log-in link
    assert.is_true(page:eval("!!document.querySelector('#logout-form')"))
    local shown = page:eval("document.querySelector('main').innerText")
    for _, what in ipairs({ group, queue, sub, service .. ":leader", "outbox_messages" }) do
      assert.matches(what, shown, 1, true)
    end
    local failed = page:eval(([[(() => {
      const row = [...document.querySelectorAll('#groups tbody tr')]
        .find(r => r.cells[0].innerText.trim() === %q);
      return row && row.cells[4].innerText.trim();
    })()]]):format(group))
    assert.are.equal("2", failed)
    assert.are.equal(1, page:eval("document.querySelectorAll('#subscribers tbody tr').length"))
  end)

  test("loads every page without console errors or failed requests, with a screenshot of each",
    function()
      local pages = {
        { "overview", "/" },
        { "group", "/group?name=" .. group },
        { "jobs-failed", ("/jobs?group=%s&state=failed"):format(group) },
        { "jobs-scheduled", ("/jobs?group=%s&state=scheduled"):format(group) },
        { "job", "/jobs/" .. xss_id },
        { "periodic", "/periodic" },
        { "dead-letters", ("/queues/dead?queue=%s&subscription=%s"):format(queue, sub) },
        { "outbox-failed", "/outbox/failed?table=outbox_messages" },
        { "login", "/login" },
      }
      for _, p in ipairs(pages) do
        load(p[2])
        assert.are.equal(200, page:eval("performance.getEntriesByType('navigation')[0]"
          .. ".responseStatus"), p[2])
        assert.is_true(page:screenshot(SCREENSHOTS .. "/" .. p[1] .. ".png",
          { full_page = true }) > 1000)
      end
      -- the group's charts are inline SVG, drawn from the runs of the last hour
      load("/group?name=" .. group)
      assert.is_true(page:eval("document.querySelectorAll('svg').length") > 0)
      -- what the pages load after their load event (an icon, say) failed neither
      load("/")
      assert.are.same({}, new_problems(), "problems after the pages loaded")
    end)

  test("shows the <script> payload of params, errors and payloads as text, never running it",
    function()
      for _, path in ipairs({ "/jobs/" .. xss_id, ("/jobs?group=%s&state=failed"):format(group),
                              ("/queues/dead?queue=%s&subscription=%s"):format(queue, sub),
                              "/outbox/failed?table=outbox_messages" }) do
        load(path)
        assert.are.equal("undefined", page:eval("typeof window.__xss"), path)
        -- the page's own script is its only one, and no element came from the payload
        assert.are.equal(1, page:eval("document.scripts.length"), path)
        assert.are.equal(0, page:eval("document.querySelectorAll('main img').length"), path)
      end
      load("/jobs/" .. xss_id)
      assert.matches(PAYLOAD, text("params"), 1, true)
      assert.matches(ERROR_PAYLOAD, text("last-error"), 1, true)
      load(("/queues/dead?queue=%s&subscription=%s"):format(queue, sub))
      assert.matches(PAYLOAD, page:eval("document.getElementById('dead').innerText"), 1, true)
    end)

  test("retries a failed job with its Retry button, and the job completes", function()
    load("/jobs/" .. flaky_id)
    assert.are.equal("failed", text("state"))
    press("#job-actions button[value=retry]", ("job %d retried"):format(flaky_id))
    -- the job page does not reload itself: load it until it says completed
    local deadline = pgcoord.now() + 20
    while true do
      load("/jobs/" .. flaky_id)
      local state = text("state")
      if state == "completed" then break end
      assert(pgcoord.now() < deadline, "timed out after 20s waiting for the retried job to"
        .. " complete; the page says " .. tostring(state))
      b:sleep(0.2)
    end
    local runs = page:eval("[...document.querySelectorAll('#runs tbody tr')]"
      .. ".map(r => r.cells[1].textContent)")
    assert.are.same({ "no", "yes" }, runs)
    page:screenshot(SCREENSHOTS .. "/job-completed.png", { full_page = true })
    assert.is_nil(db:one("SELECT id FROM pgcoord.jobs WHERE id = $1", flaky_id))
  end)

  test("pauses and resumes a group with its buttons", function()
    load("/group?name=" .. group)
    assert.are.equal("running", text("paused"))
    press("#group-actions button[value=pause]", ("group %s paused"):format(group))
    assert.are.equal("paused", text("paused"))
    assert.is_true(jobs:paused(group))
    page:screenshot(SCREENSHOTS .. "/group-paused.png", { full_page = true })
    press("#group-actions button[value=resume]", ("group %s resumed"):format(group))
    assert.are.equal("running", text("paused"))
    assert.is_false(jobs:paused(group))
  end)
end)

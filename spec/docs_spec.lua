-- What the README and --help promise holds: the README stands alone (no
-- file outside the repository, every path it names exists), its
-- quickstart runs as written, it names every public function, and --help
-- names every environment variable the code reads.
local helper = require "helper"

local root = helper.root
local README = assert(helper.read_file(root .. "/README.md"), "README.md")

-- The text under the "## title" heading, up to the next "## " heading.
local function section(title)
  local start = assert(README:find("\n## " .. title .. "\n", 1, true),
    ("README has no section %q"):format(title))
  local stop = README:find("\n## ", start + 1, true)
  return README:sub(start, stop and stop - 1 or #README)
end

-- { { lang = "sh", code = "..." }, ... }: the fenced blocks of text, in order.
local function code_blocks(text)
  local blocks = {}
  for lang, code in text:gmatch("\n```(%w*)\n(.-\n)```") do
    blocks[#blocks + 1] = { lang = lang, code = code }
  end
  return blocks
end

local function mentioned(word)
  return README:find(word .. "%f[^%w_]") ~= nil
end

describe("the README", function()
  after_each(helper.cleanup)

  it("names no file outside the repository, and every path it names exists", function()
    assert.is_nil(README:find("../", 1, true), "a path out of the repository")
    local missing = {}
    for path in README:gmatch("`([%w_.-]+/[%w_./-]*)`") do
      local top = path:match("^([%w_-]+)/")
      local ours = ({ doc = true, examples = true, lua = true, scripts = true, spec = true,
                      sql = true, src = true })[top]
      if ours and not path:find("*", 1, true) and not helper.read_file(root .. "/" .. path)
         and helper.sh("test -d " .. helper.quote(root .. "/" .. path)) ~= 0 then
        missing[#missing + 1] = path
      end
    end
    assert.are.same({}, missing)
  end)

  -- The quickstart's blocks: each ```lua block opens with "-- NAME.lua"
  -- and is saved under that name, the ```sh blocks run in order in that
  -- folder, and a ```text block is what they print (each line, in any
  -- order).  On a database of its own, never migrated.
  describe("quickstart", function()
    local blocks = code_blocks(section("Quickstart"))
    local dir, files, shell, expected = nil, {}, {}, {}
    for _, b in ipairs(blocks) do
      if b.lang == "lua" then
        files[#files + 1] = { name = assert(b.code:match("^%-%- ([%w_]+%.lua)"),
          "a quickstart lua block opens with -- NAME.lua"), code = b.code }
      elseif b.lang == "sh" then
        shell[#shell + 1] = b.code
      elseif b.lang == "text" then
        for line in b.code:gmatch("[^\n]+") do expected[#expected + 1] = line end
      end
    end

    local function setup()
      dir = helper.tmpname("quickstart")
      assert(os.execute("mkdir -p " .. helper.quote(dir)))
      for _, f in ipairs(files) do helper.write_file(dir .. "/" .. f.name, f.code) end
      return { PGDATABASE = helper.create_database("quickstart"),
               PATH = root .. ":" .. os.getenv("PATH") }
    end

    local function assert_printed(out)
      for _, line in ipairs(expected) do assert.is_truthy(out:find(line, 1, true), out) end
    end

    it("has a script, commands and what they print", function()
      assert.is_true(#files >= 1 and #shell >= 1 and #expected >= 1)
    end)

    it("runs as written under pgcoord-run", function()
      local env = setup()
      local code, out = helper.run({ "sh", "-ec", table.concat(shell, "\n") },
        { cwd = dir, env = env, unset = { "PGCOORD_DATABASE_URL", "DATABASE_URL" }, timeout = 60 })
      assert.are.equal(0, code, out)
      assert_printed(out)
    end)

    it("runs under a stock lua5.4 with the require and pgcoord.run() the README adds", function()
      local env = helper.lua_env(setup())
      local code, out = helper.run({ "sh", "-ec", "pgcoord-run --migrate" },
        { cwd = dir, env = env, unset = { "PGCOORD_DATABASE_URL", "DATABASE_URL" } })
      assert.are.equal(0, code, out)
      assert.is_truthy(section("Quickstart"):find(
        'local pgcoord = require "pgcoord"', 1, true), "the README says what to add")
      local script = files[1]
      helper.write_file(dir .. "/stock.lua", 'local pgcoord = require "pgcoord"\n'
        .. script.code .. "pgcoord.run()\n")
      code, out = helper.run({ "lua5.4", "stock.lua" },
        { cwd = dir, env = env, unset = { "PGCOORD_DATABASE_URL", "DATABASE_URL" }, timeout = 60 })
      assert.are.equal(0, code, out)
      assert_printed(out)
    end)
  end)

  it("names every export of pgcoord as pgcoord.NAME", function()
    local pgcoord = require "pgcoord"
    local names = {}
    for name in pairs(pgcoord) do names[#names + 1] = name end
    -- the primitives init.lua loads on first use
    local init = helper.read_file(root .. "/lua/pgcoord/init.lua")
    local lazy = assert(init:match("\nlocal LAZY = (%b{})"), "init.lua's LAZY table")
    for name in lazy:gmatch("\n%s*([%w_]+) = {") do
      assert.is_not_nil(pgcoord[name], name)
      names[#names + 1] = name
    end
    local missing = {}
    for _, name in ipairs(names) do
      if not mentioned("pgcoord%." .. name) then missing[#missing + 1] = "pgcoord." .. name end
    end
    table.sort(missing)
    assert.are.same({}, missing)
  end)

  -- Functions of the modules pgcoord exports that only other modules call.
  local INTERNAL = {
    ["json.try_decode"] = true, ["json.text_problem"] = true, ["json.check_text"] = true,
    ["json.clean_text"] = true, ["json.problem"] = true, ["json.encode_jsonb"] = true,
    ["metrics.track"] = true, ["metrics.each"] = true, ["metrics.collect"] = true,
    ["metrics.render"] = true,
    ["jobs.new"] = true, -- pgcoord.jobs(db) itself
  }

  it("names every function of the modules pgcoord exports as MODULE.NAME", function()
    local pgcoord = require "pgcoord"
    local missing = {}
    for _, module in ipairs({ "log", "json", "http", "metrics", "jobs" }) do
      local t = pgcoord[module]
      if module == "jobs" then t = require "pgcoord.jobs" end
      for name, v in pairs(t) do
        local full = module .. "." .. name
        local exported = pgcoord[name] == v -- pgcoord.retry_at: the test above
        if type(v) == "function" and not INTERNAL[full] and not exported
           and not mentioned(module .. "%." .. name) then
          missing[#missing + 1] = full
        end
      end
    end
    table.sort(missing)
    assert.are.same({}, missing)
  end)

  -- Each class whose objects a user holds: its file, its name in the
  -- source, and the variable the README calls its objects.
  local CLASSES = {
    { "db.lua", "Pool", "db" }, { "db.lua", "Tx", "tx" },
    { "subscriber.lua", "Sub", "sub" },
    { "fanout.lua", "Fan", "fan" }, { "fanout.lua", "Listener", "l" },
    { "joblock.lua", "Lock", "lock" }, { "joblock.lua", "Runner", "runner" },
    { "queue/init.lua", "Queue", "q" }, { "queue/consumer.lua", "Consumer", "c" },
    { "queue/consumer.lua", "Message", "msg" },
    { "jobs/init.lua", "Jobs", "jobs" }, { "jobs/worker.lua", "Worker", "w" },
    { "jobs/periodic.lua", "Scheduler", "s" },
    { "outbox/init.lua", "Outbox", "ob" }, { "outbox/relay.lua", "Relay", "relay" },
    { "outbox/processed.lua", "Processed", "done" }, { "tables.lua", "Cleanup", "cleanup" },
    { "task.lua", "Task", "task" }, { "http.lua", "Server", "server" },
  }

  -- Methods only other modules call.
  local INTERNAL_METHODS = {
    ["db:acquire"] = true, ["db:release"] = true, -- a connection for pgcoord's modules
    ["c:has_room"] = true, ["c:wake"] = true,     -- the queue's wake-ups
    ["s:changed"] = true,                         -- jobs:periodic
    ["w:cancel_jobs"] = true,                     -- jobs:cancel's NOTIFY
  }

  it("names every public method as VAR:NAME", function()
    local missing = {}
    for _, c in ipairs(CLASSES) do
      local file, class, var = c[1], c[2], c[3]
      local src = assert(helper.read_file(root .. "/lua/pgcoord/" .. file), file)
      local methods = {}
      for name in src:gmatch("\nfunction " .. class .. ":([%a][%w_]*)%(") do
        methods[name] = true
      end
      for name in src:gmatch("\n" .. class .. "%.([%a][%w_]*) = " .. class .. "%.") do
        methods[name] = true -- an alias
      end
      assert.is_not_nil(next(methods), ("no methods of %s found in %s"):format(class, file))
      for name in pairs(methods) do
        local full = var .. ":" .. name
        if not INTERNAL_METHODS[full] and not mentioned(full) then missing[#missing + 1] = full end
      end
    end
    table.sort(missing)
    assert.are.same({}, missing)
  end)
end)

describe("pgcoord-run --help and the man page", function()
  after_each(helper.cleanup)

  local MAN = assert(helper.read_file(root .. "/doc/pgcoord-run.1"), "doc/pgcoord-run.1")

  -- The man page's text under ".SH title", up to the next .SH.
  local function man_section(title)
    local start = assert(MAN:find("\n.SH " .. title .. "\n", 1, true), title)
    return MAN:sub(start, (MAN:find("\n.SH ", start + 1, true) or #MAN + 1) - 1)
  end

  it("name every environment variable the code reads", function()
    local code, help = helper.run({ "pgcoord-run", "--help" })
    assert.are.equal(0, code, help)
    local environment = man_section("ENVIRONMENT")
    local vars, missing = {}, {}
    local list = io.popen("cd " .. helper.quote(root) .. " && grep -rhoIE "
      .. [['getenv\("[A-Z_]+"\)' lua src]])
    for var in list:read("a"):gmatch('getenv%("([%w_]+)"%)') do vars[var] = true end
    list:close()
    assert.is_true(vars.PGCOORD_SQL_DIR, "the grep found the variables")
    for var in pairs(vars) do
      if not help:find(var .. "%f[^%w_]") then missing[#missing + 1] = "--help: " .. var end
      if not environment:find(var .. "%f[^%w_]") then missing[#missing + 1] = "man: " .. var end
    end
    table.sort(missing)
    assert.are.same({}, missing)
  end)

  it("the man page names the prompt's keys", function()
    local keys = man_section("THE PROMPT")
    local missing = {}
    for _, key in ipairs({ "Tab", "Up", "Down", "Ctrl%-R", "Ctrl%-C", "Ctrl%-D", "PGCOORD_HISTORY",
                           "editrc" }) do
      if not keys:find(key) then missing[#missing + 1] = key end
    end
    assert.are.same({}, missing)
  end)
end)

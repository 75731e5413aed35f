-- Shared helpers for the specs: connection strings, unique names, polling
-- waits, background processes, a misbehaving TCP relay and the test
-- cluster's pg_ctl.  Specs run against a real PostgreSQL server (see
-- scripts/pg-tmp); nothing here mocks it.
local pgcoord = require "pgcoord"

local helper = {}

-- ---- paths and shell ---------------------------------------------------------

local function command_output(cmd)
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("a")
  p:close()
  return out
end

helper.root = (os.getenv("PGCOORD_ROOT") or command_output("pwd")):gsub("%s+$", "")
helper.run_bin = helper.root .. "/pgcoord-run"
helper.relay_bin = helper.root .. "/build/tcp-relay"

-- Single quotes a word for sh.
function helper.quote(s)
  s = tostring(s)
  if s:match("^[%w%-%./_=:,@+]+$") then return s end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function sh(cmd)
  local ok, how, code = os.execute(cmd)
  if ok then return 0 end
  return how == "exit" and code or 128 + code
end
helper.sh = sh

function helper.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

function helper.write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return path
end

-- ---- unique names --------------------------------------------------------------

local function own_pid()
  local stat = helper.read_file("/proc/self/stat")
  return stat and stat:match("^(%d+)") or tostring(os.time())
end
helper.pid = own_pid()

-- The counter lives in the registry: busted loads this module again for
-- each spec file (insulation), and a counter that started again at 0 gave
-- a later file the names, and so the rows, of an earlier one.
local registry = debug.getregistry()

-- A name no other test (or concurrent run) uses: a valid SQL identifier.
function helper.unique(prefix)
  registry.pgcoord_spec_unique = (registry.pgcoord_spec_unique or 0) + 1
  return ("%s_%s_%d"):format(prefix or "t", helper.pid, registry.pgcoord_spec_unique):lower()
end

local tmpdir

-- A scratch directory for the current test, removed by helper.cleanup.
function helper.tmpdir()
  if not tmpdir then
    tmpdir = command_output("mktemp -d /tmp/pgcoord-spec.XXXXXX"):gsub("%s+$", "")
  end
  return tmpdir
end

-- A fresh file name in the scratch directory.
function helper.tmpname(prefix)
  return helper.tmpdir() .. "/" .. helper.unique(prefix or "f")
end

-- ---- waiting -------------------------------------------------------------------

-- Polls fn() (while the loop runs) until it returns a true value, which is
-- returned; raises after timeout seconds, naming `what`.
function helper.wait_until(fn, timeout, what)
  timeout = timeout or 10
  local deadline = pgcoord.now() + timeout
  local step = 0.005
  while true do
    local v = fn()
    if v then return v end
    if pgcoord.now() > deadline then
      error(("timed out after %gs waiting for %s"):format(timeout, what or "a condition"), 2)
    end
    pgcoord.sleep(step)
    if step < 0.05 then step = step * 2 end
  end
end

-- Runs fn and returns its elapsed time (monotonic) and its results.
function helper.timed(fn, ...)
  local t0 = pgcoord.now()
  local r = table.pack(fn(...))
  return pgcoord.now() - t0, table.unpack(r, 1, r.n)
end

-- pcall that returns the error object (false, err) or (true, ...).
function helper.catch(fn, ...)
  return pcall(fn, ...)
end

-- ---- databases -------------------------------------------------------------------

-- A TCP URI to the test server (with its password).
function helper.tcp_dsn()
  local dsn = os.getenv("PGCOORD_TEST_TCP_DSN")
  if dsn and dsn ~= "" then return dsn end
  local user = os.getenv("PGUSER") or os.getenv("USER") or "postgres"
  local pw = os.getenv("PGPASSWORD")
  local port = os.getenv("PGPORT") or "5432"
  local dbname = os.getenv("PGDATABASE") or user
  return ("postgresql://%s%s@127.0.0.1:%s/%s"):format(user, pw and (":" .. pw) or "", port, dbname)
end

-- host, port (number), user, password, dbname of the TCP URI.
function helper.tcp_parts()
  local user, pw, host, port, dbname =
    helper.tcp_dsn():match("^%w+://([^:@/]*):?([^@/]*)@([^:/]+):(%d+)/([^?]*)")
  return { user = user, password = pw, host = host, port = tonumber(port), dbname = dbname }
end

-- conninfo for the default server (PG* environment) with another database.
function helper.conninfo_for(dbname)
  return "dbname=" .. dbname
end

-- A pool whose connections carry a unique application_name (returned too).
function helper.connect(opts, conninfo)
  opts = opts or {}
  local params = {}
  for k, v in pairs(opts.params or {}) do params[k] = v end
  params.application_name = params.application_name or helper.unique("app")
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.params = params
  return pgcoord.connect(conninfo, o), params.application_name
end

-- The database's clock (epoch seconds) through a pool or transaction:
-- what job times are compared with.
function helper.db_time(db)
  return db:one("SELECT extract(epoch FROM clock_timestamp())::float8 AS t").t
end

local admin

-- A small pool for watching the server (pg_stat_activity and the like).
function helper.admin()
  if not admin then
    admin = pgcoord.connect(nil, { size = 2, params = { application_name = "pgcoord_spec_admin" } })
  end
  return admin
end

-- Backends (rows of pg_stat_activity) of an application_name.
function helper.backends(app)
  return helper.admin():query(
    "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid", app)
end

-- A fresh database (dropped by helper.cleanup); returns its name.
local databases = {}
function helper.create_database(prefix)
  local name = helper.unique(prefix or "db")
  helper.admin():exec(('CREATE DATABASE "%s"'):format(name))
  databases[#databases + 1] = name
  return name
end

-- ---- processes ---------------------------------------------------------------------

local processes = {}
local Process = {}
Process.__index = Process

-- Starts argv (a table; "pgcoord-run" means the build's binary) in the
-- background through sh, stdout and stderr to one file.  opts:
--   env = { NAME = value }, unset = { NAME, ... }, stdin = path, cwd = dir
function helper.start(argv, opts)
  opts = opts or {}
  local dir = helper.tmpname("proc")
  assert(os.execute("mkdir -p " .. helper.quote(dir)))
  local words = { "env" }
  for _, name in ipairs(opts.unset or {}) do
    words[#words + 1] = "-u"
    words[#words + 1] = helper.quote(name)
  end
  for k, v in pairs(opts.env or {}) do words[#words + 1] = helper.quote(k .. "=" .. v) end
  local lua_preload = os.getenv("PGCOORD_TEST_LUA_PRELOAD")
  if argv[1] == "lua5.4" and lua_preload and lua_preload ~= "" then
    -- under SANITIZE=address, core.so needs the ASan runtime loaded first
    words[#words + 1] = helper.quote("LD_PRELOAD=" .. lua_preload)
  end
  for i, a in ipairs(argv) do
    if i == 1 and a == "pgcoord-run" then a = helper.run_bin end
    words[#words + 1] = helper.quote(a)
  end
  local stdin = opts.stdin and helper.quote(opts.stdin) or "/dev/null"
  -- The wrapper records the child's pid and, once it ends, its status.
  local script = ('cd %s && { %s <%s >%s/out 2>&1 & echo $! >%s/pid.tmp; mv %s/pid.tmp %s/pid; '
    .. 'wait $!; echo $? >%s/rc.tmp; mv %s/rc.tmp %s/rc; }')
    :format(helper.quote(opts.cwd or helper.root), table.concat(words, " "), stdin,
      dir, dir, dir, dir, dir, dir, dir)
  assert(os.execute("sh -c " .. helper.quote(script) .. " </dev/null >/dev/null 2>&1 &"))
  local p = setmetatable({ dir = dir, argv = argv }, Process)
  p.pid = helper.wait_until(function()
    local s = helper.read_file(dir .. "/pid")
    return s and tonumber(s:match("%d+"))
  end, 10, "the process to start")
  processes[#processes + 1] = p
  return p
end

-- The environment a stock lua5.4 child needs to require this tree's
-- pgcoord; extra: more variables.
function helper.lua_env(extra)
  local root = helper.root
  local env = {
    LUA_PATH = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;;",
    LUA_CPATH = root .. "/lua/?.so;;",
  }
  for k, v in pairs(extra or {}) do env[k] = v end
  return env
end

-- Runs argv to its end; returns exit code and output.
function helper.run(argv, opts)
  local p = helper.start(argv, opts)
  local code = p:wait((opts and opts.timeout) or 30)
  return code, p:output()
end

-- The exit status once known, else nil.
function Process:status()
  if self.rc == nil then
    local s = helper.read_file(self.dir .. "/rc")
    self.rc = s and tonumber(s:match("%d+"))
  end
  return self.rc
end

function Process:alive()
  if self:status() ~= nil then return false end
  return sh("kill -0 " .. self.pid .. " 2>/dev/null") == 0
end

function Process:kill(sig)
  if self:status() ~= nil then return false end
  return sh(("kill -%s %d 2>/dev/null"):format(sig or "TERM", self.pid)) == 0
end

-- Waits for the process to end; returns its exit code (128+n on signal n).
function Process:wait(timeout)
  timeout = timeout or 30
  local ok, err = pcall(helper.wait_until, function() return self:status() ~= nil end,
    timeout, "the process to exit")
  if not ok then
    error(("%s\ncommand: %s\noutput:\n%s"):format(tostring(err), table.concat(self.argv, " "),
      self:output()), 2)
  end
  return self:status()
end

function Process:output()
  return helper.read_file(self.dir .. "/out") or ""
end

-- Waits until the output contains `text` (a plain string); returns the output.
function Process:wait_output(text, timeout)
  local ok, err = pcall(helper.wait_until, function()
    return self:output():find(text, 1, true) or self:status() ~= nil
  end, timeout or 10, ("%q in the output"):format(text))
  local out = self:output()
  if not ok or not out:find(text, 1, true) then
    error(("%s\nwaiting for %q in the output of %s (status %s):\n%s"):format(
      ok and "process ended" or tostring(err), text, table.concat(self.argv, " "),
      tostring(self:status()), out), 2)
  end
  return out
end

-- ---- the TCP relay -------------------------------------------------------------------

local function ensure_relay_built()
  if io.open(helper.relay_bin, "rb") then return end
  local code = sh("make -s -C " .. helper.quote(helper.root) .. " build/tcp-relay >/dev/null")
  assert(code == 0, "cannot build build/tcp-relay")
end

-- A relay to target_host:target_port (target_port 0: a blackhole server).
-- Returns { port, pid, blackhole(), resume(), stop() }: blackhole() makes
-- the established links silently dead, resume() brings them back.
function helper.relay(target_host, target_port)
  ensure_relay_built()
  local p = helper.start({ helper.relay_bin, "0", target_host or "127.0.0.1",
    tostring(target_port or 0) })
  local port = helper.wait_until(function()
    return tonumber(p:output():match("^(%d+)\n"))
  end, 10, "the relay's port")
  local relay = { port = port, pid = p.pid, process = p }
  local acks = { paused = 0, resumed = 0 }
  -- Signals the relay and waits until it says the change is in effect.
  local function switch(sig, ack)
    acks[ack] = acks[ack] + 1
    assert(p:kill(sig), "the relay is not running")
    helper.wait_until(function()
      local n = 0
      for line in p:output():gmatch("[^\n]+") do
        if line == ack then n = n + 1 end
      end
      return n >= acks[ack]
    end, 10, "the relay to say " .. ack)
  end
  function relay.blackhole() switch("USR1", "paused") end
  function relay.resume() switch("USR2", "resumed") end
  function relay.stop()
    p:kill("TERM")
    p:wait(10)
  end
  -- A URI to the test database through this relay.
  function relay.dsn()
    local t = helper.tcp_parts()
    return ("postgresql://%s:%s@127.0.0.1:%d/%s"):format(t.user, t.password, port, t.dbname)
  end
  return relay
end

-- ---- the test cluster ------------------------------------------------------------------

-- True when the cluster can be stopped and started ($PGCOORD_TEST_PGCTL).
function helper.can_pgctl()
  local ctl = os.getenv("PGCOORD_TEST_PGCTL")
  return ctl ~= nil and ctl ~= ""
end

-- Runs $PGCOORD_TEST_PGCTL stop|start|restart; raises when it fails.
function helper.pgctl(action)
  local ctl = os.getenv("PGCOORD_TEST_PGCTL")
  assert(ctl and ctl ~= "", "PGCOORD_TEST_PGCTL is not set (run under scripts/pg-tmp)")
  -- The watching pool's connections would not survive; start it afresh later.
  if admin then
    admin:close()
    admin = nil
  end
  local code = sh(ctl .. " " .. helper.quote(action) .. " >/dev/null 2>&1")
  assert(code == 0, ("%s %s failed with status %d"):format(ctl, action, code))
end

-- ---- tmux ----------------------------------------------------------------------------

local tmux_sockets = {}
local Tmux = {}
Tmux.__index = Tmux

-- Runs command (a shell command line) in a detached 120x30 tmux session on
-- a private server socket.
function helper.tmux(command)
  local t = setmetatable({ socket = helper.unique("pgcoord_tmux") }, Tmux)
  tmux_sockets[#tmux_sockets + 1] = t.socket
  local code = sh(("tmux -L %s -f /dev/null new-session -d -s main -x 120 -y 30 %s")
    :format(t.socket, helper.quote(command)))
  assert(code == 0, "cannot start tmux")
  return t
end

-- tmux send-keys with each argument a key or a literal string.
function Tmux:send(...)
  local words = {}
  for i = 1, select("#", ...) do words[#words + 1] = helper.quote((select(i, ...))) end
  local code = sh(("tmux -L %s send-keys -t main %s"):format(self.socket, table.concat(words, " ")))
  assert(code == 0, "tmux send-keys failed")
end

-- Types a line and presses Enter.
function Tmux:line(text)
  local code = sh(("tmux -L %s send-keys -t main -l %s"):format(self.socket, helper.quote(text)))
  assert(code == 0, "tmux send-keys failed")
  self:send("Enter")
end

-- The pane's text, scrollback included, without trailing blanks: each line
-- loses its trailing spaces (the prompt "> " reads ">") and the text ends
-- with its last non-empty line, no newline.
function Tmux:capture()
  local text = command_output(("tmux -L %s capture-pane -p -J -t main -S -2000 2>/dev/null")
    :format(self.socket))
  local lines = {}
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = (line:gsub("%s+$", "")) end
  while #lines > 0 and lines[#lines] == "" do lines[#lines] = nil end
  return table.concat(lines, "\n")
end

-- Waits until the pane shows something matching `pattern` (a Lua pattern).
function Tmux:wait_for(pattern, timeout, what)
  local ok, err = pcall(helper.wait_until, function()
    return self:capture():match(pattern)
  end, timeout or 10, what or ("%q on the screen"):format(pattern))
  if not ok then error(("%s\nscreen:\n%s"):format(tostring(err), self:capture()), 2) end
  return ok
end

function Tmux:running()
  return sh(("tmux -L %s has-session -t main 2>/dev/null"):format(self.socket)) == 0
end

function Tmux:kill()
  sh(("tmux -L %s kill-server >/dev/null 2>&1"):format(self.socket))
end

-- ---- workers and subscribers a spec starts --------------------------------------------

-- What a spec starts, stopped after each test by started:stop():
--   local started = helper.started()
--   started:worker(jobs, opts)   -- a jobs worker, ready
--   started:subscriber(pool)     -- started and connected: a worker given it
--                                -- is listening once ready() returns
local Started = {}
Started.__index = Started

function helper.started()
  return setmetatable({ workers = {}, subscribers = {} }, Started)
end

function Started:worker(jobs, opts)
  local w = jobs:worker(opts)
  self.workers[#self.workers + 1] = w
  assert(w:ready(), "the worker did not start")
  return w
end

function Started:subscriber(pool)
  local sub = pgcoord.subscriber(pool)
  sub:start()
  helper.wait_until(function() return sub:connected() end, 5, "the subscriber to connect")
  self.subscribers[#self.subscribers + 1] = sub
  return sub
end

-- A subscriber the test made itself, stopped after it too.
function Started:own(sub)
  self.subscribers[#self.subscribers + 1] = sub
  return sub
end

-- Stops the workers at once (running handlers cancelled), then the
-- subscribers.
function Started:stop()
  for _, w in ipairs(self.workers) do
    local t = pgcoord.spawn(w.stop, w, 0)
    if not t:wait(10) then print("a worker did not stop within 10 s") end
  end
  self.workers = {}
  for _, sub in ipairs(self.subscribers) do sub:stop() end
  self.subscribers = {}
end

-- ---- tasks ------------------------------------------------------------------------------

local tasks = {}

-- pgcoord.spawn, but helper.cleanup cancels the task if it is still alive,
-- so a failing test does not leave work running into the next one.
function helper.spawn(fn, ...)
  local t = pgcoord.spawn(fn, ...)
  tasks[#tasks + 1] = t
  return t
end

-- ---- cleanup ----------------------------------------------------------------------------

-- Kills what the test started and drops its databases; for after_each.
function helper.cleanup()
  for _, t in ipairs(tasks) do
    local st = t:status()
    if st == "ready" or st == "running" then pcall(t.cancel, t) end
  end
  tasks = {}
  for _, p in ipairs(processes) do
    if p:alive() then p:kill("KILL") end
  end
  processes = {}
  for _, socket in ipairs(tmux_sockets) do
    sh(("tmux -L %s kill-server >/dev/null 2>&1"):format(socket))
  end
  tmux_sockets = {}
  if tmpdir then
    os.execute("rm -rf " .. helper.quote(tmpdir))
    tmpdir = nil
  end
  if #databases > 0 then
    for _, name in ipairs(databases) do
      pcall(helper.admin().exec, helper.admin(),
        ('DROP DATABASE IF EXISTS "%s" WITH (FORCE)'):format(name))
    end
    databases = {}
  end
end

-- Calls fn(...), which must raise; returns the error as text.
function helper.error_of(fn, ...)
  local ok, err = pcall(fn, ...)
  if ok then error("expected an error", 2) end
  return tostring(err)
end

-- Errors at the caller's line: fn calls helper.here() on the line that
-- must be blamed, then does what raises; raises_here(text, fn) checks
-- that the error holds text and names that file and line.
local blamed

function helper.here()
  blamed = debug.getinfo(2, "Sl")
end

function helper.raises_here(text, fn)
  blamed = nil
  local ok, err = pcall(fn)
  assert(not ok, "expected an error: " .. text)
  err = tostring(err)
  assert(blamed, "fn did not call helper.here()")
  local at = ("%s:%d: "):format(blamed.short_src:match("[^/]*$"), blamed.currentline)
  assert(err:find(at, 1, true), ("expected %q in %q"):format(at, err))
  assert(err:find(text, 1, true), ("expected %q in %q"):format(text, err))
end

-- Captures pgcoord.log lines while fn runs; returns the lines.
function helper.capture_log(fn)
  local lines = {}
  pgcoord.log.set_sink(function(line) lines[#lines + 1] = line end)
  local ok, err = pcall(fn, lines)
  pgcoord.log.set_sink(nil)
  if not ok then error(err, 0) end
  return lines
end

return helper

-- pgcoord-run: runs a script as a task, keeps the loop going while tasks
-- are alive, or offers an interactive prompt whose loop keeps running
-- while the user types.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local lifecycle = require "pgcoord.lifecycle"
local log = require "pgcoord.log"

local cli = {}

local USAGE = [=[
usage: pgcoord-run [options] [script [args...]]
  -e chunk            run the Lua chunk
  -l name             require library 'name' into global 'name'
  -i                  enter the interactive prompt after the script (or alone)
  --db conninfo       default database for pgcoord.connect() (URI or key=value)
  --migrate           apply the schema migrations in sql/, then run the script if any
  --print-sql         print the schema DDL and exit
  --status            print the coordination state (job groups, queues, locks,
                      outbox) from the database and exit; --json for JSON
  --http host:port    serve /metrics, /healthz and the dashboard at / (with
                      --workers, worker k listens on port + k - 1); an empty
                      host is 127.0.0.1
  --http-token T      the dashboard's actions need T (Authorization: Bearer T,
                      or its login form); off loopback its pages need it too,
                      and without it there it is not served (default:
                      PGCOORD_HTTP_TOKEN)
  --http-timeout s    close an HTTP connection that completes no request
                      within s seconds of opening or of its last one (30)
  --http-max-connections n
                      answer 503 beyond n open HTTP connections (256)
  --workers n         run the script in n processes (one loop each), restart
                      one that dies, stop all on SIGTERM/SIGINT
  --stop-timeout s    a graceful stop (SIGTERM, SIGINT) that takes longer than
                      s seconds (default 30) cancels what still runs, exit 1
  --log-level level   debug, info (default), warn or error
  --log-format fmt    logfmt (default) or json
  -v, --version       print the version and exit
  -h, --help          print this help and exit
  --                  stop handling options
  -                   run standard input as the script
With no script on a terminal, the prompt starts.
Environment:
  PGCOORD_DATABASE_URL, DATABASE_URL
                      the default database, in this order; then libpq's PG*
                      variables (PGHOST, PGHOSTADDR, PGPORT, PGDATABASE, ...)
  PGCOORD_SQL_DIR     the migrations, when not where the build or the
                      install put them
  PGCOORD_HISTORY     the prompt's history file (default $HOME/.pgcoord_history;
                      empty: none)
  PGCOORD_RESOLV_CONF the resolv.conf for host names (default /etc/resolv.conf)
  HOSTNAME            names this host in job workers and lock holders
                      (default the kernel's host name)
Admin commands (a script named jobs, queue or outbox runs as ./jobs); exit
status 0 done, 1 failed or not every id acted on, 2 usage error:
]=]

-- What pgcoord-run prints itself (errors, tracebacks) loses its passwords
-- as log lines do: a script's error may quote a conninfo.
local redact = log.redact

local function die(fmt, ...)
  io.stderr:write("pgcoord-run: " .. redact(fmt:format(...)) .. "\n")
  return 1
end

-- Parses argv (argv[0] is the program); returns options or nil, message.
local function parse(argv)
  local o = { chunks = {}, libs = {}, script = nil, args = {} }
  local i = 1
  local function value(flag)
    i = i + 1
    if argv[i] == nil then error(("option %s needs a value"):format(flag), 0) end
    return argv[i]
  end
  while argv[i] do
    local a = argv[i]
    if a == "--" then
      i = i + 1
      break
    elseif a == "-e" then o.chunks[#o.chunks + 1] = value(a)
    elseif a == "-l" then o.libs[#o.libs + 1] = value(a)
    elseif a == "-i" then o.interactive = true
    elseif a == "--db" then o.db = value(a)
    elseif a == "--migrate" then o.migrate = true
    elseif a == "--print-sql" then o.print_sql = true
    elseif a == "--status" then o.status = true
    elseif a == "--json" then o.json = true
    elseif a == "--http" then o.http = value(a)
    elseif a == "--http-token" then
      o.http_token = value(a)
      if o.http_token == "" then error("--http-token takes a non-empty token", 0) end
    elseif a == "--http-timeout" then
      o.http_timeout = tonumber(value(a))
      if not o.http_timeout or not (o.http_timeout > 0 and o.http_timeout < math.huge) then
        error(("--http-timeout takes a number of seconds > 0, got %s"):format(argv[i]), 0)
      end
    elseif a == "--http-max-connections" then
      o.http_max_connections = tonumber(value(a))
      if math.type(o.http_max_connections) ~= "integer" or o.http_max_connections < 1
        or o.http_max_connections > 1000000 then
        error(("--http-max-connections takes an integer from 1 to 1000000, got %s")
          :format(argv[i]), 0)
      end
    elseif a == "--workers" then
      o.workers = tonumber(value(a))
      if math.type(o.workers) ~= "integer" or o.workers < 1 then
        error(("--workers takes a positive integer, got %s"):format(argv[i]), 0)
      end
    elseif a == "--stop-timeout" then
      o.stop_timeout = tonumber(value(a))
      if not o.stop_timeout or o.stop_timeout ~= o.stop_timeout or o.stop_timeout <= 0 then
        error(("--stop-timeout takes a number of seconds > 0, got %s"):format(argv[i]), 0)
      end
    elseif a == "--log-level" then o.log_level = value(a)
    elseif a == "--log-format" then o.log_format = value(a)
    elseif a == "-v" or a == "--version" then o.version = true
    elseif a == "-h" or a == "--help" then o.help = true
    elseif a == "-" or a:sub(1, 1) ~= "-" then break
    else error(("unknown option %s (see --help)"):format(a), 0)
    end
    i = i + 1
  end
  if argv[i] then
    o.script = argv[i]
    o.script_index = i
    for j = i + 1, #argv do o.args[#o.args + 1] = argv[j] end
  end
  return o
end

-- The global 'arg' as the stock lua builds it: arg[0] the script.
local function script_arg(argv, o)
  local t = {}
  local base = o.script_index or (#argv + 1)
  for k = 0, #argv do t[k - base] = argv[k] end
  return t
end

local error_text = task.error_text

local function traceback(err)
  if task.is_cancelled(err) then return err end
  return debug.traceback(error_text(err), 2)
end

local exit_code = nil

-- Runs fn in a task; a failure prints the error and ends the process.
local function run_main(fn, ...)
  return task.spawn(function(...)
    local ok, err = xpcall(fn, traceback, ...)
    if not ok and task.is_cancelled(err) and lifecycle.stopping() then
      return -- cancelled past the stop deadline: the stop decides the status
    elseif not ok then
      io.stderr:write("pgcoord-run: " .. redact(error_text(err)) .. "\n")
      exit_code = 1
    end
  end, ...)
end

local function loop_while(cond)
  while exit_code == nil and cond() do core.step() end
end

-- ---- the interactive prompt ------------------------------------------------

-- Completion at the prompt: the fields of a global or of a table reached
-- through dots ("string.fo"), and methods after a colon ("s:up").
local function is_name(k)
  return type(k) == "string" and k:match("^[%a_][%w_]*$") ~= nil
end

local function completions(word)
  local path, sep, prefix = word:match("^(.-)([.:]?)([%w_]*)$")
  local t = _G
  if sep ~= "" then
    for name in path:gmatch("[^.:]+") do
      local ok, v = pcall(function() return t[name] end)
      if not ok or v == nil then return {} end
      t = v
    end
    if sep == ":" or type(t) ~= "table" then
      local mt = getmetatable(t)
      t = type(mt) == "table" and mt.__index
    end
  end
  local seen, out = {}, {}
  while type(t) == "table" and not seen[t] do
    seen[t] = true
    for k, v in pairs(t) do
      if is_name(k) and k:sub(1, #prefix) == prefix then
        seen[k] = true
        out[#out + 1] = path .. sep .. k .. (type(v) == "function" and "(" or "")
      end
    end
    local mt = getmetatable(t)
    t = type(mt) == "table" and mt.__index
  end
  table.sort(out)
  return out
end
cli.completions = completions

local function history_file()
  local path = os.getenv("PGCOORD_HISTORY")
  if path then return path ~= "" and path or nil end
  local home = os.getenv("HOME")
  return home and home ~= "" and (home .. "/.pgcoord_history") or nil
end

local function repl(pgcoord)
  local prompt = require "pgcoord.prompt"
  local inspect = require "pgcoord.inspect"
  local buffer, running = nil, nil
  local active = true
  local interactive_print = function(...)
    local n = select("#", ...)
    local parts = {}
    for k = 1, n do parts[k] = tostring((select(k, ...))) end
    prompt.print(table.concat(parts, "\t"))
  end
  _G.print = interactive_print
  -- What a chunk returns: tables as a short literal, the rest as print shows it.
  local function show_results(r)
    local parts = {}
    for k = 2, r.n do parts[k - 1] = inspect.show(r[k]) end
    prompt.print(table.concat(parts, "\t"))
  end
  pgcoord.log.set_sink(function(line) prompt.print(line) end)

  local function interrupted(err)
    return task.is_cancelled(err) or (type(err) == "string" and err:find("interrupted", 1, true))
  end

  local function evaluate(chunk)
    prompt.pause()
    running = task.spawn(function()
      prompt.running(coroutine.running())
      local r = table.pack(xpcall(chunk, function(err)
        if interrupted(err) then return "interrupted" end
        return traceback(err)
      end))
      prompt.running(nil)
      if not r[1] then
        prompt.print(redact(r[2]))
      elseif r.n > 1 then
        show_results(r)
      end
    end)
    task.spawn_daemon(function()
      pcall(running.join, running)
      running = nil
      if active then prompt.resume("> ") end
    end)
  end

  local function on_line(line)
    if line == nil then
      active = false
      prompt.close()
      io.stdout:write("\n")
      pgcoord.stop()
      return
    end
    buffer = buffer and (buffer .. "\n" .. line) or line
    local chunk, err = load("return " .. buffer, "=stdin", "t")
    if not chunk then chunk, err = load(buffer, "=stdin", "t") end
    if not chunk and err:find("<eof>$") then
      prompt.resume(">> ")
      return
    end
    if buffer:find("%S") then prompt.add_history(buffer) end
    buffer = nil
    prompt.set("> ")
    if not chunk then
      -- the editor would redraw the rejected line under the message
      prompt.pause()
      prompt.print(redact(err))
      prompt.resume("> ")
    else
      evaluate(chunk)
    end
  end

  -- Ctrl-C: a running chunk is interrupted (one that never waits by the
  -- hook prompt.c arms, one that waits is cancelled here: a query it
  -- waits on is dropped and cancelled on the server); at the prompt, the
  -- line typed so far goes.  Never the end of the process.
  local function on_interrupt(during_chunk)
    if not active then return end
    if running then
      local state = running:status()
      if state == "running" or state == "ready" then
        prompt.running(nil)
        running:cancel()
        prompt.print("interrupted")
      end
    elseif not during_chunk then
      buffer = nil
      prompt.set("> ")
      prompt.clear()
    end
  end

  local function on_terminate(signum)
    if pgcoord.stopping() then os.exit(128 + signum, false) end
    pgcoord.stop()
  end

  io.stdout:write(("pgcoord %s (%s) -- the loop runs while you type; Ctrl-D leaves\n")
    :format(core.version, _VERSION))
  prompt.start("> ", on_line, { complete = completions, interrupt = on_interrupt,
    history = history_file() })
  local sigterm = core.signal(15, on_terminate)
  loop_while(function() return active or task.live() > 0 end)
  sigterm:close()
end

-- ---- main --------------------------------------------------------------------

function cli.main(argv)
  local ok, o = pcall(parse, argv)
  if not ok then return die("%s", o) end
  if o.help then io.stdout:write(USAGE, require("pgcoord.admin").help()) return 0 end
  if o.version then
    io.stdout:write(("pgcoord-run %s (%s, libpq %d)\n"):format(core.version, _VERSION,
      core.libpq_version))
    return 0
  end

  local pgcoord = require "pgcoord"
  if o.log_level then
    local lok, lerr = pcall(pgcoord.log.set_level, o.log_level)
    if not lok then return die("%s", lerr) end
  end
  if o.log_format then
    local fok, ferr = pcall(pgcoord.log.set_format, o.log_format)
    if not fok then return die("%s", ferr) end
  end
  if o.db then require("pgcoord.db").set_default_conninfo(o.db) end
  if o.stop_timeout then lifecycle.set_stop_timeout(o.stop_timeout) end
  if o.script and require("pgcoord.admin").GROUPS[o.script] then
    return require("pgcoord.admin").main(o.script, o.args, o)
  end
  if o.print_sql then
    local sok, sql = pcall(require("pgcoord.migrate").sql)
    if not sok then return die("%s", error_text(sql)) end
    io.stdout:write(sql)
    return 0
  end
  _G.pgcoord = pgcoord
  _G.arg = script_arg(argv, o)
  for _, name in ipairs(o.libs) do _G[name] = require(name) end

  if o.status then return cli.status(pgcoord, o) end
  local jobs, err = cli.jobs(pgcoord, o)
  if not jobs then return die("%s", err) end
  local interactive = o.interactive or (#jobs == 0 and core.isatty(0))
  if o.workers then
    if interactive or not o.script then
      return die("--workers runs a script: give one (and no -i)")
    end
    return require("pgcoord.supervisor").run(o.workers, function(slot)
      return cli.run(pgcoord, o, jobs, false, slot)
    end, lifecycle.stop_timeout())
  end
  if #jobs == 0 and not interactive then
    local chunk, lerr = load(io.stdin:read("a"), "=stdin", "t")
    if not chunk then return die("%s", lerr) end
    jobs[1] = chunk
  end
  return cli.run(pgcoord, o, jobs, interactive)
end

-- The work of one process: --migrate, -e chunks, the script; nil, message
-- when a chunk does not compile.
function cli.jobs(pgcoord, o)
  local jobs = {}
  if o.migrate then
    jobs[#jobs + 1] = function()
      local pool = pgcoord.connect(nil, { size = 1 })
      local applied = pgcoord.migrate(pool)
      pool:close()
      pgcoord.log.info("schema up to date", { applied = #applied })
    end
  end
  for k, src in ipairs(o.chunks) do
    local chunk, err = load(src, ("=(command line %d)"):format(k), "t")
    if not chunk then return nil, err end
    jobs[#jobs + 1] = chunk
  end
  if o.script then
    local chunk, err
    if o.script == "-" then
      chunk, err = load(io.stdin:read("a"), "=stdin", "t")
    else
      chunk, err = loadfile(o.script, "t")
    end
    if not chunk then return nil, err end
    local args = o.args
    jobs[#jobs + 1] = function() return chunk(table.unpack(args)) end
  end
  return jobs
end

local function serve_http(pgcoord, o, slot)
  local addr = o.http
  if slot and slot > 1 then
    local host, port = addr:match("^(.*):(%d+)$")
    if host and tonumber(port) > 0 then addr = ("%s:%d"):format(host, tonumber(port) + slot - 1) end
  end
  -- (the dashboard's pages and the depth refresh; the health probe opens
  -- a connection of its own)
  local probe = pgcoord.connect(nil, { size = 3, params = { application_name = "pgcoord-http" } })
  local token = o.http_token or os.getenv("PGCOORD_HTTP_TOKEN")
  return pgcoord.http.serve(addr, { db = probe, idle_timeout = o.http_timeout,
    max_connections = o.http_max_connections, token = token ~= "" and token or nil })
end

-- Runs the jobs in one task, then the loop while tasks live (or the prompt).
function cli.run(pgcoord, o, jobs, interactive, slot)
  local main = run_main(function()
    if o.http then serve_http(pgcoord, o, slot) end
    for _, fn in ipairs(jobs) do fn() end
  end)
  if interactive then
    loop_while(function() return main:status() == "ready" or main:status() == "running" end)
    if exit_code == nil then repl(pgcoord) end
  else
    pgcoord.handle_signals()
    loop_while(function() return task.live() > 0 end)
  end
  lifecycle.finished()
  if exit_code == nil and lifecycle.expired() then exit_code = 1 end
  return exit_code or 0
end

-- --status: one screen (or JSON) of what the database holds.
function cli.status(pgcoord, o)
  local ok, err = pcall(function()
    local db = pgcoord.connect(nil, { size = 1 })
    local s = require("pgcoord.status").collect(db)
    io.stdout:write(o.json and (require("pgcoord.status").json(s) .. "\n")
      or require("pgcoord.status").text(s))
    db:close()
  end)
  if not ok then return die("%s", error_text(err)) end
  return 0
end

return cli

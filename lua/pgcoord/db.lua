-- The connection pool and transactions.
--
-- A pool opens connections lazily up to `size`, hands idle ones out LIFO
-- and queues waiters FIFO.  A connection comes back through a lease whose
-- __close returns it; a connection that comes back mid-query, inside a
-- transaction or closed is dropped instead of reused, so a cancelled task
-- never leaves a dirty connection behind.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local log = require "pgcoord.log"
local options = require "pgcoord.options"
local fifo = require "pgcoord.fifo"

local db = {}
local await = task.await -- (every statement waits: an upvalue, not a field)

local Pool = {}
Pool.__index = Pool
local Tx = {}
Tx.__index = Tx
local Lease = {}
Lease.__index = Lease

local function is_db_error(err)
  return getmetatable(err) == core.error_meta
end
db.is_error = is_db_error

-- A query against a database never migrated (or migrated by an older
-- pgcoord): a pgcoord relation or the schema itself is missing.
function db.schema_missing(err)
  if not is_db_error(err) then return false end
  local message = err.message or ""
  return (err.sqlstate == "42P01" and message:find('relation "pgcoord.', 1, true) ~= nil)
    or (err.sqlstate == "3F000" and message:find('schema "pgcoord"', 1, true) ~= nil)
end

-- The log level of a failure a service retries: "debug" for a missing
-- schema it has said before (state.schema_missing_said is set the first
-- time), so an unmigrated database is said once, not at every retry.
function db.failure_level(state, err, level)
  if not db.schema_missing(err) then return level end
  if state.schema_missing_said then return "debug" end
  state.schema_missing_said = true
  return level
end

local MIGRATE_HINT = "pgcoord's tables are missing or out of date:"
  .. " run `pgcoord-run --migrate` or pgcoord.migrate(db)"

-- A failed statement's error, before it is raised: where = the caller's
-- "file:line" (errors go up with level 0, so Lua adds no position) and,
-- for a missing schema, the fix.  Only errors pay for the stack walk.
local function annotate(err)
  if is_db_error(err) then
    if err.where == nil then err.where = options.caller_where() end
    if err.hint == nil and db.schema_missing(err) then err.hint = MIGRATE_HINT end
  end
  return err
end

local function raise(sqlstate, fmt, ...)
  error(core.error(sqlstate, fmt:format(...)), 0)
end

local check_options = options.spec("pgcoord.connect", {
  size = { "integer", default = 10, min = 1, max = 10000 },
  params = { "table" },
  connect_timeout = { "number", default = 10, above = 0 },
  prepare = { "boolean" }, -- nil: named statements unless behind a pooler
  name = { "string" },     -- in metrics; nil: the connection's application_name
})

-- A TCP link that dies silently would otherwise hang a query for the
-- kernel's two hours: keepalives notice an idle dead peer within a minute,
-- tcp_user_timeout one that stops acknowledging what we send.  Only where
-- the conninfo does not set them itself (params would override it).
local LINK_DEFAULTS = {
  keepalives_idle = "30", keepalives_interval = "10", keepalives_count = "3",
  tcp_user_timeout = "60000",
}

local function connection_params(params, conninfo)
  local out = { fallback_application_name = "pgcoord" }
  for k, v in pairs(LINK_DEFAULTS) do
    if not (conninfo and conninfo:find(k, 1, true)) then out[k] = v end
  end
  for k, v in pairs(params or {}) do
    if type(k) ~= "string" or (type(v) ~= "string" and type(v) ~= "number") then
      error(("pgcoord.connect: params.%s must be a string, got %s")
        :format(tostring(k), type(v)), 3)
    end
    out[k] = tostring(v)
  end
  return out
end

local default_override

-- pgcoord-run --db sets this; it comes before the environment.
function db.set_default_conninfo(conninfo)
  default_override = conninfo
end

function db.default_conninfo()
  if default_override and default_override ~= "" then return default_override end
  local v = os.getenv("PGCOORD_DATABASE_URL")
  if v and v ~= "" then return v end
  v = os.getenv("DATABASE_URL")
  if v and v ~= "" then return v end
  return nil -- libpq reads PGHOST, PGPORT, ... itself
end

-- ---- one connection ------------------------------------------------------

-- A query's wait: inside a task, parked in C until its outcome resumes
-- it (core.wait_*: no Lua function runs between); elsewhere, or with a
-- cancel pending (they return false, sending nothing), task.await with
-- the same send in the shape of a register function.
local wait_send, wait_prepared = core.wait_send, core.wait_prepared
local send_register = task.calls_back_once(core.send_register)
local prepared_register = task.calls_back_once(core.prepared_register)

local function send(conn, sql, binary, ...)
  local rows, err = wait_send(conn, sql, binary, ...)
  if rows == false then return await(send_register, conn, sql, binary, ...) end
  return rows, err
end

local prepare_register = task.calls_back_once(function(resume, conn, name, sql)
  local ok, err = conn:prepare(name, sql, resume)
  if not ok then resume(nil, err) end
end)

local function await_ok(register, ...)
  local r, err = await(register, ...)
  if r == nil then error(annotate(err), 0) end
  return r
end

-- One statement, unnamed, its parameter types left to the server.
local function run_plain(conn, sql)
  local rows, err = send(conn, sql, nil)
  if rows == nil then error(annotate(err), 0) end
  return rows
end

-- ---- statements ------------------------------------------------------------
--
-- A connection learns once per SQL text the parameter types the server
-- infers, so that a string goes to a bytea parameter as its bytes (and a
-- string with NUL bytes goes nowhere else), and on a direct connection it
-- prepares the text as a named statement: the server then skips parsing
-- and planning from the second run on.
--
-- A pooler in transaction mode (PgBouncer) gives each transaction to any
-- of its server connections: a statement prepared through one client
-- connection may be missing there, or be found under a name another
-- client gave it.  So a name is derived from the SQL text (a statement
-- found under it is the same statement, never another query's rows), a
-- statement found missing outside a transaction is run unnamed instead,
-- and a pool that finds a pooler when it connects (libpq's backend pid is
-- not the server's pg_backend_pid()) uses unnamed statements only, each
-- parsed, bound and run under one sync, which a pooler keeps together.
--
-- conn -> { named = bool, n = entries, stale = { [name] = true },
--           [sql] = { name | false, binary flags } }, capped at
-- MAX_STATEMENTS entries, so generated SQL cannot grow it forever.
local statements = setmetatable({}, { __mode = "k" })
local MAX_STATEMENTS = 256
local BYTEA = 17

-- 64-bit FNV-1a of the text, and its length: a collision is out of reach.
-- Each connection prepares the same texts: a name is hashed once (a byte
-- costs a Lua call), up to MAX_NAMES of them, then from scratch.
local names, n_names = {}, 0
local MAX_NAMES = 1000

local function statement_name(sql)
  local name = names[sql]
  if name then return name end
  local h = 0xcbf29ce484222325
  for i = 1, #sql do
    h = (h ~ sql:byte(i)) * 0x100000001b3
  end
  name = ("pgc_%016x_%x"):format(h, #sql)
  if n_names >= MAX_NAMES then names, n_names = {}, 0 end
  names[sql], n_names = name, n_names + 1
  return name
end

-- "0010": a character per parameter, "1" where it is bytea (see pgvalue.c).
local function binary_flags(types)
  local flags = {}
  for i, oid in ipairs(types) do flags[i] = oid == BYTEA and "1" or "0" end
  return table.concat(flags)
end

-- Parses sql as `name` ("" for the unnamed statement): its binary flags.
local function describe(conn, name, sql)
  return binary_flags(await_ok(prepare_register, conn, name, sql))
end

local function holds_string(...)
  for i = 1, select("#", ...) do
    if type((select(i, ...))) == "string" then return true end
  end
  return false
end

-- Named statements fail this way only where a pooler shares servers.
local function pooler_hint(err)
  if is_db_error(err) and not err.hint and (err.sqlstate == "26000" or err.sqlstate == "42P05") then
    err.hint = "named prepared statements do not survive a pooler in transaction mode:"
      .. " leave the pool's prepare option unset (or false)"
  end
  return err
end

local function prepare_named(conn, cache, sql)
  local name = statement_name(sql)
  if cache.stale[name] then
    -- the server still has the statement whose result type changed
    cache.stale[name] = nil
    local ok, err = pcall(run_plain, conn, ('DEALLOCATE "%s"'):format(name))
    if not ok and not (is_db_error(err) and err.sqlstate == "26000" and conn:reusable()) then
      error(err, 0)
    end
  end
  local ok, binary = pcall(describe, conn, name, sql)
  if ok then return { name, binary } end
  if is_db_error(binary) and binary.sqlstate == "42P05" and conn:reusable() then
    -- prepared through a pooler by another client: the same text
    return { name, describe(conn, "", sql) }
  end
  error(pooler_hint(binary), 0)
end

-- The cache entry for sql, made on first use.  Past the cap only a string
-- parameter makes the types worth a round trip (it may be for a bytea).
local function statement(conn, sql, ...)
  local cache = statements[conn]
  local entry = cache[sql]
  if entry then return entry end
  if cache.n >= MAX_STATEMENTS then
    return holds_string(...) and { false, describe(conn, "", sql) } or nil
  end
  if cache.named then
    entry = prepare_named(conn, cache, sql)
  else
    entry = { false, describe(conn, "", sql) }
  end
  cache.n = cache.n + 1
  cache[sql] = entry
  return entry
end

local function forget(conn, sql)
  local cache = statements[conn]
  cache[sql] = nil
  cache.n = cache.n - 1
end

-- Runs one statement on a core connection and waits for its rows.
local function run(conn, sql, ...)
  local entry = statements[conn][sql]
  if entry == nil then entry = statement(conn, sql, ...) end
  local rows, err
  if entry and entry[1] then
    -- (send_prepared, inline: the path of nearly every statement)
    rows, err = wait_prepared(conn, entry[1], entry[2], ...)
    if rows == false then rows, err = await(prepared_register, conn, entry[1], entry[2], ...) end
    local state = rows == nil and err.sqlstate
    if state and (state == "26000" or state == "0A000") then
      -- missing on the server (a pooler's other server connection, a
      -- DEALLOCATE ALL), or "cached plan must not change result type" (the
      -- table changed under it): prepare it again next time, and outside
      -- a transaction run it unnamed now
      forget(conn, sql)
      if state == "0A000" then statements[conn].stale[entry[1]] = true end
      if conn:reusable() then
        rows, err = send(conn, sql, entry[2], ...)
      else
        pooler_hint(err)
      end
    end
  else
    rows, err = send(conn, sql, entry and entry[2], ...)
  end
  if rows == nil then error(annotate(err), 0) end
  return rows
end

-- The SQL texts that passed check_sql (up to MAX_CHECKED of them, then
-- from scratch): a query run again skips the scan.
local checked, n_checked = {}, 0
local MAX_CHECKED = 1000

-- The SQL text of a public call, checked at its caller's level (3); the
-- callers look in `checked` first.
local function check_sql(sql, what)
  if type(sql) ~= "string" then
    error(("pgcoord: %s: sql must be a string, got %s"):format(what, type(sql)), 3)
  end
  local nul = sql:find("\0", 1, true)
  if nul then
    error(("pgcoord: %s: the SQL text contains a NUL byte (byte %d), where the server"
      .. " would see it end"):format(what, nul), 3)
  end
  if n_checked >= MAX_CHECKED then checked, n_checked = {}, 0 end
  checked[sql], n_checked = true, n_checked + 1
end

local script_register = task.calls_back_once(function(resume, conn, sql)
  local ok, err = conn:send_script(sql, resume)
  if not ok then resume(nil, err) end
end)

-- Runs several statements (no parameters), as migrations need.
local function run_script(conn, sql)
  local rows, err = await(script_register, conn, sql)
  if rows == nil then error(annotate(err), 0) end
  return rows
end

local function connect_register(resume, pool)
  local conn, err = core.connect(pool.conninfo, pool.params, pool.connect_timeout, resume)
  if not conn then
    resume(nil, err)
    return nil
  end
  return function() conn:close() end
end

local function describe_target(conninfo)
  return conninfo and log.redact(conninfo) or "the server from PG* environment"
end

local function notice(severity, message)
  log.debug("server notice", { severity = severity, notice = message })
end

-- ---- the pool -------------------------------------------------------------

-- Waiters queue in pool.waiters, a FIFO; one that gives up (a cancel, a
-- timeout) is only marked gone, and passed over when its turn comes: a
-- wake-up or a give-up costs O(1), where taking the first out of an array
-- made n waiters cost O(n^2).  pool.waiting counts those not gone; once
-- the gone outnumber them they are swept out, so a pool that never frees
-- a connection does not pile up the waiters that gave up on it.
local push, pop, count = fifo.push, fifo.pop, fifo.count

local function wake_one(pool)
  local waiters = pool.waiters
  while pool.waiting > 0 do
    local w = pop(waiters)
    if not w.gone then
      pool.waiting = pool.waiting - 1
      w.woken = true
      w.resume()
      return
    end
  end
end

local function is_waiting(w)
  return not w.gone
end

local function wait_register(resume, pool)
  local w = { resume = resume, woken = false, gone = false }
  push(pool.waiters, w)
  pool.waiting = pool.waiting + 1
  return function()
    if w.woken then
      wake_one(pool) -- pass on the wake-up this waiter will not use
      return
    end
    w.gone = true
    pool.waiting = pool.waiting - 1
    local waiters = pool.waiters
    if count(waiters) > 2 * pool.waiting + 16 then fifo.keep(waiters, is_waiting) end
  end
end

local function remove_idle(pool, lease)
  local idle = pool.idle
  for i = #idle, 1, -1 do
    if idle[i] == lease then
      table.remove(idle, i)
      return true
    end
  end
  return false
end

-- A pooler answers for the server: the backend pid libpq got at connect
-- time is its own, not the one the server runs the query in.
local function behind_pooler(conn)
  return run_plain(conn, "SELECT pg_backend_pid() AS pid")[1].pid ~= conn:backend_pid()
end

local function setup(pool, conn)
  local pooler = behind_pooler(conn)
  local named = pool.prepare
  if named == nil then named = not pooler end
  if pooler and not pool.pooler_seen then
    pool.pooler_seen = true
    log.info("connection pooler detected", { target = describe_target(pool.conninfo),
      statements = named and "named (prepare = true)" or "unnamed" })
  end
  statements[conn] = { named = named, pooler = pooler, n = 0, stale = {} }
  local date_style = conn:parameter("DateStyle") or ""
  if not date_style:match("^ISO") then run_plain(conn, "SET DateStyle = ISO") end
end

-- Whether conn (from db.open) reached the server through a pooler.
function db.behind_pooler(conn)
  local s = statements[conn]
  return s ~= nil and s.pooler
end

-- Opens a connection with the pool's settings, outside the pool (the
-- subscriber's LISTEN connection is one).
function db.open(pool)
  local conn, err = await(connect_register, pool)
  if not conn then
    err.message = ("pgcoord.connect: cannot connect to %s: %s")
      :format(describe_target(pool.conninfo), log.redact(err.message or "?"))
    error(annotate(err), 0)
  end
  conn:on_notice(notice)
  local ok, serr = pcall(setup, pool, conn)
  if not ok then
    conn:close()
    error(serr, 0)
  end
  return conn
end

function Pool:_open()
  local conn = db.open(self)
  local lease = setmetatable({ pool = self, conn = conn, idle = false }, Lease)
  conn:on_close(function(why)
    if lease.idle and remove_idle(self, lease) then
      lease.idle = false
      self.total = self.total - 1
      log.warn("idle connection lost", { reason = why })
      wake_one(self)
    end
  end)
  return lease
end

local IDLE_CHECK_AFTER = 0.05

-- Takes a connection: an idle one, a new one while under size, or waits.
-- (a local: the statements below call it without a lookup through Pool)
local function acquire(self)
  while true do
    if self.closed then
      raise("08003", "pgcoord: the pool is closed")
    end
    local idle = self.idle
    local n = #idle
    if n > 0 then
      local lease = idle[n]
      idle[n] = nil
      lease.idle = false
      -- a connection back from a query a moment ago is alive: look at the
      -- socket (a syscall) only for one that sat idle a while
      if lease.conn:check(IDLE_CHECK_AFTER) then
        return lease
      end
      -- the server closed it while idle and the loop has not seen it yet
      lease.conn:close()
      self.total = self.total - 1
    elseif self.total < self.size then
      self.total = self.total + 1
      local ok, lease = pcall(self._open, self)
      if ok then return lease end
      self.total = self.total - 1
      wake_one(self)
      error(lease, 0)
    else
      await(wait_register, self)
    end
  end
end
Pool.acquire = acquire

local function terminate_backend(pool, pid)
  local ok, err = pcall(pool.exec, pool, "SELECT pg_terminate_backend($1)", pid)
  if not ok then
    log.warn("could not stop an abandoned query", { pid = pid, error = tostring(err) })
  end
end

function Pool:_discard(lease)
  local conn = lease.conn
  local mid_query = conn:status() == "busy"
  -- (behind a pooler the pid is the pooler's invention: it may name an
  -- unrelated backend, and the query's own server is unknown)
  local pid = mid_query and not statements[conn].pooler and conn:backend_pid()
  conn:close()
  self.total = self.total - 1
  if pid and not self.closed then
    -- The server would run the abandoned query to its end otherwise.
    task.spawn_daemon(terminate_backend, self, pid)
  end
  wake_one(self)
end

-- (a lease's __close: the one step between a query and the next)
local function give_back(lease)
  local pool, conn = lease.pool, lease.conn
  if pool.closed or not conn:release() then
    pool:_discard(lease)
    return
  end
  lease.idle = true
  local idle = pool.idle
  idle[#idle + 1] = lease
  if pool.waiting > 0 then wake_one(pool) end
end
Lease.__close = give_back

function Pool.release(_, lease)
  give_back(lease)
end

function Pool:query(sql, ...)
  if not checked[sql] then check_sql(sql, "db:query") end
  local lease <close> = acquire(self)
  return run(lease.conn, sql, ...)
end

function Pool:one(sql, ...)
  if not checked[sql] then check_sql(sql, "db:one") end
  local lease <close> = acquire(self)
  return run(lease.conn, sql, ...)[1]
end

function Pool:exec(sql, ...)
  if not checked[sql] then check_sql(sql, "db:exec") end
  local lease <close> = acquire(self)
  return run(lease.conn, sql, ...).affected
end

function Pool:script(sql)
  if not checked[sql] then check_sql(sql, "db:script") end
  local lease <close> = acquire(self)
  return run_script(lease.conn, sql)
end

local function end_tx(tx, ok, ...)
  tx.done = true
  local conn = tx.conn
  local err = ...
  if ok then
    local _, aborted = conn:in_transaction()
    if not aborted then
      run_plain(conn, "COMMIT")
      return ...
    end
    -- fn caught a statement's error: COMMIT would answer ROLLBACK, no error
    err = core.error("25P02", "pgcoord: db:tx: a statement failed inside the transaction"
      .. " and fn caught its error: rolled back, nothing committed")
  end
  if conn:status() == "ready" then pcall(run_plain, conn, "ROLLBACK") end
  error(err, 0)
end

-- Runs fn(tx, ...) in a transaction: commits when it returns, rolls back
-- and re-raises when it raises.
function Pool:tx(fn, ...)
  if type(fn) ~= "function" then
    error(("pgcoord: db:tx expects a function, got %s"):format(type(fn)), 2)
  end
  local lease <close> = acquire(self)
  run_plain(lease.conn, "BEGIN")
  local tx = setmetatable({ conn = lease.conn, db = self, done = false, savepoints = 0 }, Tx)
  return end_tx(tx, pcall(fn, tx, ...))
end

function Pool:close()
  self.closed = true
  for _, lease in ipairs(self.idle) do
    lease.idle = false
    lease.conn:close()
    self.total = self.total - 1
  end
  self.idle = {}
  while self.waiting > 0 do wake_one(self) end
end

function Pool:stats()
  local idle = #self.idle
  return { size = self.size, open = self.total, idle = idle,
           in_use = self.total - idle, waiting = self.waiting }
end

-- ---- transactions ---------------------------------------------------------

local function tx_conn(tx)
  if tx.done then error("pgcoord: the transaction has already ended", 3) end
  return tx.conn
end

function Tx:query(sql, ...)
  if not checked[sql] then check_sql(sql, "tx:query") end
  return run(tx_conn(self), sql, ...)
end

function Tx:one(sql, ...)
  if not checked[sql] then check_sql(sql, "tx:one") end
  return run(tx_conn(self), sql, ...)[1]
end

function Tx:exec(sql, ...)
  if not checked[sql] then check_sql(sql, "tx:exec") end
  return run(tx_conn(self), sql, ...).affected
end

local function end_savepoint(tx, name, ok, ...)
  if ok then
    run_plain(tx.conn, "RELEASE SAVEPOINT " .. name)
    return ...
  end
  local err = ...
  if tx.conn:status() == "ready" then
    pcall(run_plain, tx.conn, "ROLLBACK TO SAVEPOINT " .. name)
  end
  error(err, 0)
end

-- A nested transaction is a savepoint: its failure undoes only its work.
function Tx:tx(fn, ...)
  local conn = tx_conn(self)
  self.savepoints = self.savepoints + 1
  local name = "pgcoord_sp" .. self.savepoints
  run_plain(conn, "SAVEPOINT " .. name)
  return end_savepoint(self, name, pcall(fn, self, ...))
end

-- ---- construction ---------------------------------------------------------

function db.connect(conninfo, opts)
  if conninfo ~= nil and type(conninfo) ~= "string" then
    error(("pgcoord.connect: conninfo must be a string, got %s"):format(type(conninfo)), 2)
  end
  opts = check_options(opts)
  conninfo = (conninfo ~= nil and conninfo ~= "") and conninfo or db.default_conninfo()
  local pool = setmetatable({
    conninfo = conninfo,
    params = connection_params(opts.params, conninfo),
    size = opts.size,
    connect_timeout = opts.connect_timeout,
    prepare = opts.prepare,
    idle = {}, waiters = fifo.new(), waiting = 0, total = 0, closed = false,
  }, Pool)
  require("pgcoord.metrics").track("pool", pool)
  -- Open one connection now, so a bad conninfo fails here, not later.
  pool.total = 1
  local ok, lease = pcall(pool._open, pool)
  if not ok then error(lease, 0) end
  -- (application_name as the server has it, whichever way it was set)
  pool.name = opts.name or lease.conn:parameter("application_name") or "pgcoord"
  pool:release(lease)
  return pool
end

db.run = run
db.run_script = run_script

-- ---- array literals --------------------------------------------------------
--
-- Batches go to the server as arrays ($1::bigint[] and unnest): the text
-- form is cheap to build and cheaper for the server to read than JSON.
-- int_array(list [, n]): "{1,2,t,NULL}" from integers and booleans (nil is
-- NULL); text_array(list [, n]): '{"a","b\\"c",NULL}' from strings.
db.int_array = core.int_array
db.text_array = core.text_array
-- micros_array(list [, n]): "{1764700148123457}" from epoch seconds (core.time()),
-- as integer microseconds rounded to the nearest.
db.micros_array = core.micros_array

return db

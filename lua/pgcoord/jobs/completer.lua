-- A worker's results on their way to the database: recorded as runs end,
-- written in batches (flush_count results or flush_age seconds) by writer
-- tasks, up to MAX_WRITERS at once.  A batch the server refuses is halved
-- until the result it refuses is alone; that job fails for good and the
-- rest is written.  Runners wait while MAX_WRITERS + 1 batches are not
-- written (make_room): a worker paused or killed reruns no more than that
-- and the jobs it had running, however slow the writes.
local task = require "pgcoord.task"
local core = require "pgcoord.core"
local json = require "pgcoord.json"
local log = require "pgcoord.log"
local db = require "pgcoord.db"
local backoff = require "pgcoord.backoff"
local sql = require "pgcoord.jobs.sql"

local completer = {}

-- The longest error text kept with a run (bytes).
completer.MAX_ERROR = 65536

-- Batches on their way at once: the server works on two while the worker
-- runs handlers.
local MAX_WRITERS = 2

-- Results wait for their write in a batch of columns, not a table each:
-- the ids of jobs done, the failures, and the runs to log.
local LOG_COLUMNS = { "ids", "types", "attempts", "oks", "started", "finished" }

local function new_batch()
  return { n = 0, done = {}, failures = {}, logged = 0, ids = {}, types = {}, attempts = {},
           oks = {}, started = {}, finished = {} }
end

-- Appends b's results to a's; returns a.
local function merge(a, b)
  a.n = a.n + b.n
  table.move(b.done, 1, #b.done, #a.done + 1, a.done)
  table.move(b.failures, 1, #b.failures, #a.failures + 1, a.failures)
  for _, column in ipairs(LOG_COLUMNS) do
    table.move(b[column], 1, b.logged, a.logged + 1, a[column])
  end
  a.logged = a.logged + b.logged
  return a
end

-- Splits a batch in two halves of its results; a run to log goes with
-- its job's result.
local function split(batch)
  local halves, side = { new_batch(), new_batch() }, {}
  local half = batch.n // 2
  local function put(k, id)
    local h = halves[k <= half and 1 or 2]
    side[id] = h
    h.n = h.n + 1
    return h
  end
  for k, id in ipairs(batch.done) do
    local h = put(k, id)
    h.done[#h.done + 1] = id
  end
  for k, f in ipairs(batch.failures) do
    local h = put(#batch.done + k, f.id)
    h.failures[#h.failures + 1] = f
  end
  for m = 1, batch.logged do
    local h = side[batch.ids[m]] or halves[2]
    local i = h.logged + 1
    h.logged = i
    for _, column in ipairs(LOG_COLUMNS) do h[column][i] = batch[column][m] end
  end
  return halves[1], halves[2]
end

-- The one result of a batch the server refused, made writable: its job
-- fails for good with the server's reason (a retry would be refused
-- again), and its run is logged as failed.
local function refused_result(batch, err)
  local b = new_batch()
  local id = batch.done[1] or batch.failures[1].id
  b.n = 1
  b.failures[1] = { id = id, delay = 0, final = true,
    error = json.clean_text("the server refused this run's result: " .. tostring(err),
      completer.MAX_ERROR) }
  if batch.logged == 1 then
    for _, column in ipairs(LOG_COLUMNS) do b[column][1] = batch[column][1] end
    b.oks[1], b.logged = false, 1
  end
  return b
end

-- Whether err says the server refused what the statement holds (a data
-- exception, an integrity violation, a limit exceeded) or the values
-- could not be encoded (22000, from write_batch): writing the same results
-- again would fail again.  Anything else (a lost link, a busy or
-- restarting server) is worth another try.
local function refused(err)
  if not db.is_error(err) then return false end
  local class = tostring(err.sqlstate):sub(1, 2)
  return class == "22" or class == "23" or class == "54"
end

-- FLUSH's parameters for a batch of results.
local function flush_params(batch)
  local int_array, m = db.int_array, batch.logged
  return int_array(batch.done), #batch.failures > 0 and json.encode(batch.failures) or "[]",
    int_array(batch.ids, m), db.text_array(batch.types, m), int_array(batch.attempts, m),
    int_array(batch.oks, m), db.micros_array(batch.started, m),
    db.micros_array(batch.finished, m)
end

local Completer = {}
Completer.__index = Completer

-- hooks: on_error(what, err); on_written(n), n results were just written;
-- on_retry_due(at), the core.now() time the earliest failed run just
-- written comes due; on_flushing(), the flusher runs (runners that passed
-- for it may stop passing).
function completer.new(pool, group, flush_count, flush_age, hooks)
  return setmetatable({ pool = pool, group = group, owner = nil, hooks = hooks,
                        flush_count = flush_count, flush_age = flush_age,
                        batch = new_batch(), writers = 0, write_failed = false,
                        writing = 0, -- results the writers have in hand
                        room = (MAX_WRITERS + 1) * flush_count,
                        -- the results not written fill room: make_room would wait
                        -- (read by the runners before each job, a call saved)
                        full = false,
                        flush_now = task.signal(), flushed = task.cond(),
                        closing = false, flusher = nil }, Completer)
end

-- Records the outcome of a run (failure: nil, or { id, error, delay, at,
-- final }); log_run: whether it goes to job_runs.  Returns true when the
-- batch just filled up and woke the flusher.
function Completer:record(id, jtype, attempt, ok, failure, log_run, started, finished)
  local batch = self.batch
  if ok then
    local done = batch.done
    done[#done + 1] = id
  else
    local failures = batch.failures
    failures[#failures + 1] = failure
  end
  if log_run then
    local m = batch.logged + 1
    batch.logged = m
    batch.ids[m], batch.types[m], batch.attempts[m], batch.oks[m] = id, jtype, attempt, ok
    -- (epoch seconds: written as microseconds, flush_params)
    batch.started[m], batch.finished[m] = started, finished
  end
  local n = batch.n + 1
  batch.n = n
  if n + self.writing >= self.room then self.full = true end
  return n == self.flush_count and self.flush_now:notify()
end

-- Writes what is recorded now, without waiting for flush_age.
function Completer:flush()
  self.flush_now:notify()
end

-- Results recorded and not written yet.
function Completer:unwritten()
  return self.batch.n
end

-- Waits, before a job starts, while the results recorded and not written
-- (the writers' included) fill MAX_WRITERS + 1 batches.  (Not once the
-- completer is stopping: what is left is written then.)  Callers may test
-- c.full first: when it is false, this would not wait.
function Completer:make_room()
  while self.batch.n + self.writing >= self.room and not self.closing do self.flushed:wait() end
end

-- Writes as the worker id, whose rows alone take the results.
function Completer:set_owner(id)
  self.owner = id
end

function Completer:_flush(batch)
  local ok, done, failures, ids, types, attempts, oks, started, finished =
    pcall(flush_params, batch)
  if not ok then
    error(core.error("22000", "results cannot be encoded: " .. tostring(done)), 0)
  end
  return self.pool:one(sql.FLUSH, done, failures, ids, types, attempts, oks, started, finished,
    self.owner, self.group)
end

-- Failed runs just written went back to 'scheduled': the worker wakes in
-- time to promote the earliest (no NOTIFY announces them).
function Completer:_written(batch)
  local due
  local now, wall = core.now(), core.time()
  for _, f in ipairs(batch.failures) do
    if not f.final then
      local at = f.at and (now + (f.at - wall)) or (now + f.delay)
      if not due or at < due then due = at end
    end
  end
  if due then self.hooks.on_retry_due(due) end
  self.hooks.on_written(batch.n)
end

-- Writes a batch; returns nothing when it is written, else what is left
-- unwritten and why.  No batch is retried for ever: see the header.
function Completer:_write_all(batch)
  local ok, err = pcall(self._flush, self, batch)
  if ok then
    self:_written(batch)
    return
  end
  if not refused(err) then return batch, err end
  if batch.n > 1 then
    local a, b = split(batch)
    local left, lerr = self:_write_all(a)
    if left then return merge(left, b), lerr end
    return self:_write_all(b)
  end
  local last = refused_result(batch, err)
  log.error("job worker: the server refused a result; its job fails for good",
    { group = self.group, job = last.failures[1].id, error = tostring(err) })
  local lok, lerr = pcall(self._flush, self, last)
  if lok then return end
  if not refused(lerr) then return batch, lerr end
  -- nothing about this job can be written: it stays running until the
  -- worker is taken for dead
  log.error("job worker: the server refused a result twice; it is dropped",
    { group = self.group, job = last.failures[1].id, error = tostring(lerr) })
end

-- Writes one batch of results; what it could not write goes back for the
-- next try.
function Completer:_write(batch)
  local left, err = self:_write_all(batch)
  self.writers, self.writing = self.writers - 1, self.writing - batch.n
  if left then
    self.batch = merge(left, self.batch)
    self.write_failed = true
    self.hooks.on_error("writing results failed", err)
  end
  self.full = self.batch.n + self.writing >= self.room
  self.flushed:signal()
end

function Completer:_loop()
  local retry_delay = backoff.new({ base = 0.1, cap = 10 })
  while true do
    if self.batch.n < self.flush_count and not self.closing then
      self.flush_now:wait(self.flush_age)
      self.hooks.on_flushing()
    end
    while self.writers >= MAX_WRITERS do self.flushed:wait() end
    if self.write_failed then
      -- the database is away: keep what we have and try again later
      self.write_failed = false
      task.sleep(retry_delay:next())
    else
      retry_delay:reset()
    end
    local batch = self.batch
    if batch.n > 0 then
      self.batch = new_batch()
      -- (a wake-up for the batch just taken is spent)
      self.flush_now:clear()
      self.writers, self.writing = self.writers + 1, self.writing + batch.n
      task.spawn(self._write, self, batch).cleanup = true -- see lifecycle.lua
    elseif self.closing and self.writers == 0 then
      return
    elseif self.closing then
      self.flushed:wait()
    end
  end
end

function Completer:start()
  self.flusher = task.spawn(self._loop, self)
  self.flusher.cleanup = true -- the stop's writes go through it
end

-- Writes every result recorded (now and from here on) and returns once
-- none is left.
function Completer:stop()
  self.closing = true
  self.flush_now:notify()
  self.flusher:wait()
end

return completer

-- Pause and fleet-wide limits of a group (pgcoord.job_groups, migration
-- 007): the public calls (jobs:pause, resume, paused, limit, limits), and
-- the watcher each worker keeps of its group's settings, with the limited
-- claim it uses while the group is paused or limited.
--
-- A group with nothing set costs its workers nothing per job: they read
-- the settings at start, on each NOTIFY of a change (channel
-- pgcoord_job_groups), on each reconnect and each poll, and claim with
-- jobs/sql.lua's CLAIM until something is set.  Then they switch to
-- LIMITED_CLAIM, which takes the group's row lock (so the limited claims
-- of the fleet are serialised), counts the slots the other live workers
-- hold, takes tokens from the group's bucket, and records the claiming
-- worker's slots: what it has in hand.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local options = require "pgcoord.options"
local json = require "pgcoord.json"
local metrics = require "pgcoord.metrics"
local sql = require "pgcoord.jobs.sql"

local limits = {}

limits.CHANNEL = "pgcoord_job_groups"

local paused_gauge = metrics.gauge("pgcoord_jobs_group_paused",
  "1 while the group is paused, as this process knows it.", { "group" })
local concurrency_gauge = metrics.gauge("pgcoord_jobs_group_concurrency_limit",
  "The group's fleet-wide concurrency limit (0: none).", { "group" })
local rate_gauge = metrics.gauge("pgcoord_jobs_group_rate_limit",
  "The group's fleet-wide starts per second (0: no limit).", { "group" })

-- ---- statements ----

-- Every change notifies the group's settings, which is what workers apply.
local NOTIFY_SETTINGS = [[
SELECT pg_notify('pgcoord_job_groups', json_build_object('group', name, 'paused', paused,
         'concurrency', concurrency, 'rate', rate)::text) AS notified,
       paused, concurrency, rate
  FROM s]]

local SET_PAUSED = [[
WITH s AS (
  INSERT INTO pgcoord.job_groups AS g (name, paused) VALUES ($1, $2)
  ON CONFLICT (name) DO UPDATE SET paused = $2, updated_at = now()
  RETURNING name, paused, concurrency, rate)
]] .. NOTIFY_SETTINGS

-- A new or changed rate starts with a full bucket (burst = rate); the
-- same rate set again keeps the bucket as it is (no extra burst).
local SET_LIMIT = [[
WITH s AS (
  INSERT INTO pgcoord.job_groups AS g (name, concurrency, rate, tokens, refilled_at)
  VALUES ($1, $2::int, $3::float8, COALESCE($3::float8, 0), clock_timestamp())
  ON CONFLICT (name) DO UPDATE
    SET concurrency = $2::int, rate = $3::float8,
        tokens = CASE WHEN g.rate = $3::float8 THEN g.tokens ELSE COALESCE($3::float8, 0) END,
        refilled_at = CASE WHEN g.rate = $3::float8 THEN g.refilled_at
                           ELSE clock_timestamp() END,
        updated_at = now()
  RETURNING name, paused, concurrency, rate)
]] .. NOTIFY_SETTINGS

local SETTINGS = [[
SELECT paused, concurrency, rate FROM pgcoord.job_groups WHERE name = $1]]

local LOCK_GROUP = SETTINGS .. " FOR UPDATE"

-- A limited worker that stops gives its slots back (its row is gone):
-- the others waiting for one look again.
local SLOTS_FREED = [[
SELECT pg_notify('pgcoord_jobs', json_build_object('group', $1::text, 'due_in', NULL)::text)]]

-- Run after LOCK_GROUP, in its transaction: a statement of its own, so
-- that its snapshot sees the slots that the claim which held the lock
-- before committed.  $1 group, $2 worker id, $3 jobs wanted, $4 jobs the
-- worker has in hand (running or claimed), $5 reclaim_after: slots of a
-- worker whose heartbeat is older are a dead worker's, and count no more.
-- A worker whose slots went down notifies the group, for the workers
-- waiting for one.  Returns the claimed rows, each with the bucket's
-- tokens left (NULL: no rate), or one row of NULLs and tokens.
local LIMITED_CLAIM = [[
WITH g AS (
  SELECT concurrency, rate, paused, clock_timestamp() AS at,
         least(rate, tokens + rate * greatest(0, extract(epoch FROM clock_timestamp()
                                                               - refilled_at))) AS tokens
    FROM pgcoord.job_groups WHERE name = $1),
others AS (
  SELECT COALESCE(sum(slots), 0)::int AS taken FROM pgcoord.job_workers
   WHERE group_name = $1 AND id <> $2 AND heartbeat_at >= now() - make_interval(secs => $5)),
allowed AS (
  SELECT CASE WHEN g.paused THEN 0
              ELSE greatest(0, least($3::int, COALESCE(g.concurrency - others.taken - $4::int, $3),
                                     COALESCE(floor(g.tokens)::int, $3))) END AS n
    FROM g, others),
c AS (
  UPDATE pgcoord.jobs j SET state = 'running', locked_by = $2, locked_at = now()
   WHERE j.ctid = ANY(ARRAY(
           SELECT ctid FROM pgcoord.jobs
            WHERE state = 'ready' AND group_name = $1
            ORDER BY priority, id
            LIMIT COALESCE((SELECT n FROM allowed), 0)
              FOR UPDATE SKIP LOCKED))
  RETURNING j.id, j.type, j.group_name AS "group", j.priority, j.params::text AS params,
            j.inserted_at, j.run_at, j.error_count, j.last_error),
counted AS (SELECT count(*)::int AS n FROM c),
bucket AS (
  UPDATE pgcoord.job_groups SET tokens = g.tokens - counted.n, refilled_at = g.at
    FROM g, counted WHERE name = $1 AND g.rate IS NOT NULL
  RETURNING job_groups.tokens),
old AS (SELECT slots FROM pgcoord.job_workers WHERE id = $2),
mine AS (
  UPDATE pgcoord.job_workers SET slots = $4::int + counted.n FROM counted WHERE id = $2
  RETURNING slots),
freed AS (
  SELECT pg_notify('pgcoord_jobs', json_build_object('group', $1::text, 'due_in', NULL)::text)
    FROM old, mine, g WHERE mine.slots < old.slots AND g.concurrency IS NOT NULL),
m AS (SELECT (SELECT tokens FROM bucket) AS tokens_left, (SELECT count(*) FROM freed) AS freed)
SELECT c.*, m.tokens_left FROM m LEFT JOIN c ON true ORDER BY c.priority, c.id]]

-- ---- the public calls ----

-- groups: the groups job types are defined in, or nil for a caller that
-- knows no definitions (an admin command line), which any group name suits.
local function check_group(where, groups, group)
  if type(group) ~= "string" or group == "" then
    options.raise("%s: group must be a non-empty string, got %s", where, options.show(group))
  end
  if groups == nil then
    json.check_text(where, "group", group) -- (a defined group's was checked by jobs:define)
  elseif not groups[group] then
    options.raise("%s: unknown group %q (no job type is defined in it)", where, group)
  end
end

local function show_settings(group, s)
  paused_gauge:set(s.paused and 1 or 0, group)
  concurrency_gauge:set(s.concurrency or 0, group)
  rate_gauge:set(s.rate or 0, group)
end

-- The group's settings as a table { paused =, concurrency =, rate = }.
local function settings_of(row)
  if not row then return { paused = false } end
  return { paused = row.paused, concurrency = row.concurrency, rate = row.rate }
end

-- Pauses (true) or resumes (false) group; returns its settings.
function limits.set_paused(pool, groups, group, paused, where)
  check_group(where, groups, group)
  local s = settings_of(pool:one(SET_PAUSED, group, paused))
  show_settings(group, s)
  return s
end

function limits.paused(pool, groups, group)
  check_group("jobs:paused", groups, group)
  return settings_of(pool:one(SETTINGS, group)).paused
end

function limits.get(pool, groups, group)
  check_group("jobs:limits", groups, group)
  return settings_of(pool:one(SETTINGS, group))
end

-- Bounds: a concurrency past what any fleet runs, and a rate whose
-- bucket arithmetic in float8 stays exact to a token.
local check_limit = options.spec("jobs:limit", {
  concurrency = { "integer", min = 1, max = 1000000 },
  rate = { "number", above = 0, max = 1000000 },
})

-- Sets both limits of group (a limit left out or nil is cleared).
function limits.set(pool, groups, group, opts)
  local o = check_limit(opts)
  check_group("jobs:limit", groups, group)
  local s = settings_of(pool:one(SET_LIMIT, group, o.concurrency, o.rate))
  show_settings(group, s)
  return s
end

-- ---- a worker's watcher ----

local Watcher = {}
Watcher.__index = Watcher

-- hooks: on_change() (paused() or limited() may differ), on_wake() (a
-- token is due), on_error(what, err).
function limits.watcher(pool, group, poll_interval, reclaim_after, hooks)
  return setmetatable({
    pool = pool, group = group, poll_interval = poll_interval, reclaim_after = reclaim_after,
    hooks = hooks, settings = { paused = false },
    notified = 0,                 -- changes applied from a NOTIFY, for load()
    reload = task.signal(),       -- the poll loop reloads at once
    poller = nil, timer = nil, timer_at = nil, unlisten = nil,
  }, Watcher)
end

function Watcher:paused()
  return self.settings.paused
end

-- Paused, or with a limit: the worker claims with claim() below.
function Watcher:limited()
  local s = self.settings
  return s.paused or s.concurrency ~= nil or s.rate ~= nil
end

local function number_or_nil(v)
  return type(v) == "number" and (math.tointeger(v) or v) or nil
end

function Watcher:_apply(s)
  local old = self.settings
  s = { paused = s.paused == true, concurrency = number_or_nil(s.concurrency),
        rate = number_or_nil(s.rate) }
  self.settings = s
  show_settings(self.group, s)
  if old.paused ~= s.paused or old.concurrency ~= s.concurrency or old.rate ~= s.rate then
    self.hooks.on_change()
  end
end

-- Reads the group's settings (raises when the database says no).  A
-- NOTIFY applied while the read was on its way wins: the read may have
-- been answered before that change committed (the two come on separate
-- connections, in either order), and a change the read saw after it
-- sends a NOTIFY of its own.  Applying the read would undo a limit until
-- the next poll.
function Watcher:load()
  local notified = self.notified
  local row = self.pool:one(SETTINGS, self.group)
  if self.notified == notified then self:_apply(settings_of(row)) end
end

-- Applies each change NOTIFY'd on sub, reloads on each reconnect (one may
-- have been missed).
function Watcher:listen(sub)
  local group = self.group
  local listener = sub:channel(limits.CHANNEL):on(function(msg)
    self.notified = self.notified + 1
    self:_apply(msg)
  end,
    { filter = function(msg) return type(msg) == "table" and msg.group == group end })
  local unhook = sub:hook_reconnect(function() self.reload:notify() end)
  self.unlisten = function()
    listener:close()
    unhook()
  end
end

function Watcher:_poll_loop()
  while true do
    self.reload:wait(self.poll_interval)
    local ok, err = pcall(self.load, self)
    if not ok then self.hooks.on_error("reading the group's settings failed", err) end
  end
end

function Watcher:start()
  self.poller = task.spawn(self._poll_loop, self)
end

-- Stops watching (nothing of its tasks needs finishing).
function Watcher:stop()
  if self.unlisten then self.unlisten() end
  if self.poller then self.poller:cancel() end
  if self.timer then self.timer:cancel() end
end

-- Tells the group's workers that this one's slots are free (it stopped);
-- returns false, err when the database says no.
function Watcher:slots_freed()
  return pcall(self.pool.exec, self.pool, SLOTS_FREED, self.group)
end

-- Wakes the worker in `seconds`, unless a wake-up at least as early is due.
function Watcher:_wake_in(seconds)
  local at = core.now() + seconds
  if self.timer_at and self.timer_at > core.now() and self.timer_at <= at then return end
  if self.timer then self.timer:cancel() end
  self.timer_at = at
  self.timer = task.spawn(function()
    task.sleep(seconds)
    self.hooks.on_wake()
  end)
end

-- The limited claim, in tx: up to want jobs, as the group's limits allow
-- with held jobs in hand.  (pool:tx(limits.claim, watcher, ...))
function limits.claim(tx, self, id, want, held)
  local s = settings_of(tx:one(LOCK_GROUP, self.group))
  if not (s.paused or s.concurrency or s.rate) then
    -- cleared meanwhile (its NOTIFY is on its way): the plain claim
    -- (the tag is for a claim outside a transaction: see worker.lua)
    return tx:query(sql.CLAIM, self.group, id, want, math.floor(core.time() * 1e6))
  end
  local rows = tx:query(LIMITED_CLAIM, self.group, id, want, held, self.reclaim_after)
  local tokens = rows[1] and rows[1].tokens_left
  if rows[1] and rows[1].id == nil then rows[1] = nil end
  for _, job in ipairs(rows) do job.tokens_left = nil end
  if s.rate and tokens and tokens < 1 and #rows < want then
    -- held back by the bucket: the next token is due then
    self:_wake_in((1 - tokens) / s.rate)
  end
  return rows
end

return limits

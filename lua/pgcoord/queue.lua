-- Durable queues with subscriptions: at-least-once, optionally ordered.
--
-- A queue is a named topic.  q:publish copies a message, in one statement
-- and in the caller's transaction, to every subscription that exists at
-- that moment (sql/003_queue.sql has the tables and why they look as they
-- do).  A consumer claims a subscription's deliveries by setting a lease,
-- visible_at = now() + visibility_timeout, in the same UPDATE that claims
-- them; it renews the lease while the handler runs, and acknowledges or
-- requeues when the handler ends.  A consumer that dies stops renewing:
-- once its lease runs out, the message is claimed again by another.  The
-- delivery count doubles as the lease's fencing token, so a consumer that
-- lost its lease cannot ack or requeue on top of the next one, and
-- msg:fence(tx) lets a handler's own transaction check it too.
--
-- Unordered subscriptions claim FOR UPDATE SKIP LOCKED, as many rows as
-- there are free handlers; acks are written in batches by one task.
-- Ordered subscriptions only ever claim the oldest pending delivery (the
-- head), and only once its lease or backoff is over, so at most one
-- message is in flight across every consumer, and a requeued message
-- holds back the ones behind it.
--
-- Consumers wake on a NOTIFY that publish sends on pgcoord_queue_<id>, on
-- every (re)connection of the LISTEN connection, and on a poll timer; an
-- idle consumer sleeps until the earliest lease or backoff of its
-- subscription ends, so redelivery after a crash is as prompt as the lease.
local core = require "pgcoord.core"
local task = require "pgcoord.task"
local db = require "pgcoord.db"
local store = require "pgcoord.store"
local json = require "pgcoord.json"
local log = require "pgcoord.log"

local queue = {}

local Queue = {}
Queue.__index = Queue
local Consumer = {}
Consumer.__index = Consumer
-- What a handler gets: { id, payload, published_at, deliveries,
-- last_error } and msg:fence(tx).  Its delivery (the in-flight entry) is
-- kept aside, so that a handler that changes the fields cannot move the
-- fence onto another delivery.
local Message = {}
Message.__index = Message
local leases = setmetatable({}, { __mode = "k" })   -- msg -> in-flight entry

-- Advisory lock keys (pg_advisory_xact_lock(int, int), the queue id second).
local PUBLISH_LOCK = 0x70677170 -- "pgqp": publishers to a queue with an ordered subscription
local SWEEP_LOCK = 0x70677167   -- "pgqg": whoever deletes deliveries and messages

local SWEEP_BATCH = 5000
local ACK_BATCH = 1000
local ERROR_LIMIT = 2000 -- bytes of an error kept in last_error

-- ---- SQL -------------------------------------------------------------------------

-- The subscriptions of queue $1, locked against a concurrent unsubscribe,
-- and the queue's id; for a queue with an ordered subscription the
-- publish lock is taken here, before any message id is drawn, and held to
-- commit: ids then follow commit order, which is what ordered consumers
-- deliver in.
local PUBLISH_TARGET = ([[
WITH subs AS (
  SELECT s.id, s.queue_id, s.ordered
    FROM pgcoord.queue_subscriptions s
    JOIN pgcoord.queues q ON q.id = s.queue_id
   WHERE q.name = $1
     FOR KEY SHARE OF s),
target AS (
  SELECT t.queue_id,
         CASE WHEN t.ordered THEN pg_advisory_xact_lock(%d, t.queue_id)::text END AS locked
    FROM (SELECT queue_id, bool_or(ordered) AS ordered FROM subs GROUP BY queue_id) t),
]]):format(PUBLISH_LOCK)

-- One message; the NOTIFY is delivered at commit, and never on rollback.
local PUBLISH = PUBLISH_TARGET .. [[
msgs AS (
  INSERT INTO pgcoord.queue_messages (queue_id, payload)
  SELECT queue_id, $2::json FROM target
  RETURNING id),
copies AS (
  INSERT INTO pgcoord.queue_deliveries (subscription_id, message_id)
  SELECT s.id, m.id FROM subs s, msgs m),
wake AS (
  SELECT pg_notify('pgcoord_queue_' || queue_id, '') FROM target)
SELECT (SELECT id FROM msgs) AS id, (SELECT count(*) FROM subs) AS copies,
       (SELECT count(*) FROM wake) AS notified, (SELECT queue_id FROM target) AS queue_id]]

-- Many messages ($2, a JSON array of payloads), ids in array order.
local PUBLISH_MANY = PUBLISH_TARGET .. [[
msgs AS (
  INSERT INTO pgcoord.queue_messages (queue_id, payload)
  SELECT t.queue_id, v.payload
    FROM target t, json_array_elements($2::json) WITH ORDINALITY AS v(payload, n)
   ORDER BY v.n
  RETURNING id),
copies AS (
  INSERT INTO pgcoord.queue_deliveries (subscription_id, message_id)
  SELECT s.id, m.id FROM subs s, msgs m),
wake AS (
  SELECT pg_notify('pgcoord_queue_' || queue_id, '') FROM target)
SELECT (SELECT json_agg(id ORDER BY id) FROM msgs) AS ids, (SELECT count(*) FROM subs) AS copies,
       (SELECT count(*) FROM wake) AS notified, (SELECT queue_id FROM target) AS queue_id]]

local QUEUE_CREATE = [[
INSERT INTO pgcoord.queues (name) VALUES ($1) ON CONFLICT (name) DO NOTHING]]

local QUEUE_ID = [[
SELECT id FROM pgcoord.queues WHERE name = $1]]

local SUBSCRIBE = [[
INSERT INTO pgcoord.queue_subscriptions (queue_id, name, ordered) VALUES ($1, $2, $3)
ON CONFLICT (queue_id, name) DO NOTHING
RETURNING id, ordered]]

local SUBSCRIPTION = [[
SELECT s.id, s.queue_id, s.ordered
  FROM pgcoord.queue_subscriptions s
  JOIN pgcoord.queues q ON q.id = s.queue_id
 WHERE q.name = $1 AND s.name = $2]]

-- Claims: $1 subscription, $2 how many, $3 max_deliveries (NULL: no
-- limit), $4 visibility_timeout.  The UPDATE finds its rows through
-- `picked` only (one index probe per row, as with BY_TOKEN below).  A row
-- whose deliveries already reached max_deliveries (its handlers died, or
-- overran their lease, each time) goes to the dead letters instead of to
-- a handler.  Payloads come back as text, decoded per message by its
-- handler task: one that cannot be decoded (nested too deep, say) must
-- fail its own delivery, not the claim of every message beside it.
local CLAIM_UPDATE = [[
UPDATE pgcoord.queue_deliveries d
   SET state = CASE WHEN d.deliveries >= $3 THEN 'dead' ELSE 'pending' END,
       deliveries = CASE WHEN d.deliveries >= $3 THEN d.deliveries ELSE d.deliveries + 1 END,
       last_delivered_at = CASE WHEN d.deliveries >= $3 THEN d.last_delivered_at ELSE now() END,
       visible_at = now() + make_interval(secs => $4),
       last_error = CASE WHEN d.deliveries >= $3
                         THEN 'delivery ' || d.deliveries || ' ended without an outcome (the'
                              || ' consumer stopped or died, or the handler outlived its lease)'
                         ELSE d.last_error END
  FROM picked p, pgcoord.queue_messages m
 WHERE d.subscription_id = p.subscription_id AND d.message_id = p.message_id
   AND d.state = 'pending' AND d.visible_at <= now()
   AND m.id = d.message_id
RETURNING d.message_id AS id, d.state, d.deliveries, d.last_error, m.payload::text AS payload,
          m.published_at]]

-- Unordered: the first visible pending rows that nobody else is claiming.
local CLAIM = [[
WITH picked AS (
  SELECT subscription_id, message_id FROM pgcoord.queue_deliveries
   WHERE subscription_id = $1 AND state = 'pending' AND visible_at <= now()
   ORDER BY message_id
   LIMIT $2
     FOR UPDATE SKIP LOCKED)
]] .. CLAIM_UPDATE

-- Ordered: the head only, and only when it is visible ($2 is unused, so
-- that both claims take the same parameters).  No lock in the CTE: two
-- claimers may pick the same head, and the UPDATE's recheck of visible_at
-- on the row the first one changed lets exactly one of them through.
local CLAIM_HEAD = [[
WITH picked AS (
  SELECT subscription_id, message_id FROM pgcoord.queue_deliveries
   WHERE subscription_id = $1 AND state = 'pending' AND $2::int > 0
   ORDER BY message_id
   LIMIT 1)
]] .. CLAIM_UPDATE

-- Ordered, after a handler returned: acks the head ($5, with its delivery
-- count $6) and claims the next head in the same statement, one round
-- trip per message.  The claim's snapshot still shows the acked row as
-- pending, so it is skipped by id; nothing is claimed unless the ack
-- went through (a lost lease means another consumer has the head).
-- Always one row: acked (0 or 1) and the claimed message's columns, if any.
local ACK_CLAIM_HEAD = [[
WITH acked AS (
  UPDATE pgcoord.queue_deliveries
     SET state = 'acked', acked_at = now()
   WHERE subscription_id = $1 AND message_id = $5 AND deliveries = $6 AND state = 'pending'
  RETURNING message_id),
picked AS (
  SELECT subscription_id, message_id FROM pgcoord.queue_deliveries
   WHERE subscription_id = $1 AND state = 'pending' AND message_id <> $5 AND $2::int > 0
     AND EXISTS (SELECT 1 FROM acked)
   ORDER BY message_id
   LIMIT 1),
claimed AS (
]] .. CLAIM_UPDATE .. [[)
SELECT (SELECT count(*) FROM acked) AS acked, c.*
  FROM (SELECT 1) one LEFT JOIN claimed c ON true]]

-- A fence in the handler's transaction: the delivery is still the one
-- handed out (same delivery count, still pending), and its row stays
-- locked until that transaction ends.  FOR SHARE conflicts with the
-- UPDATE of a claim (an ordered claim waits for the commit) and with an
-- unordered claim's FOR UPDATE SKIP LOCKED (which passes the row by), so
-- no other consumer can take the message while the fenced writes are
-- uncommitted (the consumer's own lease renewal passes it by, see RENEW).
local FENCE = [[
SELECT 1 AS current
  FROM pgcoord.queue_deliveries
 WHERE subscription_id = $1 AND message_id = $2 AND deliveries = $3 AND state = 'pending'
   FOR SHARE]]

-- When a consumer found nothing: seconds until the next lease or backoff
-- ends (nil: nothing pending), and whether the subscription still exists.
-- A row that is visible already (its backoff ended since the claim, or
-- another consumer is claiming it) gives a number <= 0: look again soon.
local NEXT_DUE = [[
SELECT (SELECT extract(epoch FROM min(visible_at) - now())
          FROM pgcoord.queue_deliveries
         WHERE subscription_id = $1 AND state = 'pending') AS next_in,
       EXISTS (SELECT 1 FROM pgcoord.queue_subscriptions WHERE id = $1) AS subscribed]]

local NEXT_DUE_HEAD = [[
SELECT (SELECT extract(epoch FROM visible_at - now())
          FROM pgcoord.queue_deliveries
         WHERE subscription_id = $1 AND state = 'pending'
         ORDER BY message_id LIMIT 1) AS next_in,
       EXISTS (SELECT 1 FROM pgcoord.queue_subscriptions WHERE id = $1) AS subscribed]]

-- Acks, lease renewals and hand-backs name their rows with three arrays:
-- subscription ids ($1, the same id repeated), message ids ($2) and the
-- delivery counts they were claimed with ($3, the lease's fencing token).
-- The subscription id comes from the array, not a parameter, so that the
-- only cheap plan is one index probe per element: with a parameter, a
-- planner whose statistics predate a burst of publishes scans every
-- pending row of the subscription instead, once per batch.
local BY_TOKEN = [[
  FROM unnest($1::bigint[], $2::bigint[], $3::integer[]) AS a(sid, id, n)
 WHERE d.subscription_id = a.sid AND d.message_id = a.id AND d.deliveries = a.n
   AND d.state = 'pending']]

local ACK = [[
UPDATE pgcoord.queue_deliveries d
   SET state = 'acked', acked_at = now()
]] .. BY_TOKEN .. [[

RETURNING d.message_id AS id]]

local REQUEUE = [[
UPDATE pgcoord.queue_deliveries
   SET state = CASE WHEN deliveries >= $4 THEN 'dead' ELSE 'pending' END,
       visible_at = now() + make_interval(secs => $5),
       last_error = $6
 WHERE subscription_id = $1 AND message_id = $2 AND deliveries = $3 AND state = 'pending'
RETURNING state]]

-- Lease renewals pass by rows that a handler's fenced transaction holds
-- (msg:fence): nobody can claim those meanwhile, and waiting for one
-- would hold up the renewal of every other lease.  `current` counts the
-- leases still this consumer's, renewed or not.
local TOKEN_ROWS = [[
  SELECT d.subscription_id, d.message_id
    FROM unnest($1::bigint[], $2::bigint[], $3::integer[]) AS a(sid, id, n)
    JOIN pgcoord.queue_deliveries d
      ON d.subscription_id = a.sid AND d.message_id = a.id AND d.deliveries = a.n
   WHERE d.state = 'pending']]

local RENEW = [[
WITH current AS (
]] .. TOKEN_ROWS .. [[),
free AS (
]] .. TOKEN_ROWS .. [[

     FOR UPDATE OF d SKIP LOCKED),
renewed AS (
  UPDATE pgcoord.queue_deliveries d
     SET visible_at = now() + make_interval(secs => $4)
    FROM free f
   WHERE d.subscription_id = f.subscription_id AND d.message_id = f.message_id
  RETURNING 1)
SELECT (SELECT count(*) FROM current) AS current, (SELECT count(*) FROM renewed) AS renewed]]

-- Hands back messages whose handlers were cancelled, for others at once.
local RELEASE = [[
WITH r AS (
  UPDATE pgcoord.queue_deliveries d
     SET visible_at = now(), last_error = $4
  ]] .. BY_TOKEN .. [[

  RETURNING 1)
SELECT count(*) AS released, pg_notify('pgcoord_queue_' || $5::int, '') AS notified FROM r]]

-- Sweeps run under the queue's sweep lock: acked rows past retention go,
-- then the messages that no subscription holds any longer.
local SWEEP_ACKED = [[
DELETE FROM pgcoord.queue_deliveries d
 USING (SELECT subscription_id, message_id FROM pgcoord.queue_deliveries
         WHERE subscription_id = ANY (ARRAY(SELECT id FROM pgcoord.queue_subscriptions
                                             WHERE queue_id = $1))
           AND state = 'acked' AND acked_at < now() - make_interval(secs => $2)
         LIMIT $3) old
 WHERE d.subscription_id = old.subscription_id AND d.message_id = old.message_id
   AND d.state = 'acked'
RETURNING d.message_id AS id]]

-- The PK probe (subscription_id, message_id) per subscription of the
-- queue finds any delivery left; this must run in a statement after the
-- deletion (a statement does not see its own CTE's deletions), under the
-- sweep lock so that two deleters cannot each see the other's row.
local DROP_MESSAGES = [[
DELETE FROM pgcoord.queue_messages m
 WHERE m.id = ANY ($1::bigint[])
   AND NOT EXISTS (
     SELECT 1 FROM pgcoord.queue_deliveries d
      WHERE d.subscription_id = ANY (ARRAY(SELECT id FROM pgcoord.queue_subscriptions
                                            WHERE queue_id = $2))
        AND d.message_id = m.id)]]

local UNSUBSCRIBE_BATCH = [[
DELETE FROM pgcoord.queue_deliveries d
 USING (SELECT message_id FROM pgcoord.queue_deliveries WHERE subscription_id = $1 LIMIT $2) b
 WHERE d.subscription_id = $1 AND d.message_id = b.message_id
RETURNING d.message_id AS id]]

local DEAD = [[
SELECT d.message_id AS id, m.payload::text AS payload, m.published_at, d.deliveries, d.last_error,
       d.last_delivered_at
  FROM pgcoord.queue_deliveries d
  JOIN pgcoord.queue_messages m ON m.id = d.message_id
 WHERE d.subscription_id = $1 AND d.state = 'dead'
 ORDER BY d.message_id
 LIMIT $2]]

-- The delivery count starts again, so that max_deliveries applies afresh.
local REQUEUE_DEAD = [[
WITH r AS (
  UPDATE pgcoord.queue_deliveries
     SET state = 'pending', deliveries = 0, visible_at = now()
   WHERE subscription_id = $1 AND state = 'dead'
     AND ($2::bigint[] IS NULL OR message_id = ANY ($2::bigint[]))
  RETURNING 1)
SELECT count(*) AS requeued,
       CASE WHEN count(*) > 0 THEN pg_notify('pgcoord_queue_' || $3::int, '') END AS notified
  FROM r]]

local STATS = [[
SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
       count(*) FILTER (WHERE state = 'pending' AND visible_at > now()) AS delayed,
       count(*) FILTER (WHERE state = 'dead') AS dead,
       count(*) FILTER (WHERE state = 'acked') AS acked,
       max(last_delivered_at) AS last_delivered_at,
       max(acked_at) AS last_acked_at
  FROM pgcoord.queue_deliveries
 WHERE subscription_id = $1]]

-- The statements, for benchmarks that run the same SQL through pgbench.
queue.sql = {
  publish = PUBLISH, publish_many = PUBLISH_MANY, claim = CLAIM, claim_head = CLAIM_HEAD,
  ack = ACK, ack_claim_head = ACK_CLAIM_HEAD, requeue = REQUEUE, renew = RENEW,
}

-- ---- helpers ---------------------------------------------------------------------

local error_text = task.error_text
local json_decode = json.decode

local int_array = db.int_array

local function check_name(where, what, name, level)
  if type(name) ~= "string" or name == "" then
    error(("%s: %s must be a non-empty string, got %s"):format(where, what, tostring(name)),
      level + 1)
  end
end

local check_db = store.check_conn

-- Encodes one payload; raises naming the queue (and the value's position).
local function encode(self, where, value, index, level)
  local which = index and ("value #%d"):format(index) or "the value"
  if value == nil then
    error(("%s: %s for queue %q is nil (publish pgcoord.null for a JSON null)")
      :format(where, which, self.name), level + 1)
  end
  local ok, payload = pcall(json.encode, value)
  if not ok then
    error(("%s: %s for queue %q cannot be encoded as JSON: %s")
      :format(where, which, self.name, error_text(payload)), level + 1)
  end
  return payload
end

-- Bounds of the options, in seconds and counts.  Below the floors a
-- consumer would spin: it polls every poll_interval, renews leases every
-- visibility_timeout / 3 and retries a failing message after retry_delay.
-- Above a year, now() + the interval nears the end of PostgreSQL's
-- timestamp range (and nothing in a queue waits that long).  A claim
-- takes at most CLAIM_BATCH rows, so that it and the start of its handlers
-- hold the loop briefly; MAX_CONCURRENCY bounds the handlers of a consumer
-- (and the leases its renewal statement carries).
local MIN_POLL, MIN_LEASE, MIN_RETRY = 0.01, 0.1, 0.01
local MAX_SECONDS = 365 * 86400
local MAX_CONCURRENCY = 10000
local MAX_DELIVERIES = 0x7fffffff   -- deliveries is an integer column
local CLAIM_BATCH = 500             -- rows per claim statement

-- opts[name], a number of seconds from min to max (default when absent).
local function seconds_option(where, opts, name, default, min)
  local v = opts[name]
  if v == nil then return default end
  if type(v) ~= "number" or not (v >= min and v <= MAX_SECONDS) then
    error(("%s: option %s must be a number of seconds from %s to %d, got %s")
      :format(where, name, min, MAX_SECONDS, tostring(v)), 3)
  end
  return v
end

-- opts[name], an integer from 1 to max (default when absent).
local function integer_option(where, opts, name, default, max)
  local v = opts[name]
  if v == nil then return default end
  if math.type(v) ~= "integer" or v < 1 or v > max then
    error(("%s: option %s must be an integer from 1 to %d, got %s")
      :format(where, name, max, tostring(v)), 3)
  end
  return v
end

local check_options = store.check_options

-- The error of a refused fence: SQLSTATE 55P03 (lock_not_available).
local function fence_error(c, entry, why)
  return core.error("55P03", ("msg:fence: message %d (delivery %d) of queue %q, subscription %q:"
    .. " %s; the transaction must not commit"):format(entry.id, entry.n, c.queue,
      c.subscription, why))
end

-- In the handler's transaction tx (on the queue's database): raises
-- unless this delivery is still the current one, and keeps it current
-- until tx ends, so the writes in tx commit only while the lease holds.
function Message:fence(tx)
  local entry = leases[self]
  if not entry then error("msg:fence: expected a message given to a queue handler", 2) end
  if type(tx) ~= "table" or type(tx.query) ~= "function" or tx.size ~= nil then
    local got = type(tx) == "table" and tx.size ~= nil and "a pool" or type(tx)
    error(("msg:fence: expected a transaction (the tx of db:tx), got %s: a fence holds only"
      .. " until its transaction ends"):format(got), 2)
  end
  return entry.consumer:_fence(tx, entry)
end

-- ---- the queue -----------------------------------------------------------------

local QUEUE_OPTIONS = { ordered = true, retention = true, subscriber = true }

function queue.new(pool, name, opts)
  if type(pool) ~= "table" or type(pool.query) ~= "function" or not pool.size then
    error("pgcoord.queue: expected a pool from pgcoord.connect", 2)
  end
  check_name("pgcoord.queue", "name", name, 2)
  opts = check_options("pgcoord.queue", opts, QUEUE_OPTIONS)
  if opts.ordered ~= nil and type(opts.ordered) ~= "boolean" then
    error(("pgcoord.queue: option ordered must be a boolean, got %s")
      :format(tostring(opts.ordered)), 2)
  end
  local sub = opts.subscriber
  if sub ~= nil and (type(sub) ~= "table" or type(sub.add) ~= "function") then
    error("pgcoord.queue: option subscriber must be a pgcoord.subscriber", 2)
  end
  return setmetatable({
    pool = pool,
    name = name,
    ordered = opts.ordered,     -- nil: as the subscription was created
    retention = seconds_option("pgcoord.queue", opts, "retention", 300, 0),
    shared_subscriber = sub,
    sub = nil,                  -- the subscriber consumers listen through
    consumers = {},             -- consumer -> true, while running
  }, Queue)
end

-- Creates subscription `name` if it does not exist; true when it was
-- created.  Only messages published after this are copied to it.
function Queue:subscribe(name)
  check_name("q:subscribe", "subscription name", name, 2)
  local pool = self.pool
  pool:exec(QUEUE_CREATE, self.name)
  local qid = pool:one(QUEUE_ID, self.name).id
  local row = pool:one(SUBSCRIBE, qid, name, self.ordered == true)
  if row then
    log.info("queue subscription created", { queue = self.name, subscription = name,
      ordered = row.ordered })
    return true
  end
  local existing = pool:one(SUBSCRIPTION, self.name, name)
  if existing and self.ordered ~= nil and existing.ordered ~= self.ordered then
    error(("q:subscribe: subscription %q of queue %q exists and is %s; this queue handle"
      .. " says ordered = %s"):format(name, self.name,
        existing.ordered and "ordered" or "unordered", tostring(self.ordered)), 2)
  end
  return false
end

-- Looks up a subscription; raises naming it when it does not exist.
function Queue:_subscription(where, name, level)
  check_name(where, "subscription name", name, level + 1)
  local row = self.pool:one(SUBSCRIPTION, self.name, name)
  if not row then
    error(("%s: queue %q has no subscription %q (q:subscribe creates it)")
      :format(where, self.name, name), level + 1)
  end
  return row
end

-- Drops subscription `name` with every delivery it holds; true if it existed.
function Queue:unsubscribe(name)
  check_name("q:unsubscribe", "subscription name", name, 2)
  local removed = self.pool:tx(function(tx)
    local row = tx:one(SUBSCRIPTION, self.name, name)
    if not row then return false end
    tx:query("SELECT pg_advisory_xact_lock($1, $2)", SWEEP_LOCK, row.queue_id)
    -- Waits for publishers that hold the row FOR KEY SHARE; the ones that
    -- come after no longer see it.
    tx:exec("DELETE FROM pgcoord.queue_subscriptions WHERE id = $1", row.id)
    local total = 0
    while true do
      local gone = tx:query(UNSUBSCRIBE_BATCH, row.id, SWEEP_BATCH)
      if #gone == 0 then break end
      total = total + #gone
      local ids = {}
      for i, r in ipairs(gone) do ids[i] = r.id end
      tx:exec(DROP_MESSAGES, int_array(ids), row.queue_id)
    end
    return total
  end)
  if not removed then return false end
  log.info("queue subscription dropped", { queue = self.name, subscription = name,
    deliveries = removed })
  return true
end

-- Names of the queues this process published to, by id: a deadlock
-- report names queues by id, and the transaction it aborted can no
-- longer look them up.
local queue_names = {}

local function queue_label(id)
  local name = queue_names[id]
  return name and ("%q"):format(name) or ("with id %d"):format(id)
end

-- A deadlock on the publish locks of ordered queues, reported by the
-- server as advisory locks [db,PUBLISH_LOCK,queue id,2], comes back as an
-- error that names the queues and says what to do.  Other errors pass.
local function publish_error(self, where, err)
  if not (db.is_error(err) and err.sqlstate == "40P01") then return err end
  local labels, seen = {}, {}
  for key, id in tostring(err.detail or ""):gmatch("advisory lock %[%d+,(%d+),(%d+),2%]") do
    id = tonumber(id)
    if tonumber(key) == PUBLISH_LOCK and not seen[id] then
      seen[id] = true
      labels[#labels + 1] = queue_label(id)
    end
  end
  if #labels == 0 then return err end
  table.sort(labels)
  local e = core.error("40P01", ("%s: deadlock publishing to queue %q: transactions waited for"
    .. " each other's publish locks of ordered queues (%s). An ordered queue's publish lock is"
    .. " held until commit: in every transaction, publish to ordered queues in one order"
    .. " (by name, say), before taking other locks; this transaction is aborted, run it again")
    :format(where, self.name, table.concat(labels, ", ")))
  e.detail = err.detail
  return e
end

-- Runs a publish statement; remembers the queue's name for publish_error.
function Queue:_publish(where, db_or_tx, sql, payload)
  local ok, row = pcall(db_or_tx.one, db_or_tx, sql, self.name, payload)
  if not ok then error(publish_error(self, where, row), 0) end
  if row.queue_id then queue_names[row.queue_id] = self.name end
  return row
end

-- Publishes value to every current subscription, in db_or_tx's
-- transaction; returns the message id (nil when there was no
-- subscription) and the number of copies.
function Queue:publish(db_or_tx, value)
  check_db("q:publish", db_or_tx, 2)
  local payload = encode(self, "q:publish", value, nil, 2)
  local row = self:_publish("q:publish", db_or_tx, PUBLISH, payload)
  return row.id, row.copies
end

-- Publishes a list of values in one statement; returns their ids in order
-- (empty when there was no subscription) and the number of copies of each.
function Queue:publish_many(db_or_tx, values)
  check_db("q:publish_many", db_or_tx, 2)
  if type(values) ~= "table" then
    error(("q:publish_many: expected a list of values, got %s"):format(type(values)), 2)
  end
  local n = values.n or #values
  if n == 0 then return {}, 0 end
  local parts = {}
  for i = 1, n do parts[i] = encode(self, "q:publish_many", values[i], i, 2) end
  local row = self:_publish("q:publish_many", db_or_tx, PUBLISH_MANY,
    "[" .. table.concat(parts, ",") .. "]")
  return row.ids or {}, row.copies
end

-- Dead letters of a subscription, oldest first: { id, payload,
-- published_at, deliveries, last_error, last_delivered_at }; a payload
-- that cannot be decoded is absent, and payload_error says why.
function Queue:dead(name, opts)
  opts = check_options("q:dead", opts, { limit = true })
  local limit = integer_option("q:dead", opts, "limit", 1000, 100000)
  local sub = self:_subscription("q:dead", name, 2)
  local rows = self.pool:query(DEAD, sub.id, limit)
  rows.affected = nil
  for _, r in ipairs(rows) do
    local ok, payload = pcall(json_decode, r.payload)
    if ok then r.payload = payload else r.payload, r.payload_error = nil, error_text(payload) end
  end
  return rows
end

-- Moves dead letters (all, or those with the given message ids) back to
-- pending with a fresh delivery count; returns how many.
function Queue:requeue_dead(name, ids)
  local list
  if ids ~= nil then
    if type(ids) ~= "table" then ids = { ids } end
    for i, id in ipairs(ids) do
      if math.type(id) ~= "integer" then
        error(("q:requeue_dead: ids must be integers, got %s at position %d")
          :format(tostring(id), i), 2)
      end
    end
    list = int_array(ids)
  end
  local sub = self:_subscription("q:requeue_dead", name, 2)
  local row = self.pool:one(REQUEUE_DEAD, sub.id, list, sub.queue_id)
  if row.requeued > 0 then
    log.info("queue dead letters requeued", { queue = self.name, subscription = name,
      messages = row.requeued })
  end
  return row.requeued
end

-- Counts for a subscription: pending (delayed: leased or backing off),
-- dead, acked (still retained); last_delivered_at and last_acked_at.
function Queue:stats(name)
  local sub = self:_subscription("q:stats", name, 2)
  local row = self.pool:one(STATS, sub.id)
  row.ordered = sub.ordered
  return row
end

-- ---- wake-ups: one subscriber per queue handle (or the one given) ------------------

function Queue:_wake_all()
  for c in pairs(self.consumers) do c:_wake() end
end

function Queue:_subscriber()
  if not self.sub then
    self.sub = self.shared_subscriber or require("pgcoord").subscriber(self.pool)
    self.own_subscriber = self.shared_subscriber == nil
  end
  return self.sub
end

-- One reader per queue channel and handle wakes the consumers that have
-- a free handler.  A notification is only a wake-up: the listener keeps at
-- most one (its filter turns the others away), so a burst of publishes
-- costs one wake-up of each consumer, not one per message.
function Queue:_listen(consumer)
  local sub = self:_subscriber()
  -- (re)connected: notifications may have been missed
  self.unhook = self.unhook or sub:hook_reconnect(function() self:_wake_all() end)
  local channel = "pgcoord_queue_" .. consumer.queue_id
  local fan = sub:channel(channel)
  if self.own_subscriber and not fan.recovery then fan:enable_recovery(sub) end
  consumer.fan = fan
  self.consumers[consumer] = true
  self.readers = self.readers or {}
  if not self.readers[channel] then
    local listener
    listener = fan:listen({ buffer = 1, filter = function() return listener:pending() == 0 end })
    local queue_id = consumer.queue_id
    self.readers[channel] = listener
    task.spawn(function()
      while listener:receive() ~= nil do
        for c in pairs(self.consumers) do
          if c.queue_id == queue_id and c.running < c.concurrency then c:_wake() end
        end
      end
    end)
  end
  if self.own_subscriber and not sub.running then sub:start() end
end

function Queue:_unlisten(consumer)
  self.consumers[consumer] = nil
  local channel = "pgcoord_queue_" .. consumer.queue_id
  for c in pairs(self.consumers) do
    if c.queue_id == consumer.queue_id then channel = nil break end
  end
  if channel and self.readers and self.readers[channel] then
    self.readers[channel]:close()
    self.readers[channel] = nil
  end
  if next(self.consumers) == nil then
    if self.unhook then self.unhook() end
    self.unhook = nil
    if self.own_subscriber and self.sub then self.sub:stop() end
  end
end

-- ---- consuming -------------------------------------------------------------------

local CONSUME_OPTIONS = {
  concurrency = true, poll_interval = true, visibility_timeout = true, max_deliveries = true,
  retry_delay = true, max_retry_delay = true,
}

-- Starts consuming subscription `name`: fn(msg) with msg = { id, payload,
-- published_at, deliveries, last_error }; returning acks, returning false
-- or raising requeues.  Returns the consumer (consumer:stop()).
function Queue:consume(name, fn, opts)
  local where = "q:consume"
  check_name(where, "subscription name", name, 2)
  if type(fn) ~= "function" then
    error(("%s: handler must be a function, got %s"):format(where, type(fn)), 2)
  end
  opts = check_options(where, opts, CONSUME_OPTIONS)
  local o = {
    concurrency = integer_option(where, opts, "concurrency", 1, MAX_CONCURRENCY),
    poll_interval = seconds_option(where, opts, "poll_interval", 5, MIN_POLL),
    visibility_timeout = seconds_option(where, opts, "visibility_timeout", 30, MIN_LEASE),
    max_deliveries = integer_option(where, opts, "max_deliveries", nil, MAX_DELIVERIES),
    retry_delay = seconds_option(where, opts, "retry_delay", 1, MIN_RETRY),
    max_retry_delay = seconds_option(where, opts, "max_retry_delay", 300, MIN_RETRY),
  }
  if o.max_retry_delay < o.retry_delay then
    error(("%s: max_retry_delay (%s) must not be less than retry_delay (%s)")
      :format(where, o.max_retry_delay, o.retry_delay), 2)
  end
  local sub = self:_subscription(where, name, 2)
  if self.ordered ~= nil and sub.ordered ~= self.ordered then
    error(("%s: subscription %q of queue %q is %s; this queue handle says ordered = %s")
      :format(where, name, self.name, sub.ordered and "ordered" or "unordered",
        tostring(self.ordered)), 2)
  end
  if sub.ordered and o.concurrency ~= 1 then
    error(("%s: subscription %q of queue %q is ordered, which allows one message in flight:"
      .. " concurrency must be 1, got %d"):format(where, name, self.name, o.concurrency), 2)
  end
  local c = setmetatable(o, Consumer)
  c.q, c.pool, c.fn = self, self.pool, fn
  c.queue, c.subscription = self.name, name
  c.subscription_id, c.queue_id, c.ordered = sub.id, sub.queue_id, sub.ordered
  c.state = "running"          -- running, stopping, stopped
  c.wake = task.cond()         -- the claim loop sleeps here
  c.woken, c.timer_woke = false, false
  c.running = 0                -- handlers in progress
  c.in_flight = {}             -- message id -> { n = delivery count, task = }
  c.acks, c.ack_wake = {}, task.cond()
  c.keeper_wake = task.cond()
  c.done = task.cond()
  c.counters = { handled = 0, acked = 0, requeued = 0, dead = 0, lost = 0, fenced = 0 }
  self:_listen(c)
  c.loop_task = task.spawn(c._loop, c)
  c.ack_task = task.spawn(c._ack_loop, c)
  c.keeper_task = task.spawn(c._keeper, c)
  require("pgcoord").on_stop(function() c:stop() end)
  log.info("queue consumer started", { queue = self.name, subscription = name,
    ordered = sub.ordered, concurrency = o.concurrency })
  return c
end

-- Wakes the claim loop; a wake-up that comes while it is busy is kept.
function Consumer:_wake()
  self.woken = true
  self.wake:signal()
end

-- Sleeps unless woken meanwhile; timer_woke says whether the timer, and
-- nothing else, ended the sleep (see fan:polled in the claim loop).
function Consumer:_sleep(timeout)
  local by_timer = false
  if not self.woken then
    local _, err = self.wake:wait(timeout)
    by_timer = err == "timeout" and not self.woken
  end
  self.timer_woke = by_timer
  self.woken = false
end

function Consumer:_fields(extra)
  local f = { queue = self.queue, subscription = self.subscription }
  for k, v in pairs(extra or {}) do f[k] = v end
  return f
end

function Consumer:_claim(n)
  local rows = self.pool:query(self.ordered and CLAIM_HEAD or CLAIM, self.subscription_id, n,
    self.max_deliveries, self.visibility_timeout)
  table.sort(rows, function(a, b) return a.id < b.id end)
  return rows
end

-- Starts a handler per claimed row; returns how many were first
-- deliveries.  Rows claimed while a stop began are handed back instead.
function Consumer:_start(rows)
  local fresh = 0
  for _, row in ipairs(rows) do
    if row.state == "dead" then
      self.counters.dead = self.counters.dead + 1
      log.warn("queue message moved to the dead letters", self:_fields({ message = row.id,
        deliveries = row.deliveries, reason = row.last_error }))
    elseif self.state ~= "running" then
      self.abandoned = self.abandoned or {}
      self.abandoned[#self.abandoned + 1] = { row.id, row.deliveries }
    else
      if row.deliveries == 1 then fresh = fresh + 1 end
      local entry = { n = row.deliveries, id = row.id, consumer = self }
      self.in_flight[row.id] = entry
      self.running = self.running + 1
      entry.task = task.spawn(self._handle, self, row, entry)
    end
  end
  return fresh
end

-- The claim loop: claim while handlers are free, then sleep until a
-- handler ends, a notification or a reconnection comes, the next lease or
-- backoff ends, or poll_interval passes.
function Consumer:_loop()
  local failures, overdue = 0, 0
  while self.state == "running" do
    local free = self.concurrency - self.running
    local wait = self.poll_interval
    if free > 0 then
      local by_timer = self.timer_woke
      self.woken, self.timer_woke = false, false
      local asked = math.min(free, CLAIM_BATCH)
      local ok, rows = pcall(self._claim, self, asked)
      if not ok then
        failures = failures + 1
        wait = math.min(self.poll_interval, 0.05 * 2 ^ failures)
        log.warn("queue claim failed", self:_fields({ error = error_text(rows) }))
      else
        failures = 0
        local fresh = self:_start(rows)
        -- first deliveries found by the timer: no notification announced them
        if by_timer and fresh > 0 then self.fan:polled(fresh) end
        -- a full batch: there may be more, claim again at once
        if #rows == asked and asked < free then self.woken = true end
        if #rows > 0 then overdue = 0 end
        if #rows == 0 then
          local dok, row = pcall(self.pool.one, self.pool,
            self.ordered and NEXT_DUE_HEAD or NEXT_DUE, self.subscription_id)
          if dok and not row.subscribed then
            log.warn("queue subscription dropped, consumer stopping", self:_fields())
            task.spawn(self.stop, self)
            return
          end
          local next_in = dok and row.next_in
          -- due, yet not claimed: another consumer is claiming it, or a
          -- fenced transaction holds it; look again soon, less often each time
          overdue = next_in and next_in <= 0 and overdue + 1 or 0
          if next_in then
            wait = math.min(wait, math.max(next_in, 0.01 * 2 ^ math.min(overdue, 8)))
          end
        elseif self.next_due then
          wait = math.min(wait, math.max(self.next_due - core.now(), 0.01))
        end
        if self.next_due and self.next_due <= core.now() + wait then self.next_due = nil end
      end
    end
    if self.state == "running" then self:_sleep(wait) end
  end
end

local function backoff(self, deliveries)
  return math.min(self.max_retry_delay, self.retry_delay * 2 ^ (deliveries - 1))
end

-- Retries fn(...) while the database fails, up to `tries` times.
function Consumer:_persist(what, tries, fn, ...)
  local delay = 0.05
  for attempt = 1, tries do
    local ok, a = pcall(fn, ...)
    if ok then return true, a end
    log.warn("queue " .. what .. " failed", self:_fields({ error = error_text(a),
      attempt = attempt }))
    if attempt < tries then
      task.sleep(delay)
      delay = math.min(delay * 2, 2)
    end
  end
  return false
end

function Consumer:_requeue(id, n, reason)
  local ok, rows = self:_persist("requeue", 5, self.pool.query, self.pool, REQUEUE,
    self.subscription_id, id, n, self.max_deliveries, backoff(self, n),
    json.clean_text(reason, ERROR_LIMIT))
  if not ok then return end
  local row = rows[1]
  if not row then
    self.counters.lost = self.counters.lost + 1
    log.warn("queue lease lost before the requeue; another consumer has the message",
      self:_fields({ message = id, deliveries = n }))
  elseif row.state == "dead" then
    self.counters.dead = self.counters.dead + 1
    log.warn("queue message moved to the dead letters", self:_fields({ message = id,
      deliveries = n, reason = reason }))
  else
    self.counters.requeued = self.counters.requeued + 1
  end
end

-- The three arrays of BY_TOKEN for a list of { message id, delivery count }.
function Consumer:_token_arrays(list)
  local sids, ids, ns = {}, {}, {}
  local sid = self.subscription_id
  for i, a in ipairs(list) do sids[i], ids[i], ns[i] = sid, a[1], a[2] end
  return int_array(sids), int_array(ids), int_array(ns)
end

function Consumer:_ack_now(batch)
  local rows = self.pool:query(ACK, self:_token_arrays(batch))
  self.counters.acked = self.counters.acked + #rows
  if #rows < #batch then
    local done = {}
    for _, r in ipairs(rows) do done[r.id] = true end
    for _, a in ipairs(batch) do
      if not done[a[1]] then
        self.counters.lost = self.counters.lost + 1
        log.warn("queue lease lost before the ack; the message may be handled again",
          self:_fields({ message = a[1], deliveries = a[2] }))
      end
    end
  end
end

function Consumer:_ack_claim_head(id, n)
  local r = self.pool:one(ACK_CLAIM_HEAD, self.subscription_id, 1, self.max_deliveries,
    self.visibility_timeout, id, n)
  if r.acked == 0 then
    self.counters.lost = self.counters.lost + 1
    log.warn("queue lease lost before the ack; the message may be handled again",
      self:_fields({ message = id, deliveries = n }))
    return
  end
  self.counters.acked = self.counters.acked + 1
  if r.id then self:_start({ r }) end
end

-- Requeues a delivery that failed (reason: why), with backoff.
function Consumer:_failed(row, entry, reason)
  entry.outcome = "requeue"
  local due = core.now() + backoff(self, entry.n)
  if not self.next_due or due < self.next_due then self.next_due = due end
  self:_requeue(row.id, entry.n, reason)
end

-- A handler task: decodes the payload, runs fn, then acks or requeues.
-- The slot is given back by a to-be-closed variable, so a cancelled
-- handler gives it back too.
function Consumer:_handle(row, entry)
  local _ <close> = setmetatable({}, { __close = function()
    if self.in_flight[row.id] == entry then
      self.in_flight[row.id] = nil
      if not entry.outcome then
        self.abandoned = self.abandoned or {}
        self.abandoned[#self.abandoned + 1] = { row.id, entry.n }
      end
    end
    self.running = self.running - 1
    self:_wake()
  end })
  local decoded, payload = pcall(json_decode, row.payload)
  if not decoded then
    -- a poison message: a delivery that failed, so max_deliveries ends it
    local reason = "the payload cannot be decoded: " .. error_text(payload)
    log.error("queue message payload cannot be decoded", self:_fields({ message = row.id,
      deliveries = row.deliveries, error = reason }))
    return self:_failed(row, entry, reason)
  end
  local msg = setmetatable({ id = row.id, payload = payload, published_at = row.published_at,
                deliveries = row.deliveries, last_error = row.last_error }, Message)
  leases[msg] = entry
  local ok, res = xpcall(self.fn, task.traced, msg)
  self.counters.handled = self.counters.handled + 1
  if ok and res ~= false then
    entry.outcome = "ack"
    if self.ordered then
      -- the next claim must see this ack: write it before the slot frees,
      -- and claim the next head with it
      if self.state == "running" then
        self:_persist("ack", 5, self._ack_claim_head, self, row.id, entry.n)
      else
        self:_persist("ack", 5, self._ack_now, self, { { row.id, entry.n } })
      end
    else
      self.acks[#self.acks + 1] = { row.id, entry.n }
      self.ack_wake:signal()
    end
    return
  end
  if not ok and task.is_cancelled(res) then error(res, 0) end
  local reason
  if ok then
    reason = "the handler returned false"
  else
    reason = error_text(res.err)
    log.error("queue handler failed", self:_fields({ message = row.id,
      deliveries = row.deliveries, error = reason, traceback = res.trace }))
  end
  self:_failed(row, entry, reason)
end

-- msg:fence(tx): see Message:fence.  Raises (55P03) unless the delivery
-- is still current; otherwise its row stays locked until tx ends.
function Consumer:_fence(tx, entry)
  if entry.outcome or self.in_flight[entry.id] ~= entry then
    error(fence_error(self, entry, "its handler has ended"), 0)
  end
  if not tx:one(FENCE, self.subscription_id, entry.id, entry.n) then
    self.counters.fenced = self.counters.fenced + 1
    log.warn("queue fence refused a write: the lease was lost", self:_fields({
      message = entry.id, deliveries = entry.n }))
    error(fence_error(self, entry, "its lease was lost (another consumer has the message,"
      .. " or it was acked or dead-lettered)"), 0)
  end
end

-- Writes acks in batches: whatever accumulated while the last batch was
-- being written goes in the next, so batches grow with the load.
function Consumer:_ack_loop()
  local failures = 0
  while true do
    if #self.acks == 0 then
      if self.state == "stopped" then return end
      self.ack_wake:wait()
    else
      local batch = self.acks
      if #batch > ACK_BATCH then
        batch = table.move(self.acks, 1, ACK_BATCH, 1, {})
        self.acks = table.move(self.acks, ACK_BATCH + 1, #self.acks, 1, {})
      else
        self.acks = {}
      end
      local ok, err = pcall(self._ack_now, self, batch)
      if ok then
        failures = 0
      else
        failures = failures + 1
        table.move(self.acks, 1, #self.acks, #batch + 1, batch)
        self.acks = batch
        log.warn("queue ack failed", self:_fields({ error = error_text(err), attempt = failures,
          acks = #batch }))
        if self.state == "stopped" and failures >= 5 then
          log.error("queue acks not written; their messages will be delivered again",
            self:_fields({ acks = #batch }))
          self.acks = {}
          return
        end
        self.ack_wake:wait(math.min(2, 0.05 * 2 ^ failures))
      end
    end
  end
end

-- Renews the leases of running handlers every visibility_timeout / 3,
-- and sweeps acked rows past retention now and then.
function Consumer:_keeper()
  local renew_every = self.visibility_timeout / 3
  local sweep_every = math.min(60, math.max(1, self.q.retention / 2))
  local next_renew = core.now() + renew_every
  local next_sweep = core.now() + math.random() * sweep_every
  while self.state ~= "stopped" do
    self.keeper_wake:wait(math.max(0, math.min(next_renew, next_sweep) - core.now()))
    if self.state == "stopped" then break end
    if core.now() >= next_renew then
      next_renew = core.now() + renew_every
      self:_renew()
    end
    if core.now() >= next_sweep then
      next_sweep = core.now() + sweep_every
      local ok, err = pcall(queue.sweep, self.pool, self.queue_id, self.q.retention)
      if not ok then log.warn("queue sweep failed", self:_fields({ error = error_text(err) })) end
    end
  end
end

function Consumer:_renew()
  local list = {}
  for id, entry in pairs(self.in_flight) do
    if not entry.outcome then list[#list + 1] = { id, entry.n } end
  end
  if #list == 0 then return end
  local sids, ids, ns = self:_token_arrays(list)
  local ok, row = pcall(self.pool.one, self.pool, RENEW, sids, ids, ns, self.visibility_timeout)
  if not ok then
    log.warn("queue lease renewal failed", self:_fields({ error = error_text(row) }))
  elseif row.current < #list then
    log.warn("queue leases lost while their handlers run; the messages may be handled twice",
      self:_fields({ lost = #list - row.current }))
  end
end

-- Deletes acked deliveries older than retention seconds, and the messages
-- no subscription holds any longer, for one queue; skips if another
-- process is sweeping it.  Returns the number of deliveries deleted.
function queue.sweep(pool, queue_id, retention)
  local total = 0
  for _ = 1, 20 do
    local n = pool:tx(function(tx)
      if not tx:one("SELECT pg_try_advisory_xact_lock($1, $2) AS ok", SWEEP_LOCK, queue_id).ok then
        return 0
      end
      local gone = tx:query(SWEEP_ACKED, queue_id, retention, SWEEP_BATCH)
      if #gone == 0 then return 0 end
      local ids = {}
      for i, r in ipairs(gone) do ids[i] = r.id end
      tx:exec(DROP_MESSAGES, int_array(ids), queue_id)
      return #gone
    end)
    total = total + n
    if n < SWEEP_BATCH then break end
  end
  return total
end

-- Hands back the messages of cancelled handlers.
function Consumer:_release_abandoned()
  local list = self.abandoned
  self.abandoned = nil
  if not list or #list == 0 then return end
  local sids, ids, ns = self:_token_arrays(list)
  local ok, err = pcall(self.pool.one, self.pool, RELEASE, sids, ids, ns,
    "handed back unfinished when the consumer stopped", self.queue_id)
  if not ok then
    log.warn("queue could not hand back cancelled messages; they return when their leases end",
      self:_fields({ error = error_text(err), messages = #list }))
  end
end

function Consumer:_shutdown(timeout)
  self.wake:signal()
  self.q:_unlisten(self)
  self.loop_task:wait()
  local deadline = timeout and core.now() + timeout
  local handlers = {}
  for id, entry in pairs(self.in_flight) do handlers[id] = entry.task end
  for id, t in pairs(handlers) do
    if not t:wait(deadline and math.max(0, deadline - core.now())) then
      log.warn("queue handler still running at the stop deadline, cancelling",
        self:_fields({ message = id }))
      t:cancel()
    end
  end
  -- a handler cancelled before it started never gave its slot back
  for id, entry in pairs(self.in_flight) do
    self.in_flight[id] = nil
    self.running = self.running - 1
    self.abandoned = self.abandoned or {}
    self.abandoned[#self.abandoned + 1] = { id, entry.n }
  end
  self:_release_abandoned()
  self.state = "stopped"
  self.ack_wake:signal()
  self.keeper_wake:signal()
  self.ack_task:wait()
  self.keeper_task:wait()
  log.info("queue consumer stopped", self:_fields({ handled = self.counters.handled }))
  self.finished = true
  self.done:signal()
end

-- Stops taking messages, lets the running handlers finish (cancelling
-- them after timeout seconds, if given: their messages are handed back at
-- once), writes their acks, and returns once all that is done.
function Consumer:stop(timeout)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout or timeout < 0) then
    error(("consumer:stop: timeout must be a number >= 0, got %s"):format(tostring(timeout)), 2)
  end
  if self.state == "running" then
    self.state = "stopping"
    task.spawn(self._shutdown, self, timeout)
  end
  -- a handler that stops its own consumer cannot wait for itself
  local current = task.current()
  for _, entry in pairs(self.in_flight) do
    if entry.task == current then return end
  end
  while not self.finished do self.done:wait() end
end

function Consumer:stats()
  local c = self.counters
  return { state = self.state, running = self.running, handled = c.handled, acked = c.acked,
           requeued = c.requeued, dead = c.dead, lost = c.lost, fenced = c.fenced,
           unacked = #self.acks }
end

return queue

-- Every statement and channel name of the queue (the tables and why they
-- look as they do: sql/003_queue.sql).  Part of the primitives layer.
local db = require "pgcoord.db"

local sql = {}

-- Advisory lock keys (pg_advisory_xact_lock(int, int)); SWEEP_LOCK's
-- second key is the queue id.  Publishers to a
-- queue with an ordered subscription hold PUBLISH_LOCK until commit, so
-- that message ids follow commit order; it is one lock for every ordered
-- queue (second key 0), not one per queue, so that transactions that
-- publish to several ordered queues in different orders cannot deadlock.
local PUBLISH_LOCK = 0x70677170 -- "pgqp"
local SWEEP_LOCK = 0x70677167   -- "pgqg": whoever deletes deliveries and messages

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
         CASE WHEN t.ordered THEN pg_advisory_xact_lock(%d, 0)::text END AS locked
    FROM (SELECT queue_id, bool_or(ordered) AS ordered FROM subs GROUP BY queue_id) t),
]]):format(PUBLISH_LOCK)

-- The copies' columns and values: visible at once, or later (a delayed
-- publish): at $4, epoch seconds, or else $3 seconds after now(), the
-- database's clock.  The NOTIFY goes out either way: a consumer that
-- finds nothing visible sleeps until the next row is due.
local AT_ONCE = { columns = "", values = "" }
local DELAYED = { columns = ", visible_at",
  values = ", coalesce(to_timestamp($4::float8), now() + make_interval(secs => $3::float8))" }

-- One message; the NOTIFY is delivered at commit, and never on rollback.
local function publish_one(copies)
  return PUBLISH_TARGET .. ([[
msgs AS (
  INSERT INTO pgcoord.queue_messages (queue_id, payload)
  SELECT queue_id, $2::json FROM target
  RETURNING id),
copies AS (
  INSERT INTO pgcoord.queue_deliveries (subscription_id, message_id%s)
  SELECT s.id, m.id%s FROM subs s, msgs m),
wake AS (
  SELECT pg_notify('pgcoord_queue_' || queue_id, '') FROM target)
SELECT (SELECT id FROM msgs) AS id, (SELECT count(*) FROM subs) AS copies,
       (SELECT count(*) FROM wake) AS notified]]):format(copies.columns, copies.values)
end

-- Many messages ($2, a JSON array of payloads), ids in array order.
local function publish_many(copies)
  return PUBLISH_TARGET .. ([[
msgs AS (
  INSERT INTO pgcoord.queue_messages (queue_id, payload)
  SELECT t.queue_id, v.payload
    FROM target t, json_array_elements($2::json) WITH ORDINALITY AS v(payload, n)
   ORDER BY v.n
  RETURNING id),
copies AS (
  INSERT INTO pgcoord.queue_deliveries (subscription_id, message_id%s)
  SELECT s.id, m.id%s FROM subs s, msgs m),
wake AS (
  SELECT pg_notify('pgcoord_queue_' || queue_id, '') FROM target)
SELECT (SELECT json_agg(id ORDER BY id) FROM msgs) AS ids, (SELECT count(*) FROM subs) AS copies,
       (SELECT count(*) FROM wake) AS notified]]):format(copies.columns, copies.values)
end

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
-- `picked` only (one index probe per row, as with BY_TOKEN below); its
-- `d.subscription_id = $1` is what makes the probe one: without it the
-- generic plan of the prepared claim probes by message_id alone, the
-- index's second column, and walks the whole pending index for each row
-- (24 rows, 2,384 buffers, halfway through a drain of 50,000).  A row
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
 WHERE d.subscription_id = $1
   AND d.subscription_id = p.subscription_id AND d.message_id = p.message_id
   AND d.state = 'pending' AND d.visible_at <= now()
   AND m.id = d.message_id
RETURNING d.message_id AS id, d.state, d.deliveries, d.last_error, m.payload::text AS payload,
          m.published_at]]

-- The rows of a batch named by arrays (see BY_TOKEN) lie in one
-- subscription (the first of the subscription ids SIDS: they are all the
-- same) between the least and the greatest of the message ids IDS: as
-- index conditions, these bound what any plan reads (see BY_TOKEN).
local function in_batch(sids, ids)
  return ([[d.subscription_id = (%s::bigint[])[1]
     AND d.message_id BETWEEN (SELECT min(i) FROM unnest(%s::bigint[]) i)
                          AND (SELECT max(i) FROM unnest(%s::bigint[]) i)]]):format(sids, ids, ids)
end

-- Unordered: acks the deliveries named by $5, $6 and $7 (the arrays of
-- BY_TOKEN, below, and bounded as there; empty when there is nothing to
-- ack), then claims the first visible pending rows that nobody else is claiming: the acks of
-- the handlers that ended ride on the claim that refills their slots, one
-- round trip for both.  The claim passes by the rows being acked (a
-- statement must not change a row twice; a row whose lease ran out while
-- its ack waited would otherwise be both) and those the consumer has in
-- hand ($8: a handler's lease lapses while its fenced transaction holds the
-- row, see RENEW, and the consumer must not take the message again the
-- moment that commits, before the handler's ack).  It looks from message id
-- $9 on (0: from the first): during a backlog, past the index entries the
-- acks left behind (see the consumer's floor).  One row at least: acked (how
-- many acks went through), lost (the ids of those that did not, as an
-- array's text, only when some did not) and the claimed message's
-- columns, if any.
local CLAIM = [[
WITH acked AS (
  UPDATE pgcoord.queue_deliveries d
     SET state = 'acked', acked_at = now()
    FROM unnest($5::bigint[], $6::bigint[], $7::integer[]) AS a(sid, id, n)
   WHERE d.subscription_id = a.sid AND d.message_id = a.id AND d.deliveries = a.n
     AND ]] .. in_batch("$5", "$6") .. [[

     AND d.state = 'pending'
  RETURNING d.message_id),
picked AS (
  SELECT subscription_id, message_id FROM pgcoord.queue_deliveries
   WHERE subscription_id = $1 AND state = 'pending' AND visible_at <= now()
     AND message_id <> ALL ($6::bigint[]) AND message_id <> ALL ($8::bigint[])
     AND message_id >= $9
   ORDER BY message_id
   LIMIT $2
     FOR UPDATE SKIP LOCKED),
claimed AS (
]] .. CLAIM_UPDATE .. [[),
outcome AS (
  SELECT count(*) AS acked,
         CASE WHEN count(*) < cardinality($6::bigint[])
              THEN array(SELECT unnest($6::bigint[]) EXCEPT SELECT message_id FROM acked)::text
         END AS lost
    FROM acked)
SELECT o.acked, o.lost, c.* FROM outcome o LEFT JOIN claimed c ON true]]

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
-- pending row of the subscription instead, once per batch.  Those
-- statistics still let it hash-join the arrays against a scan of the
-- whole pending index (a claim's acks read 42,513 of its entries for 16
-- rows in a backlog that grew the faster for it), so the subscription
-- (the arrays' first, as every element is the same) and the range of the
-- batch's ids are index conditions too: whatever the plan, it reads the
-- entries between the batch's first and last id, no more.
local BY_TOKEN = [[
  FROM unnest($1::bigint[], $2::bigint[], $3::integer[]) AS a(sid, id, n)
 WHERE d.subscription_id = a.sid AND d.message_id = a.id AND d.deliveries = a.n
   AND ]] .. in_batch("$1", "$2") .. [[

   AND d.state = 'pending']]

-- The three arrays of BY_TOKEN for subscription sid and a batch: { ids =
-- message ids, ns = their delivery counts }, two lists of one length.
function sql.token_arrays(sid, batch)
  local ids = batch.ids
  local k = #ids
  local sids = k == 0 and "{}" or "{" .. (sid .. ","):rep(k - 1) .. sid .. "}"
  return sids, db.int_array(ids, k), db.int_array(batch.ns, k)
end

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
   WHERE ]] .. in_batch("$1", "$2") .. [[

     AND d.state = 'pending']]

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
     AND ]] .. in_batch("$1", "$2") .. [[

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


-- The sweep lock, tried by a sweep (one sweeper per queue) and waited for
-- by an unsubscribe; the subscription row goes first.
local SWEEP_TRY_LOCK = "SELECT pg_try_advisory_xact_lock($1, $2) AS ok"
local SWEEP_WAIT_LOCK = "SELECT pg_advisory_xact_lock($1, $2)"
local DROP_SUBSCRIPTION = "DELETE FROM pgcoord.queue_subscriptions WHERE id = $1"

-- The channel publish notifies (the prefix of the pg_notify calls above).
function sql.channel(queue_id)
  return "pgcoord_queue_" .. queue_id
end

sql.PUBLISH_LOCK, sql.SWEEP_LOCK = PUBLISH_LOCK, SWEEP_LOCK

-- Lower-case names: also what scripts/bench/queue runs through pgbench.
sql.publish, sql.publish_many = publish_one(AT_ONCE), publish_many(AT_ONCE)
sql.publish_delayed, sql.publish_many_delayed = publish_one(DELAYED), publish_many(DELAYED)
sql.queue_create, sql.queue_id, sql.subscribe, sql.subscription =
  QUEUE_CREATE, QUEUE_ID, SUBSCRIBE, SUBSCRIPTION
sql.claim, sql.claim_head, sql.ack_claim_head = CLAIM, CLAIM_HEAD, ACK_CLAIM_HEAD
sql.fence, sql.next_due, sql.next_due_head = FENCE, NEXT_DUE, NEXT_DUE_HEAD
sql.ack, sql.requeue, sql.renew, sql.release = ACK, REQUEUE, RENEW, RELEASE
sql.sweep_acked, sql.drop_messages, sql.unsubscribe_batch =
  SWEEP_ACKED, DROP_MESSAGES, UNSUBSCRIBE_BATCH
sql.sweep_try_lock, sql.sweep_wait_lock, sql.drop_subscription =
  SWEEP_TRY_LOCK, SWEEP_WAIT_LOCK, DROP_SUBSCRIPTION
sql.dead, sql.requeue_dead, sql.stats = DEAD, REQUEUE_DEAD, STATS

return sql

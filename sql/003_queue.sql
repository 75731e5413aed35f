-- Durable queues with subscriptions (lua/pgcoord/queue.lua).
--
-- A queue is a named topic.  A published message is stored once in
-- queue_messages and copied, in the same statement, to one row of
-- queue_deliveries per subscription that exists at that moment; each
-- subscription then works through its own rows, and a message is removed
-- once no subscription holds it any longer.  Queue and subscription names
-- are data (columns, statement parameters), never SQL identifiers.

-- Queues: created by the first subscribe.  The integer id is the second
-- key of the queue's advisory locks (pg_advisory_xact_lock(int, int)) and
-- names its NOTIFY channel, pgcoord_queue_<id>, which stays well under the
-- 63-byte limit on channel names however long the queue's name is.
CREATE TABLE IF NOT EXISTS pgcoord.queues (
  id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  name text NOT NULL UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- Subscriptions: durable, whether or not a consumer runs.
--   ordered   fixed when the subscription is created: deliveries follow
--             publish order with one message in flight, and publishers to
--             a queue with an ordered subscription serialise (see below)
-- Publishers lock the subscription rows FOR KEY SHARE while they copy a
-- message, so an unsubscribe (which deletes the row) waits for them, and
-- a publish that comes after it no longer sees the row: no delivery is
-- ever written for a subscription that is gone.
CREATE TABLE IF NOT EXISTS pgcoord.queue_subscriptions (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  queue_id integer NOT NULL REFERENCES pgcoord.queues (id),
  name text NOT NULL,
  ordered boolean NOT NULL DEFAULT false,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (queue_id, name)
);

-- Messages: the payload once, however many subscriptions copy it.
--   id        drawn from the identity sequence.  For a queue with an
--             ordered subscription the publish statement takes a
--             transaction-scoped advisory lock on the queue before it
--             draws ids, so ids follow commit order and "publish order"
--             is well defined even with concurrent publishers.
--   payload   json, not jsonb: it is never queried into, and json is
--             cheaper to store and to return, and keeps the text exactly
--             as encoded (key order, integers).
-- No foreign key to queues: every writer is the publish statement, which
-- takes the id from the queue's subscriptions, and a per-row RI check
-- would only add work to the hottest statement.  Rows come in with every
-- publish and go in batches with the sweeps: vacuumed often, like the
-- deliveries below.
CREATE TABLE IF NOT EXISTS pgcoord.queue_messages (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  queue_id integer NOT NULL,
  payload json NOT NULL,
  published_at timestamptz NOT NULL DEFAULT now()
) WITH (
  autovacuum_vacuum_scale_factor = 0.0,
  autovacuum_vacuum_threshold = 5000,
  autovacuum_vacuum_insert_scale_factor = 0.0,
  autovacuum_vacuum_insert_threshold = 5000,
  autovacuum_analyze_scale_factor = 0.05,
  autovacuum_vacuum_cost_delay = 0
);

-- Deliveries: one row per (subscription, message).
--   state               pending -> acked, or pending -> dead (a message
--                       that kept failing, max_deliveries); dead -> pending
--                       again when requeued by hand
--   deliveries          how many times it was handed to a handler; also the
--                       fencing token of a lease: acks, requeues and lease
--                       renewals name the count they were given, so a
--                       consumer whose lease ran out cannot touch the row
--                       once another consumer has claimed it
--   visible_at          when it may next be claimed.  A claim sets it to
--                       now() + visibility_timeout (the lease, renewed while
--                       the handler runs); a requeue to now() + backoff.  A
--                       consumer that dies leaves the lease to run out, and
--                       the message reappears: nothing depends on the dead
--                       process's connection being noticed.  Times are the
--                       database's clock, never a host's.
--   last_delivered_at   when it was last claimed
--   acked_at            when it was acknowledged.  Acked rows are kept for
--                       the queue handle's `retention` (default 300 s), so
--                       that the ack time can be looked at, then deleted by
--                       the consumers' sweeps, together with the messages
--                       no subscription holds any longer.  (Deleting on ack
--                       would save that later delete, and lose the record.)
--   last_error          what the last failed delivery raised
-- No foreign keys either: the rows are written by publish (which locks the
-- subscriptions, above), and removed by unsubscribe and the sweeps, which
-- serialise per queue on an advisory lock so that exactly one of them
-- deletes a message whose last delivery row goes.  RI triggers would cost
-- one lookup per copied row on every publish.
-- fillfactor 80 leaves room on each page, so that a claim or a lease
-- renewal (which changes no indexed column) is a HOT update.  Every row is
-- inserted, updated two or three times and deleted within minutes, so
-- autovacuum is told to come often and unthrottled (as for pgcoord.jobs):
-- dead entries left in the pending index are what a claim reads past.
CREATE TABLE IF NOT EXISTS pgcoord.queue_deliveries (
  subscription_id bigint NOT NULL,
  message_id bigint NOT NULL,
  state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'acked', 'dead')),
  deliveries integer NOT NULL DEFAULT 0,
  visible_at timestamptz NOT NULL DEFAULT now(),
  last_delivered_at timestamptz,
  acked_at timestamptz,
  last_error text,
  PRIMARY KEY (subscription_id, message_id)
) WITH (
  fillfactor = 80,
  autovacuum_vacuum_scale_factor = 0.0,
  autovacuum_vacuum_threshold = 5000,
  autovacuum_vacuum_insert_scale_factor = 0.0,
  autovacuum_vacuum_insert_threshold = 5000,
  autovacuum_analyze_scale_factor = 0.05,
  autovacuum_vacuum_cost_delay = 0
);

-- Claims read only pending rows, in message order: ordered subscriptions
-- take the first (the head), unordered ones the first visible ones.  A
-- partial index stays small however many acked rows are retained.
CREATE INDEX IF NOT EXISTS queue_deliveries_pending
  ON pgcoord.queue_deliveries (subscription_id, message_id) WHERE state = 'pending';

-- The sweeps find acked rows past their retention without reading the
-- pending ones.
CREATE INDEX IF NOT EXISTS queue_deliveries_acked
  ON pgcoord.queue_deliveries (subscription_id, acked_at) WHERE state = 'acked';

-- q:dead() lists dead letters; they are few, so this index costs next to
-- nothing to keep.
CREATE INDEX IF NOT EXISTS queue_deliveries_dead
  ON pgcoord.queue_deliveries (subscription_id, message_id) WHERE state = 'dead';

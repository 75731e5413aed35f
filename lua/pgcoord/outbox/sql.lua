-- Every statement the outbox, its relay, its publishers and the
-- processed-messages store send, built once per table from its quoted
-- name.  Parameters are $n; identifiers come quoted.
local tables = require "pgcoord.tables"

local sql = {}

-- The channel a save notifies and a relay listens on: by default the
-- outbox table's name.
function sql.default_channel(table_name)
  return table_name
end

-- ---- the outbox ---------------------------------------------------------------

function sql.outbox_ddl(q, name)
  return {
    ([[CREATE TABLE %s (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  seq bigint GENERATED ALWAYS AS IDENTITY,
  topic text NOT NULL CHECK (topic <> ''),
  key text,
  payload jsonb,
  headers jsonb NOT NULL DEFAULT '{}',
  status text NOT NULL DEFAULT 'pending'
    CHECK (status IN ('pending', 'processing', 'processed', 'failed')),
  retries integer NOT NULL DEFAULT 0,
  last_error text,
  created_at timestamptz NOT NULL DEFAULT now(),
  visible_at timestamptz NOT NULL DEFAULT now(),
  processed_at timestamptz
)]]):format(q),
    -- claiming pending messages in creation order
    ("CREATE INDEX ON %s (seq) WHERE status = 'pending'"):format(q),
    -- claiming again what a dead relay left in processing
    ("CREATE INDEX ON %s (visible_at) WHERE status = 'processing'"):format(q),
    -- retention cleanup
    ("CREATE INDEX ON %s (processed_at) WHERE status = 'processed'"):format(q),
    sql.outbox_added_indexes(q, name)[1].ddl,
  }
end

-- Indexes added after the table's first release, each under a name of
-- its own (the table's, cut to fit at a character's boundary, and a
-- suffix), which migrate looks for to add it to a table made before.
local function index_name(name, suffix)
  local keep = 63 - #suffix
  while #name > keep do name = name:sub(1, utf8.offset(name, -1) - 1) end
  return name .. suffix
end

function sql.outbox_added_indexes(q, name)
  local failed = index_name(name, "_failed_idx")
  return {
    -- failed messages in order, for ob:failed and the dashboard's count:
    -- without it both read past every processed row
    { name = failed, ddl = ("CREATE INDEX %s ON %s (seq) WHERE status = 'failed'")
      :format(tables.quote(failed), q) },
  }
end

-- The claim: up to $1 messages, pending ones in creation order and those
-- whose claim expired, locked with SKIP LOCKED and marked processing for
-- $2 seconds; `final` selects from the CTE `claimed`.
function sql.claim(q, final)
  return ([[WITH stale AS (
  SELECT id, seq FROM %s
  WHERE status = 'processing' AND visible_at <= now()
  ORDER BY visible_at LIMIT $1 FOR UPDATE SKIP LOCKED
), fresh AS (
  SELECT id, seq FROM %s
  WHERE status = 'pending' AND visible_at <= now()
  ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED
), picked AS (
  SELECT id, seq FROM stale UNION ALL SELECT id, seq FROM fresh ORDER BY seq LIMIT $1
), claimed AS (
  UPDATE %s AS m SET status = 'processing', visible_at = now() + make_interval(secs => $2)
  FROM picked WHERE m.id = picked.id
  RETURNING m.id, m.seq, m.topic, m.key, m.payload, m.headers, m.retries, m.created_at
)
]]):format(q, q, q) .. final
end

-- Rows named by a JSON list of ids, matched as id = ANY(ARRAY(...)): an
-- index probe per id whatever plan the statement caches (a join against
-- the function can become a scan of the table per id once it is analyzed).
local IDS = "SELECT value::uuid FROM jsonb_array_elements_text($1::jsonb)"

-- The outbox's statements; notify: saves also NOTIFY the channel given as
-- their last parameter.
function sql.outbox(q, notify)
  local wake, from = "", ""
  if notify then
    -- A CTE runs once, however many rows the INSERT returns.
    wake = ", wake AS MATERIALIZED (SELECT pg_notify(%s, ''))"
    from = ", wake"
  end
  return {
    save_one = notify
      and ("WITH ins AS (INSERT INTO %s (topic, key, payload, headers)"
        .. " VALUES ($1, $2, $3::jsonb, $4::jsonb) RETURNING id)%s SELECT ins.id FROM ins%s")
        :format(q, wake:format("$5"), from)
      or ("INSERT INTO %s (topic, key, payload, headers) VALUES ($1, $2, $3::jsonb, $4::jsonb)"
        .. " RETURNING id"):format(q),
    save_many = ("WITH ins AS (INSERT INTO %s (topic, key, payload, headers)"
      .. " SELECT m->>'t', m->>'k', NULLIF(m->'p', 'null'), m->'h'"
      .. " FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS x(m, n) ORDER BY n"
      .. " RETURNING id, seq)%s SELECT ins.id FROM ins%s ORDER BY ins.seq")
      :format(q, wake:format("$2"), from),
    claim = sql.claim(q, "SELECT id, topic, key, payload, headers, retries, created_at"
      .. " FROM claimed ORDER BY seq"),
    processed = ("UPDATE %s SET status = 'processed', processed_at = now()"
      .. " WHERE id = ANY(ARRAY(%s)) AND status <> 'processed'"):format(q, IDS),
    -- $4: the retry delays (a JSON list, from pgcoord.retry) after the 1st,
    -- 2nd, ... failed attempt; past its end, its last.
    failed = ("UPDATE %s SET retries = retries + 1, last_error = $2,"
      .. " status = CASE WHEN retries + 1 > $3 THEN 'failed' ELSE 'pending' END,"
      .. " visible_at = now() + make_interval(secs =>"
      .. " ($4::jsonb ->> least(retries, jsonb_array_length($4::jsonb) - 1))::float8)"
      .. " WHERE id = $1 AND status IN ('pending', 'processing') RETURNING status, retries")
      :format(q),
    extend = ("UPDATE %s SET visible_at = now() + make_interval(secs => $2)"
      .. " WHERE id = ANY(ARRAY(%s)) AND status = 'processing'"):format(q, IDS),
    -- failed messages, for a look and a retry ($1 at most)
    failed_list = ("SELECT id, topic, key, payload, headers, retries, last_error, created_at"
      .. " FROM %s WHERE status = 'failed' ORDER BY seq LIMIT $1"):format(q),
    -- failed messages back to pending with a fresh retry count; $2: the
    -- channel to wake relays on, or NULL
    retry_failed = ("WITH r AS (UPDATE %s SET status = 'pending', retries = 0,"
      .. " visible_at = now() WHERE id = ANY(ARRAY(%s)) AND status = 'failed' RETURNING 1)"
      .. " SELECT count(*) AS retried, CASE WHEN count(*) > 0 AND $2::text IS NOT NULL"
      .. " THEN pg_notify($2, '') END AS notified FROM r"):format(q, IDS),
    delete_before = ("DELETE FROM %s WHERE id IN (SELECT id FROM %s WHERE status = 'processed'"
      .. " AND processed_at < to_timestamp($1) LIMIT $2 FOR UPDATE SKIP LOCKED)"):format(q, q),
    delete_older = ("DELETE FROM %s WHERE id IN (SELECT id FROM %s WHERE status = 'processed'"
      .. " AND processed_at < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED)")
      :format(q, q),
  }
end


-- ---- the processed-messages store -----------------------------------------------

function sql.processed_ddl(q)
  return {
    ([[CREATE TABLE %s (
  consumer_group text NOT NULL,
  message_id text NOT NULL,
  processed_at timestamptz NOT NULL DEFAULT now(),
  metadata jsonb,
  PRIMARY KEY (consumer_group, message_id)
)]]):format(q),
    ("CREATE INDEX ON %s (processed_at)"):format(q),
  }
end

function sql.processed(q)
  local purge = "DELETE FROM %s WHERE (consumer_group, message_id) IN"
    .. " (SELECT consumer_group, message_id FROM %s WHERE processed_at < %s"
    .. " LIMIT %s FOR UPDATE SKIP LOCKED)"
  return {
    mark = ("INSERT INTO %s (consumer_group, message_id, metadata) VALUES ($1, $2, $3::jsonb)"
      .. " ON CONFLICT DO NOTHING"):format(q),
    is_processed = ("SELECT EXISTS (SELECT 1 FROM %s WHERE consumer_group = $1"
      .. " AND message_id = $2) AS found"):format(q),
    purge_before = purge:format(q, q, "to_timestamp($1)", "$2"),
    purge_older = purge:format(q, q, "now() - make_interval(secs => $1)", "$2"),
  }
end

return sql

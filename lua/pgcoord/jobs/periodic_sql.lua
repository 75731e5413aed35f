-- Every statement of periodic jobs (periodic.lua); the table is
-- sql/008_jobs_periodic.sql.  Times go both ways as epoch seconds.
local sql = {}

-- The name's row, made on first sight and locked until the visit's
-- transaction ends (ON CONFLICT DO UPDATE waits for, and returns, the
-- latest version): a second scheduler visiting the name at once reads
-- last_slot only after this one has moved it.
sql.VISIT = [[
INSERT INTO pgcoord.job_periodic AS p (name, spec, group_name, type, timezone)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (name) DO UPDATE
   SET spec = excluded.spec, group_name = excluded.group_name, type = excluded.type,
       timezone = excluded.timezone,
       updated_at = CASE WHEN (p.spec, p.group_name, p.type, p.timezone)
                              IS DISTINCT FROM (excluded.spec, excluded.group_name,
                                                excluded.type, excluded.timezone)
                         THEN now() ELSE p.updated_at END
RETURNING extract(epoch FROM last_slot)::float8 AS last_slot,
          extract(epoch FROM next_slot)::float8 AS next_slot,
          extract(epoch FROM created_at)::float8 AS created_at,
          extract(epoch FROM now())::float8 AS now]]

-- Enqueues the slots $8 (a JSON list of epoch seconds, $4 the first, $2
-- the last) as jobs of group $5, type $6, params $7, in the statement that
-- moves last_slot to $2: only when last_slot is still before $4, so that
-- no slot is ever enqueued twice.  $3: the slot after.
sql.ENQUEUE = [[
WITH moved AS (
  UPDATE pgcoord.job_periodic
     SET last_slot = to_timestamp($2::float8), next_slot = to_timestamp($3::float8)
   WHERE name = $1 AND (last_slot IS NULL OR last_slot < to_timestamp($4::float8))
  RETURNING name),
ins AS (
  INSERT INTO pgcoord.jobs (group_name, type, state, run_at, params)
  SELECT $5::text, $6::text, CASE WHEN to_timestamp(s.at) <= now() THEN 'ready'
                                  ELSE 'scheduled' END,
         to_timestamp(s.at), $7::json
    FROM moved, (SELECT value::float8 AS at FROM json_array_elements_text($8::json)) s
  RETURNING state, run_at),
n AS (
  SELECT pg_notify('pgcoord_jobs', json_build_object('group', $5::text, 'due_in',
           CASE WHEN bool_or(state = 'ready') THEN NULL
                ELSE extract(epoch FROM min(run_at) - now()) END)::text)
    FROM ins HAVING count(*) > 0)
SELECT (SELECT count(*) FROM ins)::int AS enqueued, (SELECT count(*) FROM n) AS notified]]

sql.SET_NEXT = [[
UPDATE pgcoord.job_periodic SET next_slot = to_timestamp($2::float8) WHERE name = $1]]

-- The rows of the names in $1 (a JSON list; NULL: every name), and now.
sql.LIST = [[
SELECT extract(epoch FROM now())::float8 AS now,
       COALESCE(json_agg(json_build_object(
         'name', name, 'spec', spec, 'group', group_name, 'type', type, 'timezone', timezone,
         'last_run', extract(epoch FROM last_slot)::float8,
         'next_run', extract(epoch FROM next_slot)::float8) ORDER BY name), '[]') AS rows
  FROM pgcoord.job_periodic
 WHERE $1::json IS NULL OR name IN (SELECT json_array_elements_text($1::json))]]

return sql

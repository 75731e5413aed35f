-- The schema every pgcoord table lives in, unless a primitive is told
-- otherwise (the outbox and processed-messages tables follow search_path).
CREATE SCHEMA IF NOT EXISTS pgcoord;

-- How many of a worker's jobs have their handler running, as of its last
-- heartbeat.  A job is 'running' in pgcoord.jobs from its claim on, while
-- it may still wait in the worker's local queue (prefetched): this column
-- tells the two apart for --status and the metrics (running: handlers in
-- progress; claimed: the rest).  The heartbeat writes it, so a job's start
-- costs no write.  (Version 010: 009 is taken by the dashboard's indexes.)
ALTER TABLE pgcoord.job_workers ADD COLUMN IF NOT EXISTS running integer NOT NULL DEFAULT 0;

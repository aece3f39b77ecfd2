-- 0003: listing jobs costs the number of jobs, not of events.
--
-- `jobs` and `unfinished_jobs` start from each job's first event; this
-- partial index holds only those, in start order.

CREATE INDEX events_job_starts ON events (job_no) WHERE seq = 1;

-- 0007: the job queue, beside the log.
--
-- `submit` records a job here; workers claim it, hold it under a lease that
-- the database's clock times, and append its events under a fence: every
-- append checks, in its own transaction, that the job's epoch is still the
-- one the worker claimed it at. A claim or takeover moves the epoch on, so
-- a worker that lost its lease can append nothing more.

CREATE TABLE jobs (
    job_id       TEXT    PRIMARY KEY CHECK (length(job_id) = 36),
    submitted_no INTEGER NOT NULL UNIQUE,
    -- {"job_id", "contract_id", "steps", "executed_by"}
    job          TEXT    NOT NULL CHECK (json_valid(job)),
    state        TEXT    NOT NULL CHECK (state IN ('submitted', 'running', 'finished')),
    owner        TEXT    CHECK ((owner IS NULL) = (state <> 'running')),
    epoch        INTEGER NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    -- Unix seconds, by the database's clock.
    lease_until  REAL    CHECK ((lease_until IS NULL) = (state <> 'running')),
    submitted_at TEXT    NOT NULL
) STRICT;

-- Workers look for the oldest claimable job.
CREATE INDEX jobs_claimable ON jobs (state, submitted_no) WHERE state <> 'finished';

-- A job's epoch never goes back, and a finished job stays finished.
CREATE TRIGGER jobs_epoch_forward BEFORE UPDATE ON jobs
WHEN NEW.epoch < OLD.epoch OR NEW.job_id <> OLD.job_id OR NEW.job <> OLD.job
     OR (OLD.state = 'finished' AND NEW.state <> 'finished')
BEGIN
    SELECT RAISE(ABORT, 'a queued job''s id, plan and epoch never go back');
END;

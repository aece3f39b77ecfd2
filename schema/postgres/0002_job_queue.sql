-- 0002: the job queue, beside the log.
--
-- `submit` records a job here; workers claim it (`FOR UPDATE SKIP LOCKED`),
-- hold it under a lease timed by the server's clock, and append its events
-- under a fence: every append checks, in its own transaction and under a
-- share lock of the job's row, that the job's epoch is still the one the
-- worker claimed it at. A claim or takeover moves the epoch on, so a worker
-- that lost its lease can append nothing more.

CREATE TABLE jobs (
    job_id       uuid        PRIMARY KEY,
    submitted_no bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    -- {"job_id", "contract_id", "steps", "executed_by"}
    job          text        NOT NULL CHECK (job::json IS NOT NULL),
    state        text        NOT NULL CHECK (state IN ('submitted', 'running', 'finished')),
    owner        text        CHECK ((owner IS NULL) = (state <> 'running')),
    epoch        bigint      NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    lease_until  timestamptz CHECK ((lease_until IS NULL) = (state <> 'running')),
    submitted_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Workers look for the oldest claimable job.
CREATE INDEX jobs_claimable ON jobs (state, submitted_no) WHERE state <> 'finished';

-- A job's epoch never goes back, and a finished job stays finished.
CREATE FUNCTION jobs_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.epoch < OLD.epoch OR NEW.job_id <> OLD.job_id OR NEW.job <> OLD.job
       OR (OLD.state = 'finished' AND NEW.state <> 'finished') THEN
        RAISE EXCEPTION 'a queued job''s id, plan and epoch never go back'
            USING ERRCODE = 'JE004';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_forward BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_forward();

-- 0001: the append-only event log, on PostgreSQL.
--
-- The same rows as the SQLite log, byte for byte where the hash chain
-- covers them (kind, recorded_at and payload are the exact texts), and the
-- same rules, enforced here whatever program writes to the tables.

-- The schema version, one row; its presence marks the schema as ours.
CREATE TABLE job_executor_schema (version integer NOT NULL CHECK (version >= 0));
INSERT INTO job_executor_schema VALUES (0);

-- The head of the log: the last position and the last job number given.
-- An append takes this row's lock for the rest of its transaction, so
-- positions are given in commit order and without gaps: a reader that
-- follows positions never skips an event committed out of order.
CREATE TABLE log_head (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    position bigint  NOT NULL CHECK (position >= 0),
    job_no   bigint  NOT NULL CHECK (job_no >= 0)
);
INSERT INTO log_head VALUES (true, 0, 0);

CREATE TABLE events (
    position       bigint  PRIMARY KEY CHECK (position >= 1),
    job_id         uuid    NOT NULL,
    -- Numbered when the job starts, larger than every job's before it:
    -- (job_no, seq) keeps a job's rows together, in start order.
    job_no         bigint  NOT NULL CHECK (job_no >= 1),
    seq            bigint  NOT NULL CHECK (seq >= 1),
    kind           text    NOT NULL,
    schema_version integer NOT NULL CHECK (schema_version >= 1),
    recorded_at    text    NOT NULL
        CHECK (recorded_at ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z$'),
    payload        text    NOT NULL CHECK (payload::json IS NOT NULL),
    digest         text    NOT NULL CHECK (digest ~ '^[0-9a-f]{64}$'),
    mac            text    CHECK (mac ~ '^[0-9a-f]{64}$'),
    -- A job's log begins with JobStarted, and only there.
    CHECK ((seq = 1) = (kind = 'JobStarted')),
    UNIQUE (job_no, seq)
);

-- A job id starts at most once; finding a job is a lookup of its first event.
CREATE UNIQUE INDEX events_job ON events (job_id) WHERE seq = 1;

CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % is not allowed', TG_OP
        USING ERRCODE = 'JE001';
END
$$;

CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

-- Every event but a job's first directly follows an event of its job that
-- does not end it; with UNIQUE (job_no, seq) that keeps seq numbers
-- contiguous and a finished job's log closed. The job number must be the
-- one its JobStarted got. The function's search path is the schema it was
-- made in, whatever the inserting session's is.
CREATE FUNCTION events_insert() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    previous record;
BEGIN
    IF NEW.kind NOT IN ('JobStarted', 'StepStarted', 'StepSucceeded', 'StepFailed',
                        'JobCompleted', 'JobHalted',
                        'JobCancelRequested', 'JobCancelled', 'JobResumed') THEN
        RAISE EXCEPTION 'unknown event kind %', NEW.kind USING ERRCODE = 'JE002';
    END IF;
    IF NEW.seq > 1 THEN
        SELECT kind, job_id INTO previous
          FROM events WHERE job_no = NEW.job_no AND seq = NEW.seq - 1;
        IF NOT FOUND OR previous.job_id <> NEW.job_id
           OR previous.kind IN ('JobCompleted', 'JobHalted', 'JobCancelled') THEN
            RAISE EXCEPTION 'seq must directly follow the job''s last event, and nothing follows the end of a job'
                USING ERRCODE = 'JE003';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER events_insert BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_insert();

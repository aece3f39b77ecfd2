-- 0001: the append-only event log.
--
-- One row per event. `position` orders the whole log; (job_id, seq) orders one
-- job's events and is unique, which is what optimistic concurrency relies on.
-- The rules below hold whatever program writes to the file.

CREATE TABLE events (
    position       INTEGER PRIMARY KEY,
    job_id         TEXT    NOT NULL CHECK (length(job_id) = 36),
    seq            INTEGER NOT NULL CHECK (seq >= 1),
    kind           TEXT    NOT NULL,
    schema_version INTEGER NOT NULL CHECK (schema_version >= 1),
    recorded_at    TEXT    NOT NULL CHECK (recorded_at LIKE '____-__-__T__:__:__.______Z'),
    payload        TEXT    NOT NULL CHECK (json_valid(payload)),
    -- A job's log begins with JobStarted, and only there.
    CHECK ((seq = 1) = (kind = 'JobStarted')),
    UNIQUE (job_id, seq)
) STRICT;

-- `jobs` lists jobs in start order without scanning the log.
CREATE INDEX events_job_starts ON events (position) WHERE seq = 1;

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: UPDATE is not allowed');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: DELETE is not allowed');
END;

CREATE TRIGGER events_known_kind BEFORE INSERT ON events
WHEN NEW.kind NOT IN ('JobStarted', 'StepStarted', 'StepSucceeded', 'StepFailed',
                      'JobCompleted', 'JobHalted')
BEGIN
    SELECT RAISE(ABORT, 'unknown event kind');
END;

-- No gaps: an event directly follows its job's last one.
CREATE TRIGGER events_seq_follows BEFORE INSERT ON events
WHEN NEW.seq <> 1 + coalesce((SELECT max(seq) FROM events WHERE job_id = NEW.job_id), 0)
BEGIN
    SELECT RAISE(ABORT, 'seq must directly follow the job''s last event');
END;

-- A finished job's log is closed.
CREATE TRIGGER events_closed_after_end BEFORE INSERT ON events
WHEN (SELECT kind FROM events WHERE job_id = NEW.job_id AND seq = NEW.seq - 1)
     IN ('JobCompleted', 'JobHalted')
BEGIN
    SELECT RAISE(ABORT, 'the job has ended: its log is closed');
END;

-- 0005: keep each job's events together, in the order jobs started.
--
-- Until now the unique index on (job_id, seq) placed each job's entries by
-- its random id, so a commit serving several jobs at once dirtied a page per
-- job. Each job now gets a number when it starts, larger than every job
-- before it, and (job_no, seq) is the unique key: jobs that run together sit
-- together, and a group commit writes a few pages instead of one per job. A
-- job is found by its id through an index of its first event only.
--
-- The table is rebuilt once: every row is copied as it is (same position,
-- same bytes, same digest), numbered by the position of its job's
-- JobStarted.

CREATE TABLE events_clustered (
    position       INTEGER PRIMARY KEY,
    job_id         TEXT    NOT NULL CHECK (length(job_id) = 36),
    job_no         INTEGER NOT NULL,
    seq            INTEGER NOT NULL CHECK (seq >= 1),
    kind           TEXT    NOT NULL,
    schema_version INTEGER NOT NULL CHECK (schema_version >= 1),
    recorded_at    TEXT    NOT NULL CHECK (recorded_at LIKE '____-__-__T__:__:__.______Z'),
    payload        TEXT    NOT NULL CHECK (json_valid(payload)),
    digest         TEXT
        CHECK (digest IS NULL OR (length(digest) = 64 AND digest NOT GLOB '*[^0-9a-f]*')),
    mac            TEXT
        CHECK (mac IS NULL OR (length(mac) = 64 AND mac NOT GLOB '*[^0-9a-f]*')),
    CHECK ((seq = 1) = (kind = 'JobStarted')),
    UNIQUE (job_no, seq)
) STRICT;

-- A row whose job has no JobStarted (a damaged log) keeps a number of its
-- own, so that the copy never fails and `verify` still reports it.
INSERT INTO events_clustered
    (position, job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest, mac)
SELECT e.position, e.job_id,
       coalesce((SELECT s.position FROM events s WHERE s.job_id = e.job_id AND s.seq = 1),
                -e.position),
       e.seq, e.kind, e.schema_version, e.recorded_at, e.payload, e.digest, e.mac
FROM events e ORDER BY e.position;

DROP TABLE events;
ALTER TABLE events_clustered RENAME TO events;

-- A job id starts at most once; finding a job is a lookup of its first event.
CREATE UNIQUE INDEX events_job ON events (job_id) WHERE seq = 1;
-- `jobs` lists jobs in start order without scanning the log.
CREATE INDEX events_job_starts ON events (job_no) WHERE seq = 1;

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
                      'JobCompleted', 'JobHalted',
                      'JobCancelRequested', 'JobCancelled', 'JobResumed')
BEGIN
    SELECT RAISE(ABORT, 'unknown event kind');
END;

CREATE TRIGGER events_sealed BEFORE INSERT ON events
WHEN NEW.digest IS NULL
BEGIN
    SELECT RAISE(ABORT, 'every new event carries its chain digest');
END;

-- Every event but a job's first directly follows an event of its job that
-- does not end it; with UNIQUE (job_no, seq) that keeps seq numbers
-- contiguous and a finished job's log closed. The job number must be the
-- one its JobStarted got.
CREATE TRIGGER events_follow BEFORE INSERT ON events
WHEN NEW.seq > 1 AND coalesce(
    (SELECT kind IN ('JobCompleted', 'JobHalted', 'JobCancelled') OR job_id <> NEW.job_id
       FROM events WHERE job_no = NEW.job_no AND seq = NEW.seq - 1),
    1)
BEGIN
    SELECT RAISE(ABORT, 'seq must directly follow the job''s last event, and nothing follows the end of a job');
END;

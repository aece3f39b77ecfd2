-- 0004: one index lookup per append instead of two.
--
-- Every event but a job's first must directly follow an event of its job
-- that does not end it. With UNIQUE (job_id, seq), that alone keeps each
-- job's seq numbers contiguous (a seq can only be written once its
-- predecessor exists) and a finished job's log closed, so the two triggers
-- that checked this with a lookup each become one.

DROP TRIGGER events_seq_follows;
DROP TRIGGER events_closed_after_end;

CREATE TRIGGER events_follow BEFORE INSERT ON events
WHEN NEW.seq > 1 AND coalesce(
    (SELECT kind IN ('JobCompleted', 'JobHalted', 'JobCancelled')
       FROM events WHERE job_id = NEW.job_id AND seq = NEW.seq - 1),
    1)
BEGIN
    SELECT RAISE(ABORT, 'seq must directly follow the job''s last event, and nothing follows the end of a job');
END;

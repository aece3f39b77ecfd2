-- 0011: the kind JobClaimed — a worker claimed a job (or took it over), and
-- appends what follows up to the next claim. The insert rules are those of
-- 0008, with the kind admitted.

DROP TRIGGER events_insert;

CREATE TRIGGER events_insert BEFORE INSERT ON events
BEGIN
    SELECT RAISE(ABORT, 'unknown event kind')
    WHERE instr(NEW.kind, ',') > 0 OR instr(',JobStarted,StepStarted,StepSucceeded,StepFailed,JobCompleted,JobHalted,'
                || 'JobCancelRequested,JobCancelled,JobResumed,JobClaimed,',
                ',' || NEW.kind || ',') = 0;
    SELECT RAISE(ABORT, 'every new event carries its chain digest')
    WHERE NEW.digest IS NULL;
    SELECT RAISE(ABORT, 'seq must directly follow the job''s last event, and nothing follows the end of a job')
    WHERE NEW.seq > 1 AND coalesce(
        (SELECT kind = 'JobCompleted' OR kind = 'JobHalted' OR kind = 'JobCancelled'
                OR job_id <> NEW.job_id
           FROM events WHERE job_no = NEW.job_no AND seq = NEW.seq - 1),
        1);
END;

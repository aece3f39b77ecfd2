-- 0003: cancellation and resumption.
--
-- Three kinds join the log: JobCancelRequested (anyone may ask), JobCancelled
-- (a terminal event: the executor honoured the request between steps) and
-- JobResumed (an executor took up a job stopped between steps).

DROP TRIGGER events_known_kind;
CREATE TRIGGER events_known_kind BEFORE INSERT ON events
WHEN NEW.kind NOT IN ('JobStarted', 'StepStarted', 'StepSucceeded', 'StepFailed',
                      'JobCompleted', 'JobHalted',
                      'JobCancelRequested', 'JobCancelled', 'JobResumed')
BEGIN
    SELECT RAISE(ABORT, 'unknown event kind');
END;

DROP TRIGGER events_closed_after_end;
CREATE TRIGGER events_closed_after_end BEFORE INSERT ON events
WHEN (SELECT kind FROM events WHERE job_id = NEW.job_id AND seq = NEW.seq - 1)
     IN ('JobCompleted', 'JobHalted', 'JobCancelled')
BEGIN
    SELECT RAISE(ABORT, 'the job has ended: its log is closed');
END;

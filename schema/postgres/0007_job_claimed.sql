-- 0007: the kind JobClaimed — a worker claimed a job (or took it over), and
-- appends what follows up to the next claim. The statement's checks are
-- those of 0004, with the kind admitted.

CREATE OR REPLACE FUNCTION events_inserted() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    bad record;
BEGIN
    SELECT kind INTO bad FROM inserted
     WHERE kind NOT IN ('JobStarted', 'StepStarted', 'StepSucceeded', 'StepFailed',
                        'JobCompleted', 'JobHalted',
                        'JobCancelRequested', 'JobCancelled', 'JobResumed', 'JobClaimed')
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'unknown event kind %', bad.kind USING ERRCODE = 'JE002';
    END IF;
    PERFORM 1 FROM inserted n
     WHERE n.seq > 1
       AND NOT EXISTS (
           SELECT 1 FROM events p
            WHERE p.job_no = n.job_no AND p.seq = n.seq - 1 AND p.job_id = n.job_id
              AND p.kind NOT IN ('JobCompleted', 'JobHalted', 'JobCancelled'))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'seq must directly follow the job''s last event, and nothing follows the end of a job'
            USING ERRCODE = 'JE003';
    END IF;
    RETURN NULL;
END
$$;

-- 0002: the hash chain (see ARCHITECTURE.md, "The hash chain").
--
-- `digest` commits to the event's stored bytes and to the previous event of
-- its job; `mac` authenticates the digest when the log is written with a key.
-- Both are 64 lowercase hex digits.

ALTER TABLE events ADD COLUMN digest TEXT
    CHECK (digest IS NULL OR (length(digest) = 64 AND digest NOT GLOB '*[^0-9a-f]*'));
ALTER TABLE events ADD COLUMN mac TEXT
    CHECK (mac IS NULL OR (length(mac) = 64 AND mac NOT GLOB '*[^0-9a-f]*'));

CREATE TRIGGER events_sealed BEFORE INSERT ON events
WHEN NEW.digest IS NULL
BEGIN
    SELECT RAISE(ABORT, 'every new event carries its chain digest');
END;

-- Events written before this version have no digest. The one UPDATE ever
-- allowed is the one that seals such an event: it sets the missing digest and
-- changes nothing else. Every other UPDATE is refused, as before.
DROP TRIGGER events_no_update;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
WHEN NOT (OLD.digest IS NULL AND NEW.digest IS NOT NULL
          AND OLD.mac IS NULL AND NEW.mac IS NULL
          AND NEW.position = OLD.position AND NEW.job_id = OLD.job_id
          AND NEW.seq = OLD.seq AND NEW.kind = OLD.kind
          AND NEW.schema_version = OLD.schema_version
          AND NEW.recorded_at = OLD.recorded_at AND NEW.payload = OLD.payload)
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: UPDATE is not allowed');
END;

-- A ghost stay's exception (parking.booth.ghosts, reason 'ghost_stay') asks a person about a
-- stay that seemed never to end. Whatever ends the stay answers it: its exit read (live, or
-- uploaded late by a gate that was offline), its vehicle's re-entry, a payment at the gate or
-- the booth, an operator's open. The exception is resolved with the stay, in its transaction
-- and audit-logged, so that nobody acts on a stay that is over; a stay opened again (an
-- operator rejected the charge of the exit that ended it) is a ghost still, and the exception
-- its end resolved is open again. One rule here rather than at every statement that ends a
-- stay (the lane, the booth, billing's gate payment, the operator's open), which a new one
-- would miss.
CREATE INDEX lane_exceptions_ghost_stay
    ON lane_exceptions (((candidates -> 0 ->> 'session_id')::bigint))
    WHERE reason = 'ghost_stay';

CREATE FUNCTION sessions_ghost_follows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> 'open' THEN
        WITH resolved AS (
            UPDATE lane_exceptions SET status = 'resolved', resolved_by = 'system:stay_ended',
                                       resolved_at = now()
            WHERE reason = 'ghost_stay' AND (candidates -> 0 ->> 'session_id')::bigint = NEW.id
              AND status = 'open'
            RETURNING id, capture_id)
        INSERT INTO audit_log (actor, action, subject, detail)
        SELECT 'system', 'lane_exception.resolved', 'lane_exception:' || id,
               jsonb_build_object('capture_id', capture_id, 'reason', 'ghost_stay',
                                  'settled_by', 'stay_ended', 'session_id', NEW.id,
                                  'status', NEW.status, 'settlement', NEW.settlement)
        FROM resolved;
    ELSE
        WITH reopened AS (
            UPDATE lane_exceptions SET status = 'open', resolved_by = NULL, resolved_at = NULL
            WHERE reason = 'ghost_stay' AND (candidates -> 0 ->> 'session_id')::bigint = NEW.id
              AND status = 'resolved' AND resolved_by = 'system:stay_ended'
            RETURNING id, capture_id)
        INSERT INTO audit_log (actor, action, subject, detail)
        SELECT 'system', 'lane_exception.reopened', 'lane_exception:' || id,
               jsonb_build_object('capture_id', capture_id, 'reason', 'ghost_stay',
                                  'session_id', NEW.id)
        FROM reopened;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER sessions_ghost_follows AFTER UPDATE OF status ON sessions
    FOR EACH ROW WHEN (NEW.ghost_at IS NOT NULL AND (OLD.status = 'open') <> (NEW.status = 'open'))
    EXECUTE FUNCTION sessions_ghost_follows();

-- The ghost exceptions left open for stays that ended before this rule.
WITH resolved AS (
    UPDATE lane_exceptions e SET status = 'resolved', resolved_by = 'system:stay_ended',
                                 resolved_at = now()
    FROM sessions s
    WHERE e.reason = 'ghost_stay' AND e.status = 'open'
      AND s.id = (e.candidates -> 0 ->> 'session_id')::bigint AND s.status <> 'open'
    RETURNING e.id, e.capture_id, s.id AS session_id, s.status, s.settlement)
INSERT INTO audit_log (actor, action, subject, detail)
SELECT 'system', 'lane_exception.resolved', 'lane_exception:' || id,
       jsonb_build_object('capture_id', capture_id, 'reason', 'ghost_stay',
                          'settled_by', 'stay_ended', 'session_id', session_id,
                          'status', status, 'settlement', settlement)
FROM resolved;

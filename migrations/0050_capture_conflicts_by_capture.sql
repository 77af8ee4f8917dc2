-- A conflicting resend is recorded once per content (parking.lanes.repository
-- .insert_capture_conflict), looked up by its capture on every resend the gate keeps making.
CREATE INDEX capture_conflicts_by_capture ON capture_conflicts (capture_id);

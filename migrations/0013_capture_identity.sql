-- A capture's identity is its capture_id alone. The partitioned captures table can only be
-- unique on (capture_id, captured_at), so a resend with another captured_at (a gate whose clock
-- was corrected, a store-and-forward upload re-stamped) met no row and was decided again.
-- capture_keys is unique on the id across every month, written in the same statement as the
-- capture, and remembers where the capture's row is and what it said.
CREATE TABLE capture_keys (
    capture_id     uuid PRIMARY KEY,
    captured_at    timestamptz NOT NULL,
    -- sha256 of what identifies the capture's content (gate, direction, seq, camera read,
    -- frames); NULL for captures stored before this migration (no conflict check for them).
    content_sha256 bytea
);
INSERT INTO capture_keys (capture_id, captured_at)
    SELECT DISTINCT ON (capture_id) capture_id, captured_at FROM captures
    ORDER BY capture_id, received_at;

-- A resend whose content differs from the stored capture: answered with the stored command,
-- never decided, and kept here for an operator.
CREATE TABLE capture_conflicts (
    id              bigserial PRIMARY KEY,
    capture_id      uuid NOT NULL REFERENCES capture_keys(capture_id),
    car_park_id     bigint NOT NULL REFERENCES car_parks(id),
    gate_id         bigint NOT NULL REFERENCES gates(id),
    -- What the resend said, without its frames (size-capped by the lane).
    resent          jsonb NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX capture_conflicts_car_park ON capture_conflicts (car_park_id, received_at DESC);

GRANT SELECT, INSERT ON capture_keys, capture_conflicts TO parking_app;
GRANT USAGE ON SEQUENCE capture_conflicts_id_seq TO parking_app;

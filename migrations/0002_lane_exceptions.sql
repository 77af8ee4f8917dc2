-- Captures the lane could not decide alone: an unreadable or ambiguous plate, or an exit with
-- no entry record. The gate holds; an operator resolves the exception by choosing or typing
-- the plate. One exception per capture.
CREATE TABLE lane_exceptions (
    id              bigserial PRIMARY KEY,
    capture_id      uuid NOT NULL UNIQUE REFERENCES captures(capture_id) DEFERRABLE INITIALLY DEFERRED,
    car_park_id     bigint NOT NULL REFERENCES car_parks(id),
    gate_id         bigint NOT NULL REFERENCES gates(id),
    reason          text NOT NULL CHECK (reason IN ('unreadable', 'ambiguous', 'no_entry')),
    -- What the readers proposed and the closest parked plates, for the operator to choose from.
    candidates      jsonb NOT NULL DEFAULT '[]',
    image           bytea,
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    resolved_plate  text,
    resolved_by     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz
);
CREATE INDEX lane_exceptions_open ON lane_exceptions (car_park_id, created_at) WHERE status = 'open';

-- How the plate of a capture was established.
ALTER TABLE captures
    ADD COLUMN plate_source text CHECK (plate_source IN ('camera', 'ocr', 'none')),
    ADD COLUMN match_status text CHECK (match_status IN ('exact', 'fuzzy', 'ambiguous', 'no_match'));

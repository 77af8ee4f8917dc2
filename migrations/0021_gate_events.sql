-- Openings of a barrier that no signed command explains (the booth's button), as the gate
-- reported them: listed for operators (GET /api/v1/operator/gate-events). QoS 1 may deliver
-- an event twice; its own id keeps it once.
CREATE TABLE gate_events (
    id          bigserial PRIMARY KEY,
    event_id    uuid NOT NULL UNIQUE,
    car_park_id bigint NOT NULL REFERENCES car_parks (id),
    gate_id     bigint NOT NULL REFERENCES gates (id),
    type        text NOT NULL CHECK (type IN ('manual_open')),
    reason      text,
    at          timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gate_events_car_park_received ON gate_events (car_park_id, received_at DESC);

GRANT SELECT, INSERT ON gate_events TO parking_app;
GRANT USAGE ON SEQUENCE gate_events_id_seq TO parking_app;

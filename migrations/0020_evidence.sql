-- Evidence to the driver and "not my car" (issue #15).
--
-- The first frame of every capture (capture_frames, migration 0017) is the evidence of its
-- stay for the driver's receipt and an operator's review.

-- The links in drivers' messages: a random token per message, stored only as its SHA-256,
-- naming one charge.
CREATE TABLE receipts (
    token_hash   bytea PRIMARY KEY,
    charge_id    bigint NOT NULL REFERENCES charges(id),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX receipts_charge ON receipts (charge_id);
GRANT SELECT, INSERT ON receipts TO parking_app;

-- When the outbox worker first handed the charge to the provider (under the charge's row lock,
-- so that a dispute either holds it before it is sent or finds it sent).
ALTER TABLE charges ADD COLUMN sent_at timestamptz;
-- A held charge the operator decided for the driver: never sent, its accrual reversed.
ALTER TABLE charges DROP CONSTRAINT charges_status_check;
ALTER TABLE charges ADD CONSTRAINT charges_status_check
    CHECK (status IN ('pending', 'succeeded', 'failed', 'awaiting_confirmation', 'cancelled'));

-- "Not my car": one dispute per charge, decided by an operator with both frames.
CREATE TABLE charge_disputes (
    id           bigserial PRIMARY KEY,
    charge_id    bigint NOT NULL UNIQUE REFERENCES charges(id),
    account_id   bigint NOT NULL REFERENCES accounts(id),
    car_park_id  bigint NOT NULL REFERENCES car_parks(id),
    via          text NOT NULL CHECK (via IN ('receipt', 'app')),
    -- The charge had not been sent when it was disputed: the worker does not send it until
    -- the decision (charge_stands releases it, driver_right cancels it).
    held         boolean NOT NULL,
    status       text NOT NULL DEFAULT 'open'
                 CHECK (status IN ('open', 'driver_right', 'charge_stands')),
    opened_at    timestamptz NOT NULL DEFAULT now(),
    decided_at   timestamptz,
    decided_by   text,
    note         text,
    refund_id    bigint REFERENCES refunds(id),
    CHECK ((status = 'open') = (decided_at IS NULL))
);
CREATE INDEX charge_disputes_car_park ON charge_disputes (car_park_id, status, opened_at);
GRANT SELECT, INSERT, UPDATE ON charge_disputes TO parking_app;
GRANT USAGE, SELECT ON SEQUENCE charge_disputes_id_seq TO parking_app;

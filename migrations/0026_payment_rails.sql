-- Payment rails shaped on WeChat Pay Score parking (issue #18).

-- A plate's pay-later service with a provider, as last learned (an entry's registration, a
-- service query, a signed state-change notification). Only 'normal' may leave on pay-later;
-- a plate the provider never spoke of has no row (the lane treats it as before: the agreement
-- alone decides). One row per (provider, vehicle); a newer change wins, an older one is ignored.
CREATE TABLE plate_services (
    provider    text NOT NULL,
    plate       text NOT NULL,
    plate_color text NOT NULL,
    state       text NOT NULL CHECK (state IN ('normal', 'paused', 'overdue', 'not_opened')),
    changed_at  timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, plate, plate_color)
);

-- The provider's id of a stay registered at its entry; a deduction for the stay names it.
ALTER TABLE sessions ADD COLUMN provider_parking_id text;

-- A deduction the provider paid in the driver's stead (WeChat's 垫资): the car park is paid and
-- the driver owes us nothing.
ALTER TABLE charges ADD COLUMN advanced_by_provider boolean NOT NULL DEFAULT false;

-- The registration of a stay with the provider at its entry (billing.worker), for the rails
-- that want one (WeChat Pay Score parking).
ALTER TABLE outbox DROP CONSTRAINT outbox_kind_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_kind_check
    CHECK (kind IN ('charge', 'notification', 'refund', 'gate_command', 'verify_charge',
                    'parking_entry'));

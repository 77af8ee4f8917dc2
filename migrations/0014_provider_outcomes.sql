-- Provider outcomes (issue #16).
--
-- A charge the provider refused for the car park's own reason (a bad request, an over-long
-- field, its credentials, an unknown agreement or order, a conflicting key) is never the
-- driver's debt: it stays pending and waits here for an operator, who retries it once the
-- cause is fixed.
CREATE TABLE charge_exceptions (
    id           bigserial PRIMARY KEY,
    charge_id    bigint NOT NULL REFERENCES charges(id),
    car_park_id  bigint NOT NULL REFERENCES car_parks(id),
    provider     text NOT NULL,
    http_status  integer,
    code         text NOT NULL,
    reason       text NOT NULL,
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'retried', 'resolved')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    resolved_by  text,
    CHECK ((status = 'open') = (resolved_at IS NULL))
);
CREATE UNIQUE INDEX charge_exceptions_one_open ON charge_exceptions (charge_id)
    WHERE status = 'open';
CREATE INDEX charge_exceptions_car_park ON charge_exceptions (car_park_id, created_at DESC);
GRANT SELECT, INSERT, UPDATE ON charge_exceptions TO parking_app;
GRANT USAGE, SELECT ON SEQUENCE charge_exceptions_id_seq TO parking_app;

-- A debt is settled by a payment, or by its own charge when the provider's success arrives
-- after the charge was marked failed (late news).
ALTER TABLE debts ADD COLUMN settled_by_charge boolean NOT NULL DEFAULT false;
ALTER TABLE debts DROP CONSTRAINT debts_check;
ALTER TABLE debts ADD CONSTRAINT debts_check
    CHECK ((settled_at IS NULL) = (payment_id IS NULL AND NOT settled_by_charge));

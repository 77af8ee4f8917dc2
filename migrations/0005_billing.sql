-- Billing a finance team can sign off: asynchronous provider orders, driver payments (gate QR
-- and app), debts from failed charges, refunds, reconciliation against the provider's
-- statement, and a database role that cannot rewrite the ledger.

-- The provider accepts a charge asynchronously; when it finished is the provider's clock, which
-- is what its daily statement is cut by.
ALTER TABLE charges
    ADD COLUMN submitted_at timestamptz,
    ADD COLUMN provider_finished_at timestamptz;

-- Money a driver pays by themselves: a held car's fee (and debts) through the gate's QR code,
-- or debts in the app. One provider order each (out_trade_no is its idempotency key).
CREATE TABLE payments (
    id                   bigserial PRIMARY KEY,
    out_trade_no         text NOT NULL UNIQUE,
    provider             text NOT NULL,
    purpose              text NOT NULL CHECK (purpose IN ('gate', 'debts')),
    account_id           bigint REFERENCES accounts(id),
    session_id           bigint REFERENCES sessions(id),
    -- The held exit the QR code was shown for; the gate is opened for it once paid.
    capture_id           uuid REFERENCES captures(capture_id),
    stay_fee_fen         bigint NOT NULL DEFAULT 0 CHECK (stay_fee_fen >= 0),
    debt_fen             bigint NOT NULL DEFAULT 0 CHECK (debt_fen >= 0),
    -- The debts this payment was priced with (settled on success if still open).
    debt_ids             bigint[] NOT NULL DEFAULT '{}',
    amount_fen           bigint NOT NULL,
    status               text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'succeeded', 'closed')),
    pay_url              text,
    provider_ref         text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    paid_at              timestamptz,
    provider_finished_at timestamptz,
    CHECK (amount_fen > 0 AND amount_fen = stay_fee_fen + debt_fen),
    CHECK ((purpose = 'gate') = (capture_id IS NOT NULL))
);
-- A held stay is paid once; a second QR scan reuses the open order.
CREATE UNIQUE INDEX payments_one_open_per_capture ON payments (capture_id)
    WHERE status = 'pending';
CREATE UNIQUE INDEX payments_stay_paid_once ON payments (session_id)
    WHERE status = 'succeeded' AND stay_fee_fen > 0;
CREATE INDEX payments_account ON payments (account_id, created_at DESC);

-- A charge that finally failed is a debt of its account until a payment settles it.
CREATE TABLE debts (
    id                bigserial PRIMARY KEY,
    account_id        bigint NOT NULL REFERENCES accounts(id),
    charge_id         bigint NOT NULL UNIQUE REFERENCES charges(id),
    amount_fen        bigint NOT NULL CHECK (amount_fen > 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    settled_at        timestamptz,
    payment_id        bigint REFERENCES payments(id),
    reminders_sent    integer NOT NULL DEFAULT 0,
    last_reminded_at  timestamptz,
    CHECK ((settled_at IS NULL) = (payment_id IS NULL))
);
CREATE INDEX debts_open ON debts (account_id) WHERE settled_at IS NULL;

-- Refunds are new money movements with a reason and who asked; the ledger gets reversing lines.
CREATE TABLE refunds (
    id                   bigserial PRIMARY KEY,
    out_refund_no        text NOT NULL UNIQUE,
    provider             text NOT NULL,
    -- The provider order refunded: a charge's idempotency key or a payment's out_trade_no.
    out_trade_no         text NOT NULL,
    charge_id            bigint REFERENCES charges(id),
    payment_id           bigint REFERENCES payments(id),
    car_park_id          bigint NOT NULL REFERENCES car_parks(id),
    account_id           bigint REFERENCES accounts(id),
    amount_fen           bigint NOT NULL CHECK (amount_fen > 0),
    -- 'operator': a fee given back (revenue is reversed); 'overpayment': money we took twice
    -- (a debt already settled, a stay already closed) goes back by itself.
    kind                 text NOT NULL CHECK (kind IN ('operator', 'overpayment')),
    reason               text NOT NULL CHECK (length(reason) BETWEEN 3 AND 500),
    requested_by         text NOT NULL,
    status               text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'succeeded', 'failed')),
    provider_ref         text,
    last_error           text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz,
    provider_finished_at timestamptz,
    CHECK ((charge_id IS NULL) <> (payment_id IS NULL))
);
CREATE INDEX refunds_charge ON refunds (charge_id);
CREATE INDEX refunds_payment ON refunds (payment_id);

ALTER TABLE outbox DROP CONSTRAINT outbox_kind_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_kind_check
    CHECK (kind IN ('charge', 'notification', 'refund', 'gate_command'));

-- `parking billing reconcile DATE`: every difference between our books and the provider's
-- statement lands in exactly one bucket, once; nothing is corrected automatically.
CREATE TABLE reconciliation_runs (
    id              bigserial PRIMARY KEY,
    provider        text NOT NULL,
    statement_date  date NOT NULL,
    provider_lines  integer NOT NULL,
    ledger_lines    integer NOT NULL,
    matched         integer NOT NULL,
    exceptions      integer NOT NULL,
    run_at          timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE reconciliation_exceptions (
    id                   bigserial PRIMARY KEY,
    provider             text NOT NULL,
    statement_date       date NOT NULL,
    out_trade_no         text NOT NULL,
    bucket               text NOT NULL
                         CHECK (bucket IN ('missing_at_provider', 'missing_in_ledger',
                                           'amount_mismatch')),
    ledger_amount_fen    bigint,
    provider_amount_fen  bigint,
    detail               text NOT NULL,
    first_run_id         bigint NOT NULL REFERENCES reconciliation_runs(id),
    created_at           timestamptz NOT NULL DEFAULT now(),
    resolved_at          timestamptz,
    resolution           text,
    UNIQUE (provider, statement_date, out_trade_no)
);

ALTER TABLE ledger_entries
    ADD COLUMN payment_id bigint REFERENCES payments(id),
    ADD COLUMN refund_id bigint REFERENCES refunds(id);
CREATE INDEX ledger_entries_created ON ledger_entries (created_at);
-- A payment is booked once and a refund once, whatever is retried or duplicated.
CREATE UNIQUE INDEX ledger_one_payment ON ledger_entries (payment_id, ledger_account)
    WHERE kind = 'payment_received';
CREATE UNIQUE INDEX ledger_one_refund ON ledger_entries (refund_id, ledger_account)
    WHERE kind = 'refund';

-- The role the application should connect as in production: it may read and append to the
-- ledger but never rewrite it (the triggers above stop everyone else, too).
DO $$
BEGIN
    CREATE ROLE parking_app NOLOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
GRANT USAGE ON SCHEMA public TO parking_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO parking_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO parking_app;
REVOKE UPDATE, DELETE, TRUNCATE ON ledger_entries FROM parking_app;

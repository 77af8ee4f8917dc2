-- Foundation schema: car parks and gates, drivers and their pay-later agreements, stays,
-- captures, charges, the double-entry ledger, outbox, notifications, dead letters, audit.
-- Money is integer fen (bigint) everywhere.

CREATE TABLE operators (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE car_parks (
    id              bigserial PRIMARY KEY,
    operator_id     bigint NOT NULL REFERENCES operators(id),
    code            text NOT NULL UNIQUE CHECK (code ~ '^[A-Za-z0-9_-]{1,64}$'),
    name            text NOT NULL,
    capacity        integer NOT NULL CHECK (capacity >= 0),
    latitude        double precision CHECK (latitude BETWEEN -90 AND 90),
    longitude       double precision CHECK (longitude BETWEEN -180 AND 180),
    -- What the exit does when there is no entry record for the plate.
    no_entry_policy text NOT NULL DEFAULT 'exception'
                    CHECK (no_entry_policy IN ('exception', 'fixed_fee')),
    no_entry_fee_fen bigint NOT NULL DEFAULT 0 CHECK (no_entry_fee_fen >= 0),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE gates (
    id          bigserial PRIMARY KEY,
    car_park_id bigint NOT NULL REFERENCES car_parks(id),
    code        text NOT NULL CHECK (code ~ '^[A-Za-z0-9_-]{1,64}$'),
    direction   text NOT NULL CHECK (direction IN ('in', 'out', 'both')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (car_park_id, code)
);

CREATE TABLE tariffs (
    id              bigserial PRIMARY KEY,
    car_park_id     bigint NOT NULL REFERENCES car_parks(id),
    effective_from  timestamptz NOT NULL,
    free_minutes    integer NOT NULL CHECK (free_minutes >= 0),
    hourly_fen      bigint NOT NULL CHECK (hourly_fen >= 0),
    daily_cap_fen   bigint CHECK (daily_cap_fen IS NULL OR daily_cap_fen >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (car_park_id, effective_from)
);

CREATE TABLE accounts (
    id                  bigserial PRIMARY KEY,
    phone               text NOT NULL UNIQUE,
    display_name        text,
    blocked_for_arrears boolean NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE plate_bindings (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts(id),
    plate       text NOT NULL,
    color       text NOT NULL CHECK (color IN ('blue', 'green', 'yellow', 'white', 'black')),
    bound_at    timestamptz NOT NULL DEFAULT now(),
    unbound_at  timestamptz,
    CHECK (unbound_at IS NULL OR unbound_at >= bound_at)
);
-- One active binding per plate: a second claim must not silently move it.
CREATE UNIQUE INDEX plate_bindings_one_active ON plate_bindings (plate) WHERE unbound_at IS NULL;
CREATE INDEX plate_bindings_account ON plate_bindings (account_id);

CREATE TABLE pay_later_agreements (
    id                      bigserial PRIMARY KEY,
    account_id              bigint NOT NULL REFERENCES accounts(id),
    provider                text NOT NULL,
    agreement_no            text NOT NULL,
    per_session_limit_fen   bigint NOT NULL CHECK (per_session_limit_fen > 0),
    signed_at               timestamptz NOT NULL DEFAULT now(),
    cancelled_at            timestamptz,
    UNIQUE (provider, agreement_no)
);
CREATE UNIQUE INDEX pay_later_one_active ON pay_later_agreements (account_id)
    WHERE cancelled_at IS NULL;

CREATE TABLE sessions (
    id                  bigserial PRIMARY KEY,
    car_park_id         bigint NOT NULL REFERENCES car_parks(id),
    plate               text NOT NULL,
    plate_color         text,
    status              text NOT NULL DEFAULT 'open'
                        CHECK (status IN ('open', 'closed', 'superseded')),
    entered_at          timestamptz NOT NULL,
    entry_capture_id    uuid UNIQUE,
    exited_at           timestamptz,
    exit_capture_id     uuid UNIQUE,
    fee_fen             bigint CHECK (fee_fen IS NULL OR fee_fen >= 0),
    account_id          bigint REFERENCES accounts(id),
    -- How the stay was settled at the exit.
    settlement          text CHECK (settlement IN ('free', 'pay_later', 'paid_at_gate', 'operator')),
    CHECK ((status = 'open') = (exited_at IS NULL))
);
-- One open stay per plate per car park: the exit closes exactly one, once.
CREATE UNIQUE INDEX sessions_one_open ON sessions (car_park_id, plate) WHERE status = 'open';
CREATE INDEX sessions_recent_exits ON sessions (car_park_id, plate, exited_at DESC)
    WHERE status = 'closed';

CREATE TABLE captures (
    capture_id      uuid PRIMARY KEY,
    gate_id         bigint NOT NULL REFERENCES gates(id),
    car_park_id     bigint NOT NULL REFERENCES car_parks(id),
    seq             bigint NOT NULL,
    direction       text NOT NULL CHECK (direction IN ('in', 'out')),
    plate           text,
    plate_color     text,
    read_confidence real,
    captured_at     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL,
    offline         boolean NOT NULL DEFAULT false,
    outcome         text NOT NULL,
    session_id      bigint REFERENCES sessions(id),
    -- The command sent for this capture, re-sent verbatim when the capture is redelivered.
    command         jsonb NOT NULL
);
CREATE INDEX captures_gate_seq ON captures (gate_id, seq);
CREATE INDEX captures_received ON captures (received_at);

CREATE TABLE charges (
    id              bigserial PRIMARY KEY,
    session_id      bigint NOT NULL UNIQUE REFERENCES sessions(id),
    account_id      bigint NOT NULL REFERENCES accounts(id),
    agreement_id    bigint NOT NULL REFERENCES pay_later_agreements(id),
    amount_fen      bigint NOT NULL CHECK (amount_fen > 0),
    idempotency_key text NOT NULL UNIQUE,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    provider_ref    text,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz
);
CREATE INDEX charges_status ON charges (status) WHERE status = 'pending';

-- Double-entry ledger. amount_fen > 0 is a debit, < 0 a credit; every transaction sums to 0.
CREATE TABLE ledger_entries (
    id              bigserial PRIMARY KEY,
    transaction_id  uuid NOT NULL,
    ledger_account  text NOT NULL,
    amount_fen      bigint NOT NULL CHECK (amount_fen <> 0),
    kind            text NOT NULL,
    session_id      bigint REFERENCES sessions(id),
    charge_id       bigint REFERENCES charges(id),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_txn ON ledger_entries (transaction_id);
CREATE INDEX ledger_entries_account ON ledger_entries (ledger_account);
-- A session accrues its fee once and a charge settles once.
CREATE UNIQUE INDEX ledger_one_accrual ON ledger_entries (session_id, ledger_account)
    WHERE kind = 'fee_accrued';
CREATE UNIQUE INDEX ledger_one_settlement ON ledger_entries (charge_id, ledger_account)
    WHERE kind = 'charge_settled';

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only; post a reversing entry instead'
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

CREATE FUNCTION ledger_transaction_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE total bigint;
BEGIN
    SELECT sum(amount_fen) INTO total FROM ledger_entries WHERE transaction_id = NEW.transaction_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'ledger transaction % does not balance (%)', NEW.transaction_id, total
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END $$;
-- Checked at commit, so a transaction's lines may be inserted one by one.
CREATE CONSTRAINT TRIGGER ledger_balanced AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_transaction_balanced();

-- Transactional outbox: jobs enqueued in the same transaction as the change that caused them.
CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('charge', 'notification')),
    ref_id          bigint NOT NULL,
    available_at    timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    done_at         timestamptz,
    UNIQUE (kind, ref_id)
);
CREATE INDEX outbox_due ON outbox (available_at) WHERE done_at IS NULL;

CREATE TABLE notifications (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts(id),
    kind        text NOT NULL,
    -- What caused it; unique so a retried job cannot notify twice.
    source_key  text NOT NULL UNIQUE,
    body        text NOT NULL,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX notifications_account ON notifications (account_id, created_at DESC);

CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    source      text NOT NULL,
    topic       text,
    reason      text NOT NULL,
    detail      text,
    payload     bytea,
    payload_size integer NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    actor       text NOT NULL,
    action      text NOT NULL,
    subject     text,
    detail      jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

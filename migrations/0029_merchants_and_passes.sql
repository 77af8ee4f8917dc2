-- Merchant validations and passes sold in the app (issue #20). A shop in a car park validates
-- a visitor's stay before the exit (free minutes or an amount), once per stay, out of a budget
-- its car park company gave it.
CREATE TABLE merchants (
    id              bigserial PRIMARY KEY,
    operator_id     bigint NOT NULL REFERENCES operators(id),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    -- NULL: every car park of the company.
    car_park_ids    bigint[],
    -- Granted in total, and spent by validations (each costs what it was worth when given).
    budget_fen      bigint NOT NULL CHECK (budget_fen >= 0),
    spent_fen       bigint NOT NULL DEFAULT 0 CHECK (spent_fen >= 0 AND spent_fen <= budget_fen),
    created_by      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (operator_id, name)
);

-- A merchant's staff sign in like the company's staff, with the role 'merchant', and can do
-- nothing but validate stays for their merchant.
ALTER TABLE operator_users ADD COLUMN merchant_id bigint REFERENCES merchants(id);
ALTER TABLE operator_users DROP CONSTRAINT operator_users_role_check;
ALTER TABLE operator_users ADD CONSTRAINT operator_users_role_check
    CHECK (role IN ('admin', 'attendant', 'merchant'));
ALTER TABLE operator_users ADD CONSTRAINT operator_users_merchant_check
    CHECK ((role = 'merchant') = (merchant_id IS NOT NULL));

CREATE TABLE validations (
    id              bigserial PRIMARY KEY,
    merchant_id     bigint NOT NULL REFERENCES merchants(id),
    -- One per stay: validating a stay again changes nothing.
    session_id      bigint NOT NULL UNIQUE,
    car_park_id     bigint NOT NULL REFERENCES car_parks(id),
    free_minutes    integer CHECK (free_minutes BETWEEN 1 AND 1440),
    amount_fen      bigint CHECK (amount_fen BETWEEN 1 AND 100000000),
    -- What it cost the merchant's budget (fixed when given).
    cost_fen        bigint NOT NULL CHECK (cost_fen >= 0),
    created_by      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((free_minutes IS NULL) <> (amount_fen IS NULL))
);
CREATE INDEX validations_merchant ON validations (merchant_id, created_at);

-- Monthly passes drivers buy in the app (issue #20). An offer sells a right specification for
-- a number of days at a price; a purchase is paid through the payment provider and booked as
-- deferred revenue (`deferred:pass_purchase:N`), recognised as the car park's revenue day by day
-- over the pass's period; on payment the purchase gets its assigned right (source 'purchase').
CREATE TABLE pass_offers (
    id              bigserial PRIMARY KEY,
    operator_id     bigint NOT NULL REFERENCES operators(id),
    spec_id         bigint NOT NULL REFERENCES right_specs(id),
    -- Where it is sold, and whose revenue it is.
    car_park_id     bigint NOT NULL REFERENCES car_parks(id),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    price_fen       bigint NOT NULL CHECK (price_fen BETWEEN 1 AND 100000000),
    period_days     integer NOT NULL CHECK (period_days BETWEEN 1 AND 366),
    active          boolean NOT NULL DEFAULT true,
    created_by      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pass_offers_car_park ON pass_offers (car_park_id) WHERE active;

ALTER TABLE payments DROP CONSTRAINT payments_purpose_check;
ALTER TABLE payments ADD CONSTRAINT payments_purpose_check
    CHECK (purpose IN ('gate', 'debts', 'pass'));
ALTER TABLE payments ADD COLUMN pass_fen bigint NOT NULL DEFAULT 0 CHECK (pass_fen >= 0);
ALTER TABLE payments DROP CONSTRAINT payments_check;
ALTER TABLE payments ADD CONSTRAINT payments_check
    CHECK (amount_fen > 0 AND amount_fen = stay_fee_fen + debt_fen + pass_fen);

CREATE TABLE pass_purchases (
    id              bigserial PRIMARY KEY,
    offer_id        bigint NOT NULL REFERENCES pass_offers(id),
    account_id      bigint NOT NULL REFERENCES accounts(id),
    plate           text NOT NULL,
    color           text NOT NULL CHECK (color IN ('blue', 'green', 'yellow', 'white', 'black')),
    payment_id      bigint NOT NULL UNIQUE REFERENCES payments(id),
    car_park_id     bigint NOT NULL REFERENCES car_parks(id),
    amount_fen      bigint NOT NULL CHECK (amount_fen > 0),
    -- Set when paid: the period and the right it bought.
    starts_at       timestamptz,
    ends_at         timestamptz,
    right_id        bigint UNIQUE REFERENCES assigned_rights(id),
    recognised_fen  bigint NOT NULL DEFAULT 0
                    CHECK (recognised_fen >= 0 AND recognised_fen <= amount_fen),
    reminded_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((right_id IS NULL) = (starts_at IS NULL) AND (starts_at IS NULL) = (ends_at IS NULL))
);
CREATE INDEX pass_purchases_account ON pass_purchases (account_id, id);
CREATE INDEX pass_purchases_unrecognised ON pass_purchases (id)
    WHERE right_id IS NOT NULL AND recognised_fen < amount_fen;

-- Merchant validations (issue #20): a shop in a car park validates a visitor's stay before the
-- exit (free minutes or an amount), once per stay, out of a budget its car park company gave it.
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

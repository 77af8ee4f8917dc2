-- Who may do what: driver sign-in by one-time code, rotating refresh tokens, operator staff
-- with roles, API keys for the city platform and for gates, plate ownership proofs and
-- disputes, account deletion, and the audit trail of operators' actions.

CREATE TABLE operator_users (
    id              bigserial PRIMARY KEY,
    operator_id     bigint NOT NULL REFERENCES operators(id),
    email           text NOT NULL UNIQUE CHECK (email = lower(email) AND email LIKE '%@%'),
    name            text NOT NULL,
    role            text NOT NULL CHECK (role IN ('admin', 'attendant')),
    password_hash   text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    disabled_at     timestamptz
);

-- One-time sign-in codes, stored hashed; a code has a few attempts and a short life.
CREATE TABLE login_codes (
    id          bigserial PRIMARY KEY,
    phone       text NOT NULL,
    code_hash   text NOT NULL,
    expires_at  timestamptz NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    consumed_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_codes_phone ON login_codes (phone, created_at DESC);

-- Refresh tokens rotate on every use; presenting a rotated one again revokes its family
-- (a stolen token used after the owner refreshed gives itself away).
CREATE TABLE refresh_tokens (
    id          bigserial PRIMARY KEY,
    token_hash  text NOT NULL UNIQUE,
    subject     text NOT NULL,
    family      uuid NOT NULL,
    issued_at   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    rotated_at  timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family);

-- Keys for machines: the city platform and guidance signs ('city'), gates pushing captures
-- over HTTP ('gate', bound to one gate). Only a hash is kept.
CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('city', 'gate')),
    key_hash    text NOT NULL UNIQUE,
    label       text NOT NULL,
    gate_id     bigint REFERENCES gates(id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK ((kind = 'gate') = (gate_id IS NOT NULL))
);

-- How a binding was proven (vehicle licence checked by the verification adapter).
ALTER TABLE plate_bindings
    ADD COLUMN verified_by text,
    ADD COLUMN licence_ref text;

-- A second driver claiming a bound plate opens a dispute; the plate does not move by itself.
CREATE TABLE plate_disputes (
    id                   bigserial PRIMARY KEY,
    plate                text NOT NULL,
    color                text NOT NULL,
    claimant_account_id  bigint NOT NULL REFERENCES accounts(id),
    holder_account_id    bigint NOT NULL REFERENCES accounts(id),
    status               text NOT NULL DEFAULT 'open'
                         CHECK (status IN ('open', 'upheld', 'rejected', 'withdrawn')),
    created_at           timestamptz NOT NULL DEFAULT now(),
    resolved_at          timestamptz
);
CREATE UNIQUE INDEX plate_disputes_one_open ON plate_disputes (plate, claimant_account_id)
    WHERE status = 'open';

-- A deleted account keeps its money records (required by law) but loses its personal data.
ALTER TABLE accounts ADD COLUMN deleted_at timestamptz;

CREATE INDEX audit_log_subject ON audit_log (subject, created_at DESC);
CREATE INDEX sessions_plate_entered ON sessions (car_park_id, plate, entered_at DESC);
CREATE INDEX lane_exceptions_images ON lane_exceptions (created_at) WHERE image IS NOT NULL;

GRANT SELECT, INSERT, UPDATE, DELETE ON operator_users, login_codes, refresh_tokens, api_keys,
    plate_disputes TO parking_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO parking_app;

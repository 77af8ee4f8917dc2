-- "Not my car" on a missed stay's debt (issue #15): a held stay whose car left without paying
-- is a debt with no charge behind it, and its driver may dispute it like a charge. A dispute
-- names its stay and what it disputes (a charge, or a missed stay's debt) and keeps the amount:
-- a charge that was awaiting is deleted when the driver is right (as the confirmation queue's
-- reject deletes it), so that its reopened stay can be charged at its real exit.
ALTER TABLE charge_disputes
    ADD COLUMN session_id bigint REFERENCES sessions(id),
    ADD COLUMN amount_fen bigint CHECK (amount_fen > 0),
    ADD COLUMN debt_id bigint UNIQUE REFERENCES debts(id),
    -- The exit disputed, as it was: a stay opened again loses its exit.
    ADD COLUMN exit_capture_id uuid,
    ADD COLUMN exited_at timestamptz;
UPDATE charge_disputes d
SET session_id = c.session_id, amount_fen = c.amount_fen,
    exit_capture_id = s.exit_capture_id, exited_at = s.exited_at
FROM charges c JOIN sessions s ON s.id = c.session_id WHERE c.id = d.charge_id;
ALTER TABLE charge_disputes
    ALTER COLUMN session_id SET NOT NULL,
    ALTER COLUMN amount_fen SET NOT NULL,
    ALTER COLUMN charge_id DROP NOT NULL,
    ADD CONSTRAINT charge_disputes_of_one CHECK (charge_id IS NULL OR debt_id IS NULL),
    ADD CONSTRAINT charge_disputes_open_of_something
        CHECK (status <> 'open' OR charge_id IS NOT NULL OR debt_id IS NOT NULL);
CREATE INDEX charge_disputes_session_id_idx ON charge_disputes (session_id);

-- Every debt names its stay: an operator's decision waives the debt of the disputed stay.
UPDATE debts d SET session_id = c.session_id
FROM charges c WHERE c.id = d.charge_id AND d.session_id IS NULL;
ALTER TABLE debts ALTER COLUMN session_id SET NOT NULL;
ALTER TABLE debts DROP CONSTRAINT debts_from_charge_or_stay;

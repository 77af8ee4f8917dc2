-- The driver app: a driver's stays are found by their plates' bindings and by the account they
-- were charged to; a plate claim that opens a dispute keeps the claimant's proof of ownership.

-- GET /api/v1/me/stays: stays of a bound plate (from its binding on) and stays charged to the
-- account, newest first.
CREATE INDEX sessions_plate_entered_any_park ON sessions (plate, entered_at DESC);
CREATE INDEX sessions_account_entered ON sessions (account_id, entered_at DESC)
    WHERE account_id IS NOT NULL;
-- GET /api/v1/me/export: the account's money records.
CREATE INDEX charges_account ON charges (account_id);
CREATE INDEX refunds_account ON refunds (account_id) WHERE account_id IS NOT NULL;
CREATE INDEX plate_disputes_claimant ON plate_disputes (claimant_account_id);
CREATE INDEX plate_disputes_holder ON plate_disputes (holder_account_id);

-- The claimant proved ownership through the vehicle registry before the dispute was opened;
-- whoever resolves it sees by what, and an upheld claim becomes a binding with that proof.
ALTER TABLE plate_disputes
    ADD COLUMN claimant_verified_by text,
    ADD COLUMN claimant_licence_ref text;

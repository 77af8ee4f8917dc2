-- A driver who deletes their account withdraws their open "not my car" disputes: no operator
-- decides (refunds, tells) for an account that is gone. Deleting waits while a disputed charge
-- is unsettled or a disputed debt owed, so only a collected charge's dispute is withdrawn, and
-- nothing was held by it.
ALTER TABLE charge_disputes DROP CONSTRAINT charge_disputes_status_check;
ALTER TABLE charge_disputes ADD CONSTRAINT charge_disputes_status_check
    CHECK (status IN ('open', 'driver_right', 'charge_stands', 'withdrawn'));

-- "Not my car" on a failed charge (issue #15): while the dispute is open its debt is on hold
-- (billing.debts.UNDISPUTED); when an operator agrees with the driver the debt is waived,
-- settled by nobody, and the fee's accrual reversed in the ledger.
ALTER TABLE debts ADD COLUMN waived boolean NOT NULL DEFAULT false;
ALTER TABLE debts DROP CONSTRAINT debts_check;
ALTER TABLE debts ADD CONSTRAINT debts_check
    CHECK ((settled_at IS NULL) = (payment_id IS NULL AND NOT settled_by_charge AND NOT waived));

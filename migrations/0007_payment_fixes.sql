-- A stay is booked once by closing it (only an open stay closes), not by this index: with it,
-- a driver who paid two QR codes of the same stay (two exit lanes) could not be booked at all,
-- while the second payment must be booked and refunded as an overpayment.
DROP INDEX payments_stay_paid_once;
-- One open debt payment per account: asking again returns it.
CREATE UNIQUE INDEX payments_one_open_debts_payment ON payments (account_id)
    WHERE purpose = 'debts' AND status = 'pending';

-- A charge the provider refused for the car park's own reason (billing.charges.hold_for_operator)
-- has not been sent since: no money can move for it, so a driver's "not my car" holds it and an
-- operator who agrees cancels it, as a charge never sent (issue #15). Cleared when it is sent.
ALTER TABLE charges ADD COLUMN refused_at timestamptz;
UPDATE charges c SET refused_at = e.created_at
FROM charge_exceptions e
WHERE e.charge_id = c.id AND e.status = 'open' AND c.status = 'pending';

-- Stays opened again when an operator upheld "not my car" on a charge that was awaiting, before
-- that charge was deleted as the confirmation queue's reject deletes it (issue #15): the
-- cancelled charge held the stay's one charge, so the car's real exit failed at the database.
-- Such a charge was never booked, sent nor collected: it is deleted, its dispute keeping the
-- stay, the amount and the exit disputed.
UPDATE charge_disputes d SET charge_id = NULL
FROM charges c JOIN sessions s ON s.id = c.session_id
WHERE d.charge_id = c.id AND d.status <> 'open' AND c.status = 'cancelled' AND s.status = 'open';

DELETE FROM charges c USING sessions s
WHERE s.id = c.session_id AND c.status = 'cancelled' AND s.status = 'open'
  AND NOT EXISTS (SELECT 1 FROM charge_disputes d WHERE d.charge_id = c.id)
  AND NOT EXISTS (SELECT 1 FROM ledger_entries l WHERE l.charge_id = c.id)
  AND NOT EXISTS (SELECT 1 FROM receipts r WHERE r.charge_id = c.id)
  AND NOT EXISTS (SELECT 1 FROM refunds r WHERE r.charge_id = c.id)
  AND NOT EXISTS (SELECT 1 FROM debts d WHERE d.charge_id = c.id)
  AND NOT EXISTS (SELECT 1 FROM charge_exceptions e WHERE e.charge_id = c.id);

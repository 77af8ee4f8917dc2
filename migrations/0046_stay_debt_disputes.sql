-- "Not my car" on a missed stay's debt (issue #15): a held stay whose car left without paying
-- is a debt with no charge behind it, and its driver may dispute it like a charge. A dispute
-- is of a stay (one per stay, as one charge per stay), of its charge when it has one.
ALTER TABLE charge_disputes ADD COLUMN session_id bigint REFERENCES sessions(id);
UPDATE charge_disputes d SET session_id = c.session_id FROM charges c WHERE c.id = d.charge_id;
ALTER TABLE charge_disputes ALTER COLUMN session_id SET NOT NULL;
ALTER TABLE charge_disputes ADD CONSTRAINT charge_disputes_session_id_key UNIQUE (session_id);
ALTER TABLE charge_disputes ALTER COLUMN charge_id DROP NOT NULL;

-- Every debt names its stay, so a dispute of the stay puts it on hold (billing.debts.UNDISPUTED).
UPDATE debts d SET session_id = c.session_id
FROM charges c WHERE c.id = d.charge_id AND d.session_id IS NULL;
ALTER TABLE debts ALTER COLUMN session_id SET NOT NULL;
ALTER TABLE debts DROP CONSTRAINT debts_from_charge_or_stay;

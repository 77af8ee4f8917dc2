-- Exits a gate let through on its own while the server was unreachable. What the gate did is
-- kept with the capture; a car that left offline without a way to charge it (not bound, no
-- agreement, over its limit, in arrears) has its stay closed as unpaid and goes to a person.
ALTER TABLE captures
    ADD COLUMN offline_action text CHECK (offline_action IN ('open', 'hold'));
ALTER TABLE lane_exceptions DROP CONSTRAINT lane_exceptions_reason_check;
ALTER TABLE lane_exceptions ADD CONSTRAINT lane_exceptions_reason_check
    CHECK (reason IN ('unreadable', 'ambiguous', 'no_entry', 'offline_exit'));
ALTER TABLE sessions DROP CONSTRAINT sessions_settlement_check;
ALTER TABLE sessions ADD CONSTRAINT sessions_settlement_check
    CHECK (settlement IN ('free', 'pay_later', 'paid_at_gate', 'operator', 'offline_unpaid'));

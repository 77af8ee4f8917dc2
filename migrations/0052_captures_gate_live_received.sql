-- Which car is first at a gate's barrier is the live capture the server received last there
-- (parking.payments.repository.newest_after): a replaced controller starts its seq again, so
-- the gate's seq orders nothing across controllers.
CREATE INDEX captures_gate_live_received ON captures (gate_id, received_at) WHERE NOT offline;

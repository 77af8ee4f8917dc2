-- An offline capture's time is bounded by the gate's own live captures around it (a lower seq
-- was taken before it, a higher one after): found by the gate and its counter.
CREATE INDEX captures_gate_live_seq ON captures (gate_id, seq) INCLUDE (received_at)
    WHERE NOT offline;

-- The edges of the lane (issues #15, #16): a held stay that was never paid, booth payments,
-- offline captures sent to the booth, ghost stays and gate clocks.

-- How a stay ended, for the new endings:
--   paid_at_booth  an attendant took cash or a card at the booth (booth_payments)
--   offline_booth  the gate, offline, sent the car to the booth: awaiting a booth payment
--   debt           held with a fee and gone without paying: a debt of the account bound at entry
--   unpaid_exit    the same with nobody to owe it: an operator exception
ALTER TABLE sessions DROP CONSTRAINT sessions_settlement_check;
ALTER TABLE sessions ADD CONSTRAINT sessions_settlement_check
    CHECK (settlement IN ('free', 'pay_later', 'paid_at_gate', 'operator', 'offline_unpaid',
                          'paid_at_booth', 'offline_booth', 'debt', 'unpaid_exit'));

ALTER TABLE lane_exceptions DROP CONSTRAINT lane_exceptions_reason_check;
ALTER TABLE lane_exceptions ADD CONSTRAINT lane_exceptions_reason_check
    CHECK (reason IN ('unreadable', 'ambiguous', 'no_entry', 'offline_exit', 'uncertain',
                      'rejected', 'unpaid_exit', 'offline_booth', 'ghost_stay'));

-- The last hold of a stay with a fee, found when the plate enters again (a tailgated exit).
-- Partial: only held exits a driver could pay are indexed, a small share of captures.
CREATE INDEX captures_held_session ON captures (session_id, received_at DESC)
    WHERE outcome IN ('held_unbound', 'held_no_agreement', 'held_over_limit', 'held_arrears');

-- A debt is a stay's fee owed: from a failed charge, or from a held stay left without paying
-- (no charge at all). One debt per stay.
ALTER TABLE debts ALTER COLUMN charge_id DROP NOT NULL,
    ADD COLUMN session_id bigint REFERENCES sessions(id);
UPDATE debts d SET session_id = c.session_id FROM charges c WHERE c.id = d.charge_id;
ALTER TABLE debts ADD CONSTRAINT debts_session_id_key UNIQUE (session_id),
    ADD CONSTRAINT debts_from_charge_or_stay CHECK (charge_id IS NOT NULL OR session_id IS NOT NULL);

-- A stay's fee is earned once, whichever way it is taken: a pay-later charge's accrual, a
-- payment at the gate, a booth payment or a debt of a stay left unpaid all credit the car
-- park's revenue with the stay's id, and every such line writes this row. A second one is a
-- unique violation, so no upload, charge, QR payment or booth payment can take it again.
CREATE TABLE stay_fee_bookings (
    session_id      bigint PRIMARY KEY,
    kind            text NOT NULL,
    transaction_id  uuid NOT NULL
);
CREATE FUNCTION stay_fee_book_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO stay_fee_bookings (session_id, kind, transaction_id)
    VALUES (NEW.session_id, NEW.kind, NEW.transaction_id);
    RETURN NULL;
END $$;
CREATE TRIGGER stay_fee_book_once AFTER INSERT ON ledger_entries FOR EACH ROW
    WHEN (NEW.session_id IS NOT NULL AND NEW.amount_fen < 0
          AND NEW.ledger_account LIKE 'revenue:%' AND NEW.kind <> 'refund')
    EXECUTE FUNCTION stay_fee_book_once();
INSERT INTO stay_fee_bookings
    SELECT DISTINCT ON (session_id) session_id, kind, transaction_id FROM ledger_entries
    WHERE session_id IS NOT NULL AND amount_fen < 0 AND ledger_account LIKE 'revenue:%'
      AND kind <> 'refund'
    ORDER BY session_id, created_at;

-- Cash or a card taken by an attendant at the booth for one stay.
CREATE TABLE booth_payments (
    id                   bigserial PRIMARY KEY,
    car_park_id          bigint NOT NULL REFERENCES car_parks(id),
    session_id           bigint NOT NULL UNIQUE REFERENCES sessions(id),
    -- The held exit it was taken at, when there was one.
    capture_id           uuid,
    capture_captured_at  timestamptz,
    method               text NOT NULL CHECK (method IN ('cash', 'card')),
    amount_fen           bigint NOT NULL CHECK (amount_fen > 0),
    recorded_by          text NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    CHECK ((capture_id IS NULL) = (capture_captured_at IS NULL)),
    FOREIGN KEY (capture_id, capture_captured_at) REFERENCES captures (capture_id, captured_at)
);
CREATE INDEX booth_payments_car_park_day ON booth_payments (car_park_id, created_at);

-- Ghost stays: open far longer than the car park's limit, or their plate seen elsewhere since.
ALTER TABLE car_parks ADD COLUMN ghost_stay_after_days integer NOT NULL DEFAULT 7
    CHECK (ghost_stay_after_days > 0);
-- Set once when a stay was sent to the exception queue as a ghost; such a stay is never a
-- candidate for matching an uncertain exit read.
ALTER TABLE sessions ADD COLUMN ghost_at timestamptz;

-- Offline captures whose gate clock was off by more than the tolerance: the time the stay was
-- priced at, and the gate's, for an operator.
CREATE TABLE gate_clock_skews (
    id            bigserial PRIMARY KEY,
    capture_id    uuid NOT NULL UNIQUE,
    car_park_id   bigint NOT NULL REFERENCES car_parks(id),
    gate_id       bigint NOT NULL REFERENCES gates(id),
    direction     text NOT NULL CHECK (direction IN ('in', 'out')),
    session_id    bigint,
    gate_time     timestamptz NOT NULL,
    received_at   timestamptz NOT NULL,
    -- 'ahead': the gate's time was after we received the capture; 'behind': before the stay's
    -- entry.
    kind          text NOT NULL CHECK (kind IN ('ahead', 'behind')),
    skew_s        integer NOT NULL,
    taken_at      timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gate_clock_skews_car_park ON gate_clock_skews (car_park_id, created_at DESC);

GRANT SELECT, INSERT ON stay_fee_bookings TO parking_app;
GRANT SELECT, INSERT, UPDATE ON booth_payments, gate_clock_skews TO parking_app;
GRANT USAGE, SELECT ON SEQUENCE booth_payments_id_seq, gate_clock_skews_id_seq TO parking_app;

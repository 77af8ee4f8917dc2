-- Stays, captures and ledger lines are partitioned by month (UTC), so a month is one table
-- whose indexes fit in memory while it is written, vacuum works on what changes, and old months
-- can be detached and archived whole. `parking partitions` (and the worker, hourly) creates the
-- months ahead through ensure_month_partition(); a DEFAULT partition catches anything outside
-- them (a gate whose clock is years off) so no write ever fails for want of a partition.
-- docs/partitioning.md explains the choices and shows the plans.
--
-- The existing rows are copied into the new tables: on a large database run this in a
-- maintenance window (the lanes cannot write while it runs).

-- Stays are partitioned by their id, which starts with the UTC day the stay was recorded:
-- id = days since 2000-01-01 * 10^10 + sequence. Every reference to a stay (captures, charges,
-- payments, ledger lines) stays a plain foreign key to sessions(id), and the id is still unique
-- across all months, which a key on entered_at would not allow.
CREATE FUNCTION session_id_floor(day date) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (day - DATE '2000-01-01')::bigint * 10000000000;

CREATE FUNCTION next_session_id() RETURNS bigint
    LANGUAGE sql VOLATILE
    RETURN session_id_floor((now() AT TIME ZONE 'UTC')::date)
           + nextval('sessions_id_seq') % 10000000000;

-- The month partition of `parent` ('sessions', 'captures' or 'ledger_entries') holding `month`,
-- created if missing. Returns its name, or NULL when it exists already or when the DEFAULT
-- partition holds rows of that month (they stay there, correct but unpartitioned, and a warning
-- says so: moving them is an operator's decision). SECURITY DEFINER: the services' role may
-- create next month's tables through this and nothing else.
CREATE FUNCTION ensure_month_partition(parent text, month date) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    first_day date := date_trunc('month', month)::date;
    next_day date := (date_trunc('month', month) + interval '1 month')::date;
    partition text := format('%s_%s', parent, to_char(first_day, 'YYYY_MM'));
    key text;
    low text;
    high text;
    stranded boolean;
BEGIN
    IF parent = 'sessions' THEN
        key := 'id';
        low := session_id_floor(first_day)::text;
        high := session_id_floor(next_day)::text;
    ELSIF parent IN ('captures', 'ledger_entries') THEN
        key := CASE parent WHEN 'captures' THEN 'captured_at' ELSE 'created_at' END;
        low := quote_literal(first_day::text || ' 00:00:00+00');
        high := quote_literal(next_day::text || ' 00:00:00+00');
    ELSE
        RAISE EXCEPTION 'not a partitioned table: %', parent;
    END IF;
    IF to_regclass(partition) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE %I >= %s AND %I < %s)',
                   parent || '_default', key, low, key, high) INTO stranded;
    IF stranded THEN
        RAISE WARNING '% has rows of % in its default partition; % not created',
            parent, to_char(first_day, 'YYYY-MM'), partition;
        RETURN NULL;
    END IF;
    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%s) TO (%s)',
                   partition, parent, low, high);
    IF parent = 'ledger_entries' THEN
        -- Statement triggers are not inherited: a partition truncated directly is refused too.
        EXECUTE format('CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON %I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only()', partition);
    END IF;
    RETURN partition;
END $$;
REVOKE ALL ON FUNCTION ensure_month_partition(text, date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ensure_month_partition(text, date) TO parking_app;

-- Everything before this month goes to one partition per table, created here.
CREATE FUNCTION pg_temp.create_history_partition(parent text, key_is_id boolean) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    this_month date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    high text := CASE WHEN key_is_id THEN session_id_floor(this_month)::text
                      ELSE quote_literal(this_month::text || ' 00:00:00+00') END;
BEGIN
    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (MINVALUE) TO (%s)',
                   parent || '_before_' || to_char(this_month, 'YYYY_MM'), parent, high);
    EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', parent || '_default', parent);
    IF parent = 'ledger_entries' THEN
        CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger_entries_default
            FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
        EXECUTE format('CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON %I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only()',
                       'ledger_entries_before_' || to_char(this_month, 'YYYY_MM'));
    END IF;
    FOR i IN 0..2 LOOP
        PERFORM ensure_month_partition(parent, (this_month + make_interval(months => i))::date);
    END LOOP;
END $$;

-- The references into the three tables are dropped here and added again at the end.
ALTER TABLE captures DROP CONSTRAINT captures_session_id_fkey;
ALTER TABLE charges DROP CONSTRAINT charges_session_id_fkey;
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_session_id_fkey;
ALTER TABLE payments DROP CONSTRAINT payments_session_id_fkey;
ALTER TABLE payments DROP CONSTRAINT payments_capture_id_fkey;
ALTER TABLE lane_exceptions DROP CONSTRAINT lane_exceptions_capture_id_fkey;
ALTER SEQUENCE sessions_id_seq OWNED BY NONE;
ALTER SEQUENCE ledger_entries_id_seq OWNED BY NONE;

-- Stays.
ALTER TABLE sessions RENAME TO sessions_unpartitioned;
CREATE TABLE sessions (LIKE sessions_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (id);
ALTER TABLE sessions ALTER COLUMN id SET DEFAULT next_session_id();
ALTER SEQUENCE sessions_id_seq OWNED BY sessions.id;
SELECT pg_temp.create_history_partition('sessions', true);
INSERT INTO sessions SELECT * FROM sessions_unpartitioned;
DROP TABLE sessions_unpartitioned;
ALTER TABLE sessions ADD CONSTRAINT sessions_pkey PRIMARY KEY (id),
    ADD CONSTRAINT sessions_car_park_id_fkey FOREIGN KEY (car_park_id) REFERENCES car_parks(id),
    ADD CONSTRAINT sessions_account_id_fkey FOREIGN KEY (account_id) REFERENCES accounts(id);
-- Not unique any more (a unique index must contain the partition key); a capture still decides
-- once, because captures are unique and a redelivered one is answered from its row.
CREATE INDEX sessions_open ON sessions (car_park_id, plate) WHERE status = 'open';
CREATE INDEX sessions_recent_exits ON sessions (car_park_id, plate, exited_at DESC)
    WHERE status = 'closed';
CREATE INDEX sessions_plate_entered ON sessions (car_park_id, plate, entered_at DESC);
CREATE INDEX sessions_plate_entered_any_park ON sessions (plate, entered_at DESC);
CREATE INDEX sessions_account_entered ON sessions (account_id, entered_at DESC)
    WHERE account_id IS NOT NULL;
CREATE INDEX sessions_car_park_entered ON sessions (car_park_id, entered_at DESC);
-- The dashboard's exits per hour and the occupancy rebuild read exits by car park and time.
CREATE INDEX sessions_car_park_exited ON sessions (car_park_id, exited_at DESC)
    WHERE exited_at IS NOT NULL;

-- One open stay per plate per car park, across all months: the exit closes exactly one, once.
CREATE TABLE open_stays (
    car_park_id bigint NOT NULL,
    plate       text NOT NULL,
    session_id  bigint NOT NULL UNIQUE REFERENCES sessions(id) ON DELETE CASCADE,
    CONSTRAINT sessions_one_open PRIMARY KEY (car_park_id, plate)
);
INSERT INTO open_stays SELECT car_park_id, plate, id FROM sessions WHERE status = 'open';

CREATE FUNCTION sessions_track_open() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status = 'open' THEN
        DELETE FROM open_stays WHERE session_id = OLD.id;
    END IF;
    IF NEW.status = 'open' THEN
        INSERT INTO open_stays (car_park_id, plate, session_id)
        VALUES (NEW.car_park_id, NEW.plate, NEW.id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER sessions_track_open_insert AFTER INSERT ON sessions
    FOR EACH ROW WHEN (NEW.status = 'open') EXECUTE FUNCTION sessions_track_open();
CREATE TRIGGER sessions_track_open_update AFTER UPDATE OF status, car_park_id, plate ON sessions
    FOR EACH ROW WHEN (OLD.status = 'open' OR NEW.status = 'open')
    EXECUTE FUNCTION sessions_track_open();

-- Captures, by the gate's capture time. A capture is identified by (capture_id, captured_at):
-- a gate re-sends a capture verbatim, time included, so a redelivery still meets its row.
ALTER TABLE captures RENAME TO captures_unpartitioned;
CREATE TABLE captures (LIKE captures_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (captured_at);
SELECT pg_temp.create_history_partition('captures', false);
INSERT INTO captures SELECT * FROM captures_unpartitioned;
DROP TABLE captures_unpartitioned;
ALTER TABLE captures ADD CONSTRAINT captures_pkey PRIMARY KEY (capture_id, captured_at),
    ADD CONSTRAINT captures_gate_id_fkey FOREIGN KEY (gate_id) REFERENCES gates(id),
    ADD CONSTRAINT captures_car_park_id_fkey FOREIGN KEY (car_park_id) REFERENCES car_parks(id),
    ADD CONSTRAINT captures_session_id_fkey FOREIGN KEY (session_id) REFERENCES sessions(id);
-- (gate_id, seq) and received_at were indexed for lookups nothing makes: a capture is found
-- by its id, and retention works on lane_exceptions.

ALTER TABLE lane_exceptions ADD COLUMN capture_captured_at timestamptz;
UPDATE lane_exceptions e SET capture_captured_at = c.captured_at
    FROM captures c WHERE c.capture_id = e.capture_id;
ALTER TABLE lane_exceptions ALTER COLUMN capture_captured_at SET NOT NULL,
    ADD CONSTRAINT lane_exceptions_capture_fkey FOREIGN KEY (capture_id, capture_captured_at)
        REFERENCES captures (capture_id, captured_at) DEFERRABLE INITIALLY DEFERRED;

ALTER TABLE payments ADD COLUMN capture_captured_at timestamptz;
UPDATE payments p SET capture_captured_at = c.captured_at
    FROM captures c WHERE c.capture_id = p.capture_id;
ALTER TABLE payments
    ADD CONSTRAINT payments_capture_fkey FOREIGN KEY (capture_id, capture_captured_at)
        REFERENCES captures (capture_id, captured_at),
    ADD CONSTRAINT payments_capture_captured_at_check
        CHECK ((capture_id IS NULL) = (capture_captured_at IS NULL)),
    ADD CONSTRAINT payments_session_id_fkey FOREIGN KEY (session_id) REFERENCES sessions(id);
ALTER TABLE charges
    ADD CONSTRAINT charges_session_id_fkey FOREIGN KEY (session_id) REFERENCES sessions(id);

-- Ledger lines, by the time they were written.
ALTER TABLE ledger_entries RENAME TO ledger_entries_unpartitioned;
CREATE TABLE ledger_entries (
    LIKE ledger_entries_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS
) PARTITION BY RANGE (created_at);
ALTER SEQUENCE ledger_entries_id_seq OWNED BY ledger_entries.id;
SELECT pg_temp.create_history_partition('ledger_entries', false);
INSERT INTO ledger_entries SELECT * FROM ledger_entries_unpartitioned;
DROP TABLE ledger_entries_unpartitioned;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_pkey PRIMARY KEY (id, created_at),
    ADD CONSTRAINT ledger_entries_session_id_fkey
        FOREIGN KEY (session_id) REFERENCES sessions(id),
    ADD CONSTRAINT ledger_entries_charge_id_fkey FOREIGN KEY (charge_id) REFERENCES charges(id),
    ADD CONSTRAINT ledger_entries_payment_id_fkey FOREIGN KEY (payment_id) REFERENCES payments(id),
    ADD CONSTRAINT ledger_entries_refund_id_fkey FOREIGN KEY (refund_id) REFERENCES refunds(id);
CREATE INDEX ledger_entries_txn ON ledger_entries (transaction_id);
CREATE INDEX ledger_entries_account ON ledger_entries (ledger_account);
CREATE INDEX ledger_entries_created ON ledger_entries (created_at);
-- The revenue report reads only the car parks' revenue lines of some days: index-only.
CREATE INDEX ledger_entries_revenue ON ledger_entries (created_at)
    INCLUDE (ledger_account, kind, amount_fen) WHERE ledger_account LIKE 'revenue:%';

-- What may be booked only once (a stay's fee, a charge's settlement, a payment, a refund), across
-- all months: one row here per booking, written by the ledger line itself.
CREATE TABLE ledger_bookings (
    kind            text NOT NULL,
    ref_id          bigint NOT NULL,
    ledger_account  text NOT NULL,
    transaction_id  uuid NOT NULL,
    PRIMARY KEY (kind, ref_id, ledger_account)
);
CREATE FUNCTION ledger_booking_ref(kind text, session_id bigint, charge_id bigint,
                                   payment_id bigint, refund_id bigint) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE kind WHEN 'fee_accrued' THEN session_id WHEN 'charge_settled' THEN charge_id
                     WHEN 'payment_received' THEN payment_id WHEN 'refund' THEN refund_id END;
INSERT INTO ledger_bookings
    SELECT kind, ref, ledger_account, transaction_id FROM (
        SELECT kind, ledger_booking_ref(kind, session_id, charge_id, payment_id, refund_id) AS ref,
               ledger_account, transaction_id FROM ledger_entries) lines
    WHERE ref IS NOT NULL;
CREATE FUNCTION ledger_book_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger_bookings (kind, ref_id, ledger_account, transaction_id)
    VALUES (NEW.kind, ledger_booking_ref(NEW.kind, NEW.session_id, NEW.charge_id, NEW.payment_id,
                                         NEW.refund_id),
            NEW.ledger_account, NEW.transaction_id);
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_book_once AFTER INSERT ON ledger_entries FOR EACH ROW
    WHEN (ledger_booking_ref(NEW.kind, NEW.session_id, NEW.charge_id, NEW.payment_id,
                             NEW.refund_id) IS NOT NULL)
    EXECUTE FUNCTION ledger_book_once();

CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE CONSTRAINT TRIGGER ledger_balanced AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_transaction_balanced();
CREATE TRIGGER ledger_bookings_no_update_delete BEFORE UPDATE OR DELETE ON ledger_bookings
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_bookings_no_truncate BEFORE TRUNCATE ON ledger_bookings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- The history partitions were created by the migration's role; the ones ensure_month_partition
-- creates belong to the function's owner, the same role.
GRANT SELECT, INSERT, UPDATE, DELETE ON sessions, captures, open_stays TO parking_app;
GRANT SELECT, INSERT ON ledger_entries, ledger_bookings TO parking_app;
-- The partition maintenance counts what landed outside the months (parking/partitions).
GRANT SELECT ON sessions_default, captures_default, ledger_entries_default TO parking_app;

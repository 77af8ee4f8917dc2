-- Never the wrong driver (issue #15, the lane's part). DESIGN.md "The exit decision" 3-5, 9.
--
-- A plate's identity is (characters, colour): 蓝 浙A12345 and 黄 浙A12345 are two vehicles. A stay
-- is opened, found and closed by both, and one stay is open per (car park, plate, colour).
-- Stays recorded without a colour get the one the plate's grammar implies: 8 characters are a
-- new-energy plate (green), anything else blue (the commonest). The lane always records one
-- from now on (the read's when the plate's grammar allows it, else the same guess), and a
-- trigger gives it to any other writer that leaves it out.
CREATE FUNCTION plate_color_of(plate text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN char_length(plate) = 8 THEN 'green' ELSE 'blue' END;

UPDATE sessions SET plate_color = plate_color_of(plate) WHERE plate_color IS NULL;

CREATE FUNCTION sessions_default_color() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.plate_color := plate_color_of(NEW.plate);
    RETURN NEW;
END $$;
-- Only rows without a colour call it: the lane's inserts pay nothing.
CREATE TRIGGER sessions_default_color BEFORE INSERT ON sessions
    FOR EACH ROW WHEN (NEW.plate_color IS NULL) EXECUTE FUNCTION sessions_default_color();
ALTER TABLE sessions ALTER COLUMN plate_color SET NOT NULL;

-- Whether the stay's entry read was certain (a calibrated score at or above its source's
-- threshold, a colour, a valid plate of that colour). Only a stay whose entry and exit reads
-- were both certain is charged pay-later without a person. Stays open now count as certain
-- when their entry was a camera read of at least 0.98 (the cameras' default threshold) with
-- the stay's colour; every other one needs a person (or the car park's policy) at its exit.
ALTER TABLE sessions ADD COLUMN entry_certain boolean NOT NULL DEFAULT false;
UPDATE sessions s SET entry_certain = true
    FROM captures c
    WHERE s.status = 'open' AND c.capture_id = s.entry_capture_id
      AND c.plate_source = 'camera' AND c.read_confidence >= 0.98
      AND c.plate_color = s.plate_color;

-- The exit's (or entry's) read: certain or not. NULL for captures decided before this.
ALTER TABLE captures ADD COLUMN read_certain boolean;

-- One open stay per (car park, plate, colour).
ALTER TABLE open_stays ADD COLUMN plate_color text;
UPDATE open_stays o SET plate_color = s.plate_color FROM sessions s WHERE s.id = o.session_id;
ALTER TABLE open_stays ALTER COLUMN plate_color SET NOT NULL;
ALTER TABLE open_stays DROP CONSTRAINT sessions_one_open;
ALTER TABLE open_stays ADD CONSTRAINT sessions_one_open PRIMARY KEY (car_park_id, plate, plate_color);

CREATE OR REPLACE FUNCTION sessions_track_open() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status = 'open' THEN
        DELETE FROM open_stays WHERE session_id = OLD.id;
    END IF;
    IF NEW.status = 'open' THEN
        INSERT INTO open_stays (car_park_id, plate, plate_color, session_id)
        VALUES (NEW.car_park_id, NEW.plate, NEW.plate_color, NEW.id);
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER sessions_track_open_update ON sessions;
CREATE TRIGGER sessions_track_open_update
    AFTER UPDATE OF status, car_park_id, plate, plate_color ON sessions
    FOR EACH ROW WHEN (OLD.status = 'open' OR NEW.status = 'open')
    EXECUTE FUNCTION sessions_track_open();

-- What a car park does with an exit whose pay-later charge cannot rest on two certain reads:
-- 'open_confirm' (the default, exits stay fast): the gate opens, the stay closes and the
-- charge waits in 'awaiting_confirmation' for an operator; 'hold': the gate holds and an
-- operator decides at the gate.
ALTER TABLE car_parks ADD COLUMN uncertain_exit_policy text NOT NULL DEFAULT 'open_confirm'
    CHECK (uncertain_exit_policy IN ('hold', 'open_confirm'));

-- A charge awaiting an operator's confirmation: no ledger line and no outbox job until it is
-- confirmed (then 'pending' and queued, once); a rejected one is deleted (it was never booked
-- nor sent; the audit log keeps it).
ALTER TABLE charges DROP CONSTRAINT charges_status_check;
ALTER TABLE charges ADD CONSTRAINT charges_status_check
    CHECK (status IN ('pending', 'succeeded', 'failed', 'awaiting_confirmation'));
CREATE INDEX charges_awaiting_confirmation ON charges (created_at)
    WHERE status = 'awaiting_confirmation';

-- 'uncertain': held under the 'hold' policy; 'rejected': an operator rejected a charge
-- awaiting confirmation, the exit waits for the right plate.
ALTER TABLE lane_exceptions DROP CONSTRAINT lane_exceptions_reason_check;
ALTER TABLE lane_exceptions ADD CONSTRAINT lane_exceptions_reason_check
    CHECK (reason IN ('unreadable', 'ambiguous', 'no_entry', 'offline_exit', 'uncertain',
                      'rejected'));

-- The first frame of every capture that sent one, written in the capture's own statement: the
-- entry and exit frames an operator confirms a charge with, a receipt shows and a dispute is
-- decided on. The image is erased (NULL) after PARKING_IMAGE_RETENTION_DAYS; the row stays.
CREATE TABLE capture_frames (
    capture_id   uuid PRIMARY KEY REFERENCES capture_keys(capture_id),
    captured_at  timestamptz NOT NULL,
    car_park_id  bigint NOT NULL REFERENCES car_parks(id),
    image        bytea,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX capture_frames_images ON capture_frames (created_at) WHERE image IS NOT NULL;
GRANT SELECT, INSERT, UPDATE ON capture_frames TO parking_app;

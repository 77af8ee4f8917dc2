-- The operator API: an attendant's decision on a held capture is recorded as the plate's
-- source, and staff list a car park's stays newest first.

-- A held capture an operator resolved carries the plate the operator gave.
ALTER TABLE captures DROP CONSTRAINT captures_plate_source_check;
ALTER TABLE captures ADD CONSTRAINT captures_plate_source_check
    CHECK (plate_source IN ('camera', 'ocr', 'none', 'operator'));

-- GET /api/v1/operator/stays without a plate: a car park's stays by entry, newest first.
CREATE INDEX sessions_car_park_entered ON sessions (car_park_id, entered_at DESC);

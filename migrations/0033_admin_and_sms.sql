-- A car park's street address, written by `parking admin car-park create` (shown to operators;
-- the location itself is latitude/longitude).
ALTER TABLE car_parks ADD COLUMN address text CHECK (address IS NULL OR length(address) <= 200);

-- A notification's fields, for SMS templates with one variable each (parking.sms: the charge
-- message's plate, car park, time, duration, amount and receipt link). NULL: only the text.
ALTER TABLE notifications ADD COLUMN params jsonb;

-- A car park's street address, written by `parking admin car-park create` (shown to operators;
-- the location itself is latitude/longitude).
ALTER TABLE car_parks ADD COLUMN address text CHECK (address IS NULL OR length(address) <= 200);

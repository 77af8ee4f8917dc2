-- A plate's pay-later service must have covered a stay's entry, as its binding and its agreement
-- must: a stay that came in while the service was paused (the provider refused its registration)
-- is not paid later because the driver resumed the service before leaving. When the service
-- last became normal; NULL while it has been normal for as long as the provider spoke of it.
ALTER TABLE plate_services ADD COLUMN normal_since timestamptz;

-- Lanes cache every car park's tariff versions; a version added, changed or removed is
-- announced so that each lane drops that car park's cache at once (the fee quote reads the
-- table itself: the lane must not price by an older version than the quote shows).
CREATE FUNCTION tariffs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tariffs', COALESCE(NEW.car_park_id, OLD.car_park_id)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER tariffs_notify AFTER INSERT OR UPDATE OR DELETE ON tariffs
    FOR EACH ROW EXECUTE FUNCTION tariffs_notify();

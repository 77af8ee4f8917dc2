-- A gate's offline whitelist lets out on pay-later the cars whose plate is bound to a paying
-- account. When a binding ends (a plate unbound, an account deleted, a plate that moved to its
-- proven owner), each car park where that vehicle is parked now is announced on commit, so that
-- the lane service republishes its gates' lists at once (parking.gates.config) rather than at
-- its next round.
CREATE FUNCTION plate_bindings_whitelist_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gate_whitelists', o.car_park_id::text)
    FROM open_stays o WHERE o.plate = NEW.plate AND o.plate_color = NEW.color;
    RETURN NULL;
END $$;
CREATE TRIGGER plate_bindings_whitelist_notify AFTER UPDATE OF unbound_at ON plate_bindings
    FOR EACH ROW WHEN (OLD.unbound_at IS NULL AND NEW.unbound_at IS NOT NULL)
    EXECUTE FUNCTION plate_bindings_whitelist_notify();

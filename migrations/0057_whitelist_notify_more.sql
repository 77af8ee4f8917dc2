-- Whatever takes a parked car off its car park's offline whitelist is announced on commit, as
-- a binding's end is (0054): the pay-later agreement cancelled or its limit lowered, the account
-- blocked for arrears, the plate's service with the provider no longer normal, the vehicle
-- blacklisted by the car park's company, or a pass revoked or shortened. The lane service then
-- republishes those car parks' lists at once (parking.gates.config); before, an online gate kept
-- the car on its list up to the next round and let it out free or on pay-later if its link
-- dropped meanwhile.
-- Where a vehicle is parked, asked by every trigger below (the other indexes lead with the car
-- park: a scan of every open stay each time).
CREATE INDEX open_stays_vehicle ON open_stays (plate, plate_color);

CREATE FUNCTION whitelist_notify_vehicle(p_plate text, p_color text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gate_whitelists', o.car_park_id::text)
    FROM open_stays o WHERE o.plate = p_plate AND o.plate_color = p_color;
END $$;

-- A binding's end (0054) is announced by the same lookup.
CREATE OR REPLACE FUNCTION plate_bindings_whitelist_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM whitelist_notify_vehicle(NEW.plate, NEW.color);
    RETURN NULL;
END $$;

CREATE FUNCTION whitelist_notify_account(p_account_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM whitelist_notify_vehicle(b.plate, b.color)
    FROM plate_bindings b WHERE b.account_id = p_account_id AND b.unbound_at IS NULL;
END $$;

CREATE FUNCTION pay_later_agreements_whitelist_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM whitelist_notify_account(NEW.account_id);
    RETURN NULL;
END $$;
CREATE TRIGGER pay_later_agreements_whitelist_notify
    AFTER UPDATE OF cancelled_at, per_session_limit_fen ON pay_later_agreements
    FOR EACH ROW WHEN ((OLD.cancelled_at IS NULL AND NEW.cancelled_at IS NOT NULL)
                       OR NEW.per_session_limit_fen < OLD.per_session_limit_fen)
    EXECUTE FUNCTION pay_later_agreements_whitelist_notify();

CREATE FUNCTION accounts_whitelist_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM whitelist_notify_account(NEW.id);
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_whitelist_notify AFTER UPDATE OF blocked_for_arrears ON accounts
    FOR EACH ROW WHEN (NEW.blocked_for_arrears AND NOT OLD.blocked_for_arrears)
    EXECUTE FUNCTION accounts_whitelist_notify();

CREATE FUNCTION plate_services_whitelist_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM whitelist_notify_vehicle(NEW.plate, NEW.plate_color);
    RETURN NULL;
END $$;
-- Only a service that stops being normal: a word that it is still paused changes no list.
CREATE TRIGGER plate_services_whitelist_notify_new AFTER INSERT ON plate_services
    FOR EACH ROW WHEN (NEW.state <> 'normal')
    EXECUTE FUNCTION plate_services_whitelist_notify();
CREATE TRIGGER plate_services_whitelist_notify AFTER UPDATE OF state ON plate_services
    FOR EACH ROW WHEN (OLD.state = 'normal' AND NEW.state <> 'normal')
    EXECUTE FUNCTION plate_services_whitelist_notify();

CREATE FUNCTION plate_blacklist_whitelist_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gate_whitelists', o.car_park_id::text)
    FROM open_stays o JOIN car_parks cp ON cp.id = o.car_park_id
    WHERE o.plate = NEW.plate AND o.plate_color = NEW.color AND cp.operator_id = NEW.operator_id;
    RETURN NULL;
END $$;
CREATE TRIGGER plate_blacklist_whitelist_notify AFTER INSERT ON plate_blacklist
    FOR EACH ROW WHEN (NEW.removed_at IS NULL)
    EXECUTE FUNCTION plate_blacklist_whitelist_notify();

CREATE FUNCTION assigned_rights_whitelist_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM whitelist_notify_vehicle(rp.plate, rp.color)
    FROM assigned_right_plates rp WHERE rp.right_id = NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER assigned_rights_whitelist_notify
    AFTER UPDATE OF status, valid_until ON assigned_rights
    FOR EACH ROW WHEN ((OLD.status = 'active' AND NEW.status <> 'active')
                       OR NEW.valid_until < OLD.valid_until)
    EXECUTE FUNCTION assigned_rights_whitelist_notify();

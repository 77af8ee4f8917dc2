-- Open data (issue #22): APDS v4 places carry a version and a modification time (the
-- `modified_since` filter), and a car park can be closed (temporarily: no entries; the signs
-- and the APDS place say so). Push subscriptions (APDS webhooks and the city platform's feed)
-- and their deliveries, sent by the outbox worker.
ALTER TABLE car_parks
    ADD COLUMN version integer NOT NULL DEFAULT 1,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN closed_at timestamptz;
UPDATE car_parks SET updated_at = created_at;
CREATE INDEX car_parks_updated ON car_parks (updated_at);

-- A new version whenever something a place shows changes (not the occupancy: that is live).
CREATE FUNCTION car_parks_versioned() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.name, NEW.capacity, NEW.latitude, NEW.longitude, NEW.closed_at)
       IS DISTINCT FROM (OLD.name, OLD.capacity, OLD.latitude, OLD.longitude, OLD.closed_at) THEN
        NEW.version := OLD.version + 1;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER car_parks_versioned BEFORE UPDATE ON car_parks
    FOR EACH ROW EXECUTE FUNCTION car_parks_versioned();

-- Who is told: an APDS webhook subscription of a company (its own endpoint, topics and car
-- parks) or the company's city platform (one per company). `secret` signs every delivery
-- (HMAC-SHA256), so it is kept as it is, like the provider's key.
CREATE TABLE feed_subscriptions (
    id                   bigserial PRIMARY KEY,
    public_id            uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    operator_id          bigint NOT NULL REFERENCES operators(id),
    format               text NOT NULL CHECK (format IN ('apds', 'city')),
    endpoint             text NOT NULL,
    secret               text NOT NULL,
    topics               text[] NOT NULL
                         CHECK (topics <@ ARRAY['occupancy', 'session_started', 'session_ended']
                                AND cardinality(topics) > 0),
    -- NULL: every car park of the company, now and later.
    car_park_ids         bigint[],
    -- Failed attempts in a row; an APDS subscription is paused at
    -- PARKING_FEED_PAUSE_AFTER_FAILURES (its deliveries are skipped until it is resumed).
    consecutive_failures integer NOT NULL DEFAULT 0,
    paused_at            timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    deleted_at           timestamptz
);
CREATE INDEX feed_subscriptions_operator ON feed_subscriptions (operator_id)
    WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX feed_subscriptions_one_city ON feed_subscriptions (operator_id)
    WHERE format = 'city' AND deleted_at IS NULL;

-- One message to one subscriber; its id is the message's idempotency key (sent again after a
-- failure or a restart with the same id, never a second message for the same event).
-- Occupancy deliveries carry no value: the latest count is read when one is sent, and a car
-- park has at most one pending per subscriber (changes meanwhile are folded into it).
CREATE TABLE feed_deliveries (
    id              bigserial PRIMARY KEY,
    subscription_id bigint NOT NULL REFERENCES feed_subscriptions(id),
    topic           text NOT NULL CHECK (topic IN ('occupancy', 'session_started', 'session_ended')),
    car_park_id     bigint NOT NULL REFERENCES car_parks(id),
    session_id      bigint,
    event_at        timestamptz NOT NULL DEFAULT now(),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sent', 'skipped', 'dead')),
    sent_value      integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    CHECK ((topic = 'occupancy') = (session_id IS NULL))
);
CREATE UNIQUE INDEX feed_deliveries_one_pending_occupancy ON feed_deliveries
    (subscription_id, car_park_id) WHERE topic = 'occupancy' AND status = 'pending';
CREATE INDEX feed_deliveries_last_occupancy ON feed_deliveries
    (subscription_id, car_park_id, sent_at DESC) WHERE topic = 'occupancy' AND sent_at IS NOT NULL;
CREATE INDEX feed_deliveries_subscription ON feed_deliveries (subscription_id, id DESC);
-- Pruning reads finished deliveries by age (`parking prune`).
CREATE INDEX feed_deliveries_finished ON feed_deliveries (created_at) WHERE status <> 'pending';

-- Each outbox worker claims its own kinds (the feeds' deliveries have a worker of their own): a
-- backlog of one kind is not scanned by the other's claims.
CREATE INDEX outbox_due_kind ON outbox (kind, available_at) WHERE done_at IS NULL AND dead_at IS NULL;
ALTER TABLE outbox DROP CONSTRAINT outbox_kind_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_kind_check
    CHECK (kind IN ('charge', 'notification', 'refund', 'gate_command', 'verify_charge',
                    'parking_entry', 'feed_delivery'));

-- A stay that starts (a row becomes open) or ends (leaves open) is queued for every
-- subscriber of its car park and topic in the transaction that changed it, whichever path
-- changed it (the lane, the booth, a paid QR code, an operator): nothing is lost to a crash
-- and nothing is queued where nobody listens (one indexed lookup).
CREATE FUNCTION sessions_feed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    topic text := CASE WHEN NEW.status = 'open' THEN 'session_started' ELSE 'session_ended' END;
BEGIN
    WITH delivery AS (
        INSERT INTO feed_deliveries (subscription_id, topic, car_park_id, session_id, event_at)
        SELECT s.id, topic, NEW.car_park_id, NEW.id,
               CASE WHEN NEW.status = 'open' THEN NEW.entered_at ELSE NEW.exited_at END
        FROM feed_subscriptions s JOIN car_parks c ON c.operator_id = s.operator_id
        WHERE c.id = NEW.car_park_id AND s.deleted_at IS NULL AND s.paused_at IS NULL
          AND topic = ANY (s.topics)
          AND (s.car_park_ids IS NULL OR NEW.car_park_id = ANY (s.car_park_ids))
        RETURNING id)
    INSERT INTO outbox (kind, ref_id) SELECT 'feed_delivery', id FROM delivery;
    RETURN NULL;
END $$;
CREATE TRIGGER sessions_feed_insert AFTER INSERT ON sessions
    FOR EACH ROW WHEN (NEW.status = 'open') EXECUTE FUNCTION sessions_feed();
CREATE TRIGGER sessions_feed_update AFTER UPDATE OF status ON sessions
    FOR EACH ROW WHEN ((OLD.status = 'open') <> (NEW.status = 'open'))
    EXECUTE FUNCTION sessions_feed();

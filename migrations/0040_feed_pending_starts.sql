-- A stay's end is sent to a subscriber only after its start (parking.feeds): a delivery of an
-- end looks for its stay's start still pending for the same subscriber (a few, briefly).
CREATE INDEX feed_deliveries_pending_starts ON feed_deliveries (subscription_id, session_id)
    WHERE topic = 'session_started' AND status = 'pending';

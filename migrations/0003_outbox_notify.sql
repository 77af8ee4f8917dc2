-- Wake the outbox workers from the database itself, saving the enqueuing transaction a
-- round trip for NOTIFY. Notifications are delivered at commit, so a worker never sees a job
-- before it exists.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

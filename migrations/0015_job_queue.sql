-- The outbox as a job queue an operator can run (issue #16): a job that failed its kind's
-- number of attempts is dead (never claimed again, kept until an operator retries it), and
-- done jobs, dead letters, sent notifications and expired refresh tokens are pruned after
-- their retention (`parking prune`, and the worker hourly).
ALTER TABLE outbox
    ADD COLUMN dead_at timestamptz,
    -- The job's attempts when an operator last retried it: the attempt limit counts from
    -- here, while `attempts` keeps counting every attempt (a charge's handler asks the
    -- provider first on any attempt after the first, retried or not).
    ADD COLUMN attempts_at_retry integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT outbox_done_or_dead CHECK (done_at IS NULL OR dead_at IS NULL);

-- What the workers claim: neither done nor dead.
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox (available_at) WHERE done_at IS NULL AND dead_at IS NULL;
CREATE INDEX outbox_dead ON outbox (dead_at) WHERE dead_at IS NOT NULL;
-- Pruning reads by age; without these each hourly pass would scan the tables whole.
CREATE INDEX outbox_done ON outbox (done_at) WHERE done_at IS NOT NULL;
CREATE INDEX notifications_sent ON notifications (sent_at) WHERE status = 'sent';
CREATE INDEX dead_letters_received ON dead_letters (received_at);
CREATE INDEX refresh_tokens_expires ON refresh_tokens (expires_at);
CREATE INDEX refresh_tokens_revoked ON refresh_tokens (revoked_at) WHERE revoked_at IS NOT NULL;

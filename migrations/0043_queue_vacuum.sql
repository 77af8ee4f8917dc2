-- The outbox and the feeds' deliveries are queues: every job or delivery is inserted, then
-- updated once or twice within seconds (claimed, done; sent), each update leaving a dead row
-- version. At a city's rates (hundreds of deliveries a second) autovacuum's default trigger,
-- a fifth of the table, lets hundreds of thousands pile up between visits, and every claim and
-- look-up on these tables wades through them: measured, the lanes' p99 rose 17-29 % while 10
-- subscribers' deliveries ran, 1-6 % once the tables were vacuumed between bursts. So they are
-- vacuumed after a fixed number of dead (or inserted) rows, unthrottled: each visit is small.
DO $$
DECLARE
    queue text;
BEGIN
    FOREACH queue IN ARRAY ARRAY['outbox', 'feed_deliveries'] LOOP
        EXECUTE format(
            'ALTER TABLE %I SET (autovacuum_vacuum_scale_factor = 0,
                                 autovacuum_vacuum_threshold = 5000,
                                 autovacuum_vacuum_insert_scale_factor = 0,
                                 autovacuum_vacuum_insert_threshold = 5000,
                                 autovacuum_vacuum_cost_delay = 0,
                                 autovacuum_analyze_scale_factor = 0.02)',
            queue);
    END LOOP;
END $$;

-- Tariffs become rate tables (APDS-shaped: bands with rate lines, caps, colour discounts,
-- holidays), stored as the JSON that billing.tariff.Tariff validates. Existing hourly
-- tariffs are carried over as one all-day band charged per started hour.
ALTER TABLE tariffs ADD COLUMN rules jsonb;
UPDATE tariffs SET rules = jsonb_build_object(
    'free_minutes', free_minutes,
    'bands', jsonb_build_array(jsonb_build_object(
        'name', 'all day', 'start', '00:00', 'end', '00:00', 'max_fen', NULL,
        'lines', jsonb_build_array(jsonb_build_object(
            'from_minute', 0, 'to_minute', NULL, 'kind', 'per_increment',
            'increment_minutes', 60, 'amount_fen', hourly_fen)))),
    'daily_cap_fen', daily_cap_fen);
ALTER TABLE tariffs
    ALTER COLUMN rules SET NOT NULL,
    ADD CONSTRAINT tariffs_rules_shape CHECK (jsonb_typeof(rules) = 'object' AND rules ? 'bands'),
    DROP COLUMN free_minutes,
    DROP COLUMN hourly_fen,
    DROP COLUMN daily_cap_fen;

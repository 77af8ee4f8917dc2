-- A stay opened at the exit because there was no entry record (car park policy 'fixed_fee')
-- carries its fixed fee, so a car held at the barrier cannot come back later and be priced
-- by the tariff from the moment it was held.
ALTER TABLE sessions ADD COLUMN fixed_fee_fen bigint CHECK (fixed_fee_fen IS NULL OR fixed_fee_fen >= 0);

-- A validation costs the budget what it took off the fee when it was given; when the stay is
-- finally priced lower (a right added since, a stay ended at its earlier hold price) it takes
-- off less, and the difference goes back to the budget (merchants.spent_fen). What went back
-- so far: the validation is worth cost_fen - returned_fen from then on.
ALTER TABLE validations ADD COLUMN returned_fen bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT validations_returned_fen_check CHECK (returned_fen BETWEEN 0 AND cost_fen);

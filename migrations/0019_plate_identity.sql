-- A plate's identity is (plate colour/type, characters): 蓝 浙A12345 and 黄 浙A12345 are two
-- vehicles. One active binding per (plate, colour), not per plate. Existing rows already carry
-- their colour (NOT NULL since 0001), so only the index changes.
DROP INDEX plate_bindings_one_active;
CREATE UNIQUE INDEX plate_bindings_one_active ON plate_bindings (plate, color)
    WHERE unbound_at IS NULL;

-- Ownership disputes end: the vehicle registry (its own record proves the claimant) or an
-- operator decides. An upheld dispute moves the binding at `resolved_at`, the proof time: the
-- holder's binding ends and the claimant's begins at that very instant.
ALTER TABLE plate_disputes
    ADD COLUMN holder_binding_id    bigint REFERENCES plate_bindings(id),
    ADD COLUMN claimant_binding_id  bigint REFERENCES plate_bindings(id),
    -- Whether the claimant presented the licence that proved the holder's binding.
    ADD COLUMN same_licence_as_holder boolean,
    -- 'registry:<name>' or 'operator_user:<id>'; the operator's reason in `resolution_note`.
    ADD COLUMN resolved_by          text,
    ADD COLUMN resolution_note      text,
    ADD CONSTRAINT plate_disputes_resolved CHECK ((status = 'open') = (resolved_at IS NULL));

-- The binding each open dispute was about: the holder's active one of that plate.
UPDATE plate_disputes d SET holder_binding_id = b.id
FROM plate_bindings b
WHERE b.plate = d.plate AND b.color = d.color AND b.account_id = d.holder_account_id
  AND b.unbound_at IS NULL AND d.holder_binding_id IS NULL;

-- One open dispute per claimant and vehicle (plate, colour).
DROP INDEX plate_disputes_one_open;
CREATE UNIQUE INDEX plate_disputes_one_open ON plate_disputes (plate, color, claimant_account_id)
    WHERE status = 'open';
-- The operators' queue of open ownership claims, oldest first.
CREATE INDEX plate_disputes_open ON plate_disputes (created_at, id) WHERE status = 'open';

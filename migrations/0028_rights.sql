-- Rights (issue #20), shaped on APDS's right specification and assigned right.
--
-- A right specification says what (free passage, free minutes, a discount, a flat fee), where
-- (a set of the company's car parks, or all of them) and when (ISO weekdays and an hours window
-- in the car park's time zone; a window whose start is after its end crosses midnight and
-- belongs to the weekday it starts on). An assigned right gives a specification to vehicles
-- (plate, colour) for a validity period, with how many of them may be inside at once.
CREATE TABLE right_specs (
    id                  bigserial PRIMARY KEY,
    operator_id         bigint NOT NULL REFERENCES operators(id),
    name                text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    kind                text NOT NULL
                        CHECK (kind IN ('free_passage', 'free_minutes', 'discount', 'flat_fee')),
    free_minutes        integer CHECK (free_minutes BETWEEN 1 AND 525600),
    discount_percent    integer CHECK (discount_percent BETWEEN 1 AND 100),
    flat_fee_fen        bigint CHECK (flat_fee_fen BETWEEN 0 AND 100000000),
    -- NULL: every car park of the company (now and later).
    car_park_ids        bigint[],
    weekdays            smallint[] NOT NULL DEFAULT '{1,2,3,4,5,6,7}'
                        CHECK (weekdays <@ '{1,2,3,4,5,6,7}'::smallint[]
                               AND cardinality(weekdays) >= 1),
    -- Both NULL: all day. Equal start and end is refused (say all day with NULLs).
    window_start        time,
    window_end          time,
    time_zone           text NOT NULL DEFAULT 'Asia/Shanghai',
    created_by          text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (operator_id, name),
    CHECK ((kind = 'free_minutes') = (free_minutes IS NOT NULL)),
    CHECK ((kind = 'discount') = (discount_percent IS NOT NULL)),
    CHECK ((kind = 'flat_fee') = (flat_fee_fen IS NOT NULL)),
    CHECK ((window_start IS NULL) = (window_end IS NULL)),
    CHECK (window_start IS NULL OR window_start <> window_end)
);

CREATE TABLE assigned_rights (
    id              bigserial PRIMARY KEY,
    spec_id         bigint NOT NULL REFERENCES right_specs(id),
    operator_id     bigint NOT NULL REFERENCES operators(id),
    -- Who it was given to, as the operator knows them (a resident's flat, a shop): free text.
    label           text CHECK (length(label) <= 64),
    valid_from      timestamptz NOT NULL,
    valid_until     timestamptz NOT NULL,
    -- How many of its vehicles may be inside one of its car parks at once under it (NULL: all).
    max_inside      integer CHECK (max_inside >= 1),
    status          text NOT NULL DEFAULT 'active'
                    CHECK (status IN ('active', 'suspended', 'cancelled')),
    source          text NOT NULL DEFAULT 'operator'
                    CHECK (source IN ('operator', 'import', 'purchase')),
    created_by      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (valid_until > valid_from)
);
CREATE INDEX assigned_rights_operator ON assigned_rights (operator_id, id);

CREATE TABLE assigned_right_plates (
    right_id    bigint NOT NULL REFERENCES assigned_rights(id),
    plate       text NOT NULL,
    color       text NOT NULL CHECK (color IN ('blue', 'green', 'yellow', 'white', 'black')),
    PRIMARY KEY (right_id, plate, color)
);
-- The lane's one lookup: a vehicle's rights.
CREATE INDEX assigned_right_plates_vehicle ON assigned_right_plates (plate, color);

-- A blacklisted vehicle is held at the company's gates with the reason, for a person.
CREATE TABLE plate_blacklist (
    id          bigserial PRIMARY KEY,
    operator_id bigint NOT NULL REFERENCES operators(id),
    plate       text NOT NULL,
    color       text NOT NULL CHECK (color IN ('blue', 'green', 'yellow', 'white', 'black')),
    reason      text NOT NULL CHECK (length(reason) BETWEEN 1 AND 200),
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    removed_at  timestamptz,
    removed_by  text
);
CREATE UNIQUE INDEX plate_blacklist_one_active ON plate_blacklist (plate, color, operator_id)
    WHERE removed_at IS NULL;

-- The assigned right whose place a stay holds (set at entry; NULL: a visitor), and the right
-- its fee was reduced by (set at exit).
ALTER TABLE sessions ADD COLUMN assigned_right_id bigint;
ALTER TABLE sessions ADD COLUMN applied_right_id bigint;
CREATE INDEX sessions_open_by_right ON sessions (assigned_right_id)
    WHERE status = 'open' AND assigned_right_id IS NOT NULL;

ALTER TABLE lane_exceptions DROP CONSTRAINT lane_exceptions_reason_check;
ALTER TABLE lane_exceptions ADD CONSTRAINT lane_exceptions_reason_check
    CHECK (reason IN ('unreadable', 'ambiguous', 'no_entry', 'offline_exit', 'uncertain',
                      'rejected', 'unpaid_exit', 'offline_booth', 'ghost_stay', 'blacklisted'));

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from billing.rights import RightTerms
from gate_controller.protocol import GateAddress, PlateColor
from parking.lanes.repository import RIGHT_JSON, STAY_PAY_LATER_JOINS, STAY_SERVICE_STATE


async def gate_addresses(
    conn: asyncpg.Connection, car_park_ids: list[int] | None = None
) -> list[GateAddress]:
    """Every gate of the car parks `car_park_ids` (all when None), as its protocol address (car
    park code, gate code)."""
    rows = await conn.fetch(
        """SELECT cp.code AS lot, g.code AS gate
           FROM gates g JOIN car_parks cp ON cp.id = g.car_park_id
           WHERE $1::bigint[] IS NULL OR cp.id = ANY ($1::bigint[])
           ORDER BY cp.code, g.code""",
        car_park_ids,
    )
    return [GateAddress(row["lot"], row["gate"]) for row in rows]


@dataclass(frozen=True, slots=True)
class WhitelistedCar:
    plate: str
    color: PlateColor  # the table's CHECK allows no other
    # The lane would let it out on pay-later, charged up to this; None: it would not.
    per_session_limit_fen: int | None
    # Its stay's entry and its free-passage rights here (passes, whitelists): it leaves free
    # while one of them has been in force since the entry (parking.gates.config).
    entered_at: datetime | None = None
    passes: tuple[RightTerms, ...] = ()


async def offline_whitelists(
    conn: asyncpg.Connection, car_park_ids: list[int] | None = None
) -> dict[str, list[WhitelistedCar]]:
    """By car park code (of `car_park_ids`, or all), the cars parked there now that may leave a
    gate that cannot reach the server, each with what the gate needs to decide as the lane
    would: whether the lane would let it out on pay-later (a binding, an agreement and the
    plate's service with the provider that covered the stay's entry and are active now, no
    block for arrears: `STAY_PAY_LATER_JOINS`, `STAY_SERVICE_STATE`), with its limit; and its
    free-passage rights of that car park that are active and not over (for a pass of "at most N
    inside", only when the stay holds its place), with the stay's entry, for their hours. A
    vehicle on the company's blacklist is on no list. A plate's identity is (plate, colour): a
    stay is matched with the binding of its own colour (a yellow 浙A12345 is not the bound blue
    one), every entry carrying the colour for the gate to check."""
    rows = await conn.fetch(
        f"""WITH stays AS (
               SELECT s.id, cp.code AS lot, s.plate, s.plate_color, s.entered_at,
                      s.car_park_id, s.assigned_right_id, cp.operator_id
               FROM sessions s
               JOIN car_parks cp ON cp.id = s.car_park_id
               WHERE s.status = 'open'
                 AND ($1::bigint[] IS NULL OR s.car_park_id = ANY ($1::bigint[]))
                 AND NOT EXISTS (
                     SELECT 1 FROM plate_blacklist bl
                     WHERE bl.plate = s.plate AND bl.color = s.plate_color
                       AND bl.operator_id = cp.operator_id AND bl.removed_at IS NULL)
           ), pay_later AS (
               SELECT s.id, min(pa.per_session_limit_fen) AS per_session_limit_fen
               FROM stays s
               {STAY_PAY_LATER_JOINS}
               WHERE pa.id IS NOT NULL AND NOT a.blocked_for_arrears
                 AND COALESCE({STAY_SERVICE_STATE}, 'normal') = 'normal'
               GROUP BY s.id
           ), passes AS (
               SELECT s.id, json_agg({RIGHT_JSON}) AS passes
               FROM stays s
               JOIN assigned_right_plates rp ON rp.plate = s.plate AND rp.color = s.plate_color
               JOIN assigned_rights ar ON ar.id = rp.right_id AND ar.status = 'active'
                    AND ar.valid_until > now()
                    AND (ar.max_inside IS NULL OR ar.id = s.assigned_right_id)
               JOIN right_specs sp ON sp.id = ar.spec_id AND sp.kind = 'free_passage'
                    AND (s.car_park_id = ANY (sp.car_park_ids)
                         OR (sp.car_park_ids IS NULL AND sp.operator_id = s.operator_id))
               GROUP BY s.id
           )
           SELECT s.lot, s.plate, s.plate_color AS color, s.entered_at,
                  pl.per_session_limit_fen, p.passes
           FROM stays s
           LEFT JOIN pay_later pl ON pl.id = s.id
           LEFT JOIN passes p ON p.id = s.id
           WHERE pl.id IS NOT NULL OR p.id IS NOT NULL
           ORDER BY s.lot, s.plate, s.plate_color""",
        car_park_ids,
    )
    whitelists: dict[str, list[WhitelistedCar]] = {}
    for row in rows:
        whitelists.setdefault(row["lot"], []).append(
            WhitelistedCar(
                row["plate"],
                row["color"],
                row["per_session_limit_fen"],
                row["entered_at"],
                tuple(RightTerms.from_json(r) for r in row["passes"] or ()),
            )
        )
    return whitelists


async def insert_gate_event(
    conn: asyncpg.Connection,
    *,
    lot: str,
    gate: str,
    event_id: UUID,
    type: str,
    reason: str | None,
    at: datetime,
) -> bool | None:
    """Keeps a gate's event once: True when stored, False when it was already, None when the
    gate is unknown."""
    row = await conn.fetchrow(
        """WITH g AS (
               SELECT g.id, g.car_park_id FROM gates g JOIN car_parks cp ON cp.id = g.car_park_id
               WHERE cp.code = $1 AND g.code = $2
           ), ins AS (
               INSERT INTO gate_events (event_id, car_park_id, gate_id, type, reason, at)
               SELECT $3, g.car_park_id, g.id, $4, $5, $6 FROM g
               ON CONFLICT (event_id) DO NOTHING
               RETURNING id
           )
           SELECT EXISTS (SELECT 1 FROM g) AS known, EXISTS (SELECT 1 FROM ins) AS stored""",
        lot,
        gate,
        event_id,
        type,
        reason,
        at,
    )
    assert row is not None
    return bool(row["stored"]) if row["known"] else None


async def gate_events(
    conn: asyncpg.Connection, operator_id: int, *, car_park_id: int | None, limit: int
) -> list[asyncpg.Record]:
    """The operator's gates' reported openings, newest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT e.id, e.event_id, cp.code AS car_park, g.code AS gate, e.type, e.reason,
                  e.at, e.received_at
           FROM gate_events e JOIN car_parks cp ON cp.id = e.car_park_id
           JOIN gates g ON g.id = e.gate_id
           WHERE cp.operator_id = $1 AND ($2::bigint IS NULL OR e.car_park_id = $2)
           ORDER BY e.received_at DESC, e.id DESC LIMIT $3""",
        operator_id,
        car_park_id,
        limit,
    )
    return rows

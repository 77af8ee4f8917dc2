"""SQL of charge confirmations. Every query is scoped to the caller's operator company."""

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from parking.occupancy.repository import takes_a_place

_CAPTURE = """LEFT JOIN capture_keys {k} ON {k}.capture_id = {id}
    LEFT JOIN captures {c} ON {c}.capture_id = {k}.capture_id AND {c}.captured_at = {k}.captured_at
    LEFT JOIN capture_frames {f} ON {f}.capture_id = {id}"""


async def awaiting(
    conn: asyncpg.Connection, operator_id: int, *, car_park_id: int | None, limit: int
) -> list[asyncpg.Record]:
    """Charges awaiting confirmation, oldest first, with both reads, whether their frames are
    kept, and when the vehicle left again later with no entry record (a fixed fee at the gate:
    `left_again_at`)."""
    entry = _CAPTURE.format(k="ek", c="ec", f="ef", id="s.entry_capture_id")
    exit_ = _CAPTURE.format(k="xk", c="xc", f="xf", id="s.exit_capture_id")
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT c.id, cp.code AS car_park, s.plate, s.plate_color, s.entered_at, s.exited_at,
                  c.amount_fen, c.created_at, xc.match_status, c.verification,
                  ec.plate_source AS entry_source, ec.read_confidence AS entry_confidence,
                  s.entry_certain, ef.capture_id IS NOT NULL AS entry_image,
                  xc.plate_source AS exit_source, xc.read_confidence AS exit_confidence,
                  xc.read_certain AS exit_certain, xf.capture_id IS NOT NULL AS exit_image,
                  ec.camera_plate AS entry_camera_plate, ec.camera_color AS entry_camera_color,
                  ec.camera_confidence AS entry_camera_confidence,
                  xc.camera_plate AS exit_camera_plate, xc.camera_color AS exit_camera_color,
                  xc.camera_confidence AS exit_camera_confidence,
                  (SELECT min(later.entered_at) FROM sessions later
                   WHERE later.car_park_id = s.car_park_id AND later.plate = s.plate
                     AND later.plate_color = s.plate_color AND later.entered_at > s.entered_at
                     AND later.entry_capture_id IS NULL AND later.fixed_fee_fen IS NOT NULL)
                      AS left_again_at
           FROM charges c
           JOIN sessions s ON s.id = c.session_id
           JOIN car_parks cp ON cp.id = s.car_park_id
           {entry}
           {exit_}
           WHERE c.status = 'awaiting_confirmation' AND cp.operator_id = $1
             AND ($2::bigint IS NULL OR cp.id = $2)
             -- A charge the driver disputes is decided in the disputes queue.
             AND NOT EXISTS (SELECT 1 FROM charge_disputes d
                             WHERE d.charge_id = c.id AND d.status = 'open')
           ORDER BY c.created_at, c.id
           LIMIT $3""",
        operator_id,
        car_park_id,
        limit,
    )
    return rows


async def frame(
    conn: asyncpg.Connection, operator_id: int, charge_id: int, *, entry: bool
) -> asyncpg.Record | None:
    """The charge's stay's entry (or exit) frame; `image` NULL when none was kept."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT f.image FROM charges c
           JOIN sessions s ON s.id = c.session_id
           JOIN car_parks cp ON cp.id = s.car_park_id
           LEFT JOIN capture_frames f
               ON f.capture_id = CASE WHEN $3 THEN s.entry_capture_id ELSE s.exit_capture_id END
           WHERE c.id = $1 AND cp.operator_id = $2""",
        charge_id,
        operator_id,
        entry,
    )
    return row


@dataclass(frozen=True, slots=True)
class AwaitingCharge:
    charge_id: int
    status: str
    session_id: int
    car_park_id: int
    account_id: int
    amount_fen: int
    plate: str
    plate_color: str
    exit_capture_id: UUID | None


async def charge_for_update(
    conn: asyncpg.Connection, operator_id: int, charge_id: int
) -> AwaitingCharge | None:
    row = await conn.fetchrow(
        """SELECT c.id AS charge_id, c.status, s.id AS session_id, s.car_park_id, c.account_id,
                  c.amount_fen, s.plate, s.plate_color, s.exit_capture_id
           FROM charges c
           JOIN sessions s ON s.id = c.session_id
           JOIN car_parks cp ON cp.id = s.car_park_id
           WHERE c.id = $1 AND cp.operator_id = $2
           FOR UPDATE OF c""",
        charge_id,
        operator_id,
    )
    return AwaitingCharge(**dict(row)) if row else None


async def refuted_exit_of_vehicle(
    conn: asyncpg.Connection, car_park_id: int, plate: str, color: str
) -> AwaitingCharge | None:
    """The charge of the vehicle's last stay here (none of its entered since) if the exit that
    closed it showed another vehicle: its charge awaits an operator because the server's
    reader refuted that exit's read with its frames. Locked; whether a "not my car" is open
    on it is the caller's question after the lock (`disputed`)."""
    row = await conn.fetchrow(
        """SELECT c.id AS charge_id, c.status, s.id AS session_id, s.car_park_id, c.account_id,
                  c.amount_fen, s.plate, s.plate_color, s.exit_capture_id
           FROM sessions s JOIN charges c ON c.session_id = s.id
           WHERE s.car_park_id = $1 AND s.plate = $2 AND s.plate_color = $3
             AND s.status = 'closed' AND c.status = 'awaiting_confirmation'
             AND c.verification->>'verdict' = 'refuted' AND c.verification->>'end' = 'exit'
             AND NOT EXISTS (SELECT 1 FROM sessions later
                             WHERE later.car_park_id = s.car_park_id AND later.plate = s.plate
                               AND later.plate_color = s.plate_color
                               AND later.entered_at > s.entered_at)
           ORDER BY s.exited_at DESC LIMIT 1
           FOR UPDATE OF c""",
        car_park_id,
        plate,
        color,
    )
    return AwaitingCharge(**dict(row)) if row else None


async def disputed(conn: asyncpg.Connection, charge_id: int) -> bool:
    """Whether the driver's "not my car" on the charge is open (parking/disputes/)."""
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM charge_disputes WHERE charge_id = $1 AND status = 'open'", charge_id
        )
    )


async def reopen_stay(conn: asyncpg.Connection, session_id: int) -> bool | None:
    """Opens the stay again, its entry no longer taken as certain nor proven (an operator
    disowned the charge: the next exit's charge waits for the frames or a person), unless its
    vehicle has another open stay here, or entered here again since (it had left, whichever exit
    it took). Returns whether it was counted in the occupancy at its entry, or None when it was
    not reopened."""
    counted_in: bool | None = await conn.fetchval(
        f"""UPDATE sessions s SET status = 'open', exited_at = NULL, exit_capture_id = NULL,
                  fee_fen = NULL, account_id = NULL, settlement = NULL, entry_certain = false,
                  entry_proven = false
           WHERE s.id = $1 AND s.status = 'closed'
             AND NOT EXISTS (SELECT 1 FROM open_stays o
                             WHERE o.car_park_id = s.car_park_id AND o.plate = s.plate
                               AND o.plate_color = s.plate_color)
             AND NOT EXISTS (SELECT 1 FROM sessions l
                             WHERE l.car_park_id = s.car_park_id AND l.plate = s.plate
                               AND l.plate_color = s.plate_color
                               AND l.entered_at > s.entered_at)
           RETURNING {takes_a_place("s")}""",
        session_id,
    )
    return counted_in


async def unattribute_stay(conn: asyncpg.Connection, session_id: int) -> None:
    """The stay stays closed but is nobody's: its fee was never charged. Nor is the exit its
    any more: the capture waits for the right plate, and may be another stay's exit (its
    vehicle's later stay, when only the gate's clock put it in this one)."""
    await conn.execute(
        """UPDATE sessions SET account_id = NULL, settlement = 'operator', exit_capture_id = NULL
           WHERE id = $1""",
        session_id,
    )


async def open_rejection_exception(
    conn: asyncpg.Connection, capture_id: UUID, candidates: list[dict[str, Any]]
) -> int | None:
    """The exit capture goes (back) to the exception queue as 'rejected', with its frame; the
    capture row records the outcome. None when the capture is unknown."""
    exception_id: int | None = await conn.fetchval(
        """WITH c AS (
               UPDATE captures SET outcome = 'charge_rejected'
               WHERE capture_id = $1
               RETURNING capture_id, captured_at, car_park_id, gate_id)
           INSERT INTO lane_exceptions
               (capture_id, capture_captured_at, car_park_id, gate_id, reason, candidates, image)
           SELECT c.capture_id, c.captured_at, c.car_park_id, c.gate_id, 'rejected', $2, f.image
           FROM c LEFT JOIN capture_frames f ON f.capture_id = c.capture_id
           ON CONFLICT (capture_id) DO UPDATE
           SET reason = 'rejected', status = 'open', candidates = EXCLUDED.candidates,
               resolved_plate = NULL, resolved_by = NULL, resolved_at = NULL,
               image = COALESCE(lane_exceptions.image, EXCLUDED.image)
           RETURNING id""",
        capture_id,
        candidates,
    )
    return exception_id

"""All SQL of the lane service. Every function runs on the caller's connection/transaction."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import asyncpg

from billing import debts, fees
from billing.rights import RightTerms, Validation
from billing.tariff import Tariff
from parking.rights import repository as rights_repo


@dataclass(frozen=True, slots=True)
class GateInfo:
    gate_id: int
    car_park_id: int
    car_park_name: str
    direction: str
    no_entry_policy: str
    no_entry_fee_fen: int
    # 'open_confirm' or 'hold': an exit whose charge cannot rest on two certain reads.
    uncertain_exit_policy: str = "open_confirm"
    operator_id: int = 0


@dataclass(frozen=True, slots=True)
class PayLater:
    account_id: int
    agreement_id: int | None
    per_session_limit_fen: int | None
    blocked_for_arrears: bool
    # Open debts, collected with the stay's fee at the gate.
    debt_fen: int = 0
    # The plate's service state with the agreement's provider (plate_services), None when the
    # provider never spoke of it: only "normal" (or None) may leave on pay-later, and
    # "not_at_entry" is a service resumed since the stay began.
    service_state: str | None = None


@dataclass(frozen=True, slots=True)
class OpenSession:
    id: int
    entered_at: datetime
    # Read with the stay, so an exit needs no second query for the driver's agreement.
    pay_later: PayLater | None = None
    # Set on stays opened at the exit under the car park's no-entry fixed-fee policy.
    fixed_fee_fen: int | None = None
    plate_color: str | None = None
    # Whether the stay's entry read was certain (rules.is_certain), and proven (certain by a
    # calibrated score: rules.is_proven).
    entry_certain: bool = False
    # The vehicle's rights here (a pass of "at most N inside" only when this stay holds one of
    # its places) and its blacklisting reason in this company, read with the stay
    # (`_RIGHTS_COLUMNS`); empty and None where the query does not read them.
    rights: tuple[RightTerms, ...] = ()
    blacklisted: str | None = None
    # A merchant's validation of the stay (parking/merchants/).
    validation: Validation | None = None
    entry_proven: bool = False
    # "superseded": ended at its vehicle's next entry, its exit missed; an offline exit from
    # before that entry, uploaded since, still ends it (`stay_missed_at_for_update`).
    status: Literal["open", "superseded"] = "open"


# The binding, account and active agreement of the vehicle (`{plate}`, `{color}`) that covered
# a stay beginning at `{entered_at}`: a plate's owner is never charged for another colour's
# vehicle, and a binding or agreement made after the car came in does not pay for its stay
# (it pays at the gate). So too the plate's service with the provider: one resumed since the
# entry did not cover it ('not_at_entry').
_PAY_LATER_JOINS = """
    LEFT JOIN plate_bindings b ON b.plate = {plate} AND b.color = {color}
        AND b.unbound_at IS NULL AND b.bound_at <= {entered_at}
    LEFT JOIN accounts a ON a.id = b.account_id AND a.deleted_at IS NULL
    LEFT JOIN pay_later_agreements pa ON pa.account_id = a.id AND pa.cancelled_at IS NULL
        AND pa.signed_at <= {entered_at}
    LEFT JOIN plate_services ps ON ps.provider = pa.provider AND ps.plate = {plate}
        AND ps.plate_color = {color}"""
# A stay `s`'s: the lane's, and the offline whitelist's (a gate that cannot reach us lets out
# on pay-later only what the lane would).
STAY_PAY_LATER_JOINS = _PAY_LATER_JOINS.format(
    plate="s.plate", color="s.plate_color", entered_at="s.entered_at"
)
STAY_SERVICE_STATE = """CASE WHEN ps.state = 'normal' AND ps.normal_since > s.entered_at
    THEN 'not_at_entry' ELSE ps.state END"""
_PAY_LATER_COLUMNS = f"""a.id AS account_id, pa.id AS agreement_id, pa.per_session_limit_fen,
    a.blocked_for_arrears,
    CASE WHEN a.blocked_for_arrears THEN
        (SELECT COALESCE(sum(d.amount_fen), 0)::bigint FROM debts d
         WHERE d.account_id = a.id AND d.settled_at IS NULL AND {debts.UNDISPUTED.format(d="d")})
        ELSE 0 END AS debt_fen,
    {STAY_SERVICE_STATE} AS service_state"""


def _pay_later(row: asyncpg.Record) -> PayLater | None:
    if row["account_id"] is None:
        return None
    return PayLater(
        row["account_id"],
        row["agreement_id"],
        row["per_session_limit_fen"],
        row["blocked_for_arrears"],
        row["debt_fen"],
        row["service_state"],
    )


_GATE_INFO = """g.id AS gate_id, cp.id AS car_park_id, cp.name AS car_park_name, g.direction,
    cp.no_entry_policy, cp.no_entry_fee_fen, cp.uncertain_exit_policy, cp.operator_id
    FROM gates g JOIN car_parks cp ON cp.id = g.car_park_id"""


async def load_gate(conn: asyncpg.Connection, lot: str, gate: str) -> GateInfo | None:
    row = await conn.fetchrow(
        f"SELECT {_GATE_INFO} WHERE cp.code = $1 AND g.code = $2",
        lot,
        gate,
    )
    return GateInfo(**dict(row)) if row else None


async def all_gates(conn: asyncpg.Connection) -> dict[tuple[str, str], GateInfo]:
    """Every gate by (car park code, gate code): a lane's cache filled in one query."""
    rows = await conn.fetch(f"SELECT cp.code AS lot, g.code AS gate, {_GATE_INFO}")
    return {
        (r["lot"], r["gate"]): GateInfo(**{k: v for k, v in r.items() if k not in ("lot", "gate")})
        for r in rows
    }


async def all_tariff_versions(conn: asyncpg.Connection) -> dict[int, fees.TariffVersions]:
    """Every car park's tariffs by effective date, newest first (fees.tariff_versions for all)."""
    rows = await conn.fetch(
        "SELECT car_park_id, effective_from, rules FROM tariffs"
        " ORDER BY car_park_id, effective_from DESC"
    )
    versions: dict[int, fees.TariffVersions] = {}
    for r in rows:
        versions.setdefault(r["car_park_id"], []).append(
            (r["effective_from"], Tariff.from_json(r["rules"]))
        )
    return versions


@dataclass(frozen=True, slots=True)
class StoredCapture:
    command: dict[str, Any]
    # None for captures stored before their content was fingerprinted.
    content_sha256: bytes | None


async def stored_capture(conn: asyncpg.Connection, capture_id: UUID) -> StoredCapture | None:
    """The capture with this id, whatever time a resend of it carries."""
    row = await conn.fetchrow(
        """SELECT c.command, k.content_sha256 FROM capture_keys k
           JOIN captures c ON c.capture_id = k.capture_id AND c.captured_at = k.captured_at
           WHERE k.capture_id = $1""",
        capture_id,
    )
    return StoredCapture(row["command"], row["content_sha256"]) if row else None


async def insert_capture(
    conn: asyncpg.Connection,
    content_sha256: bytes,
    frame: bytes | None,
    more_frames: list[bytes] | None = None,
    **values: Any,
) -> None:
    """The capture's row, its key and its frames (the first is the stay's evidence: an operator
    confirming a charge, the driver's receipt, a dispute; all are what a charge's verification
    reads), in one statement: a second capture with the same id (at any captured_at) is a
    unique violation of capture_keys."""
    columns = ", ".join(values)
    placeholders = ", ".join(f"${i}" for i in range(3, len(values) + 3))
    car_park = 3 + list(values).index("car_park_id")
    await conn.execute(
        f"""WITH key AS (
                INSERT INTO capture_keys (capture_id, captured_at, content_sha256)
                VALUES ($1, $2, ${len(values) + 3})
            ), frame AS (
                INSERT INTO capture_frames
                    (capture_id, captured_at, car_park_id, image, more_images)
                SELECT $1, $2, ${car_park}::bigint, ${len(values) + 4}::bytea,
                       ${len(values) + 5}::bytea[]
                WHERE ${len(values) + 4}::bytea IS NOT NULL
            )
            INSERT INTO captures ({columns}) VALUES ({placeholders})""",
        values["capture_id"],
        values["captured_at"],
        *values.values(),
        content_sha256,
        frame,
        more_frames or None,
    )


async def insert_capture_conflict(
    conn: asyncpg.Connection,
    *,
    capture_id: UUID,
    car_park_id: int,
    gate_id: int,
    resent: dict[str, Any],
) -> None:
    # Once per content: the gate keeps resending a capture whose resend conflicts (its ack
    # names nothing it holds), and each resend says the same.
    await conn.execute(
        """INSERT INTO capture_conflicts (capture_id, car_park_id, gate_id, resent)
           SELECT $1, $2, $3, $4
           WHERE NOT EXISTS (SELECT 1 FROM capture_conflicts
                             WHERE capture_id = $1 AND resent = $4::jsonb)""",
        capture_id,
        car_park_id,
        gate_id,
        resent,
    )


async def update_capture_decision(
    conn: asyncpg.Connection,
    capture_id: UUID,
    *,
    plate: str | None,
    plate_color: str,
    plate_source: str,
    match_status: str | None,
    outcome: str,
    session_id: int | None,
    command: dict[str, Any] | None,
) -> None:
    """A held capture decided again (an operator named its vehicle, plate and colour): its row
    records the new decision, and a redelivery of the capture gets the new command (the one
    stored before when `command` is None: no gate was commanded). An operator's plate is a
    certain read."""
    await conn.execute(
        """UPDATE captures SET plate = $2, plate_color = $3, plate_source = $4,
                  match_status = $5, outcome = $6, session_id = $7,
                  command = COALESCE($8, command),
                  read_certain = true
           WHERE capture_id = $1""",
        capture_id,
        plate,
        plate_color,
        plate_source,
        match_status,
        outcome,
        session_id,
        command,
    )


_STAY_COLUMNS = (
    "s.id, s.entered_at, s.fixed_fee_fen, s.plate_color, s.entry_certain, s.entry_proven, s.status"
)
# A stay's vehicle's blacklisting and rights in its car park: indexed lookups by (plate, colour)
# joined into the exit's one query (no extra round trip). A right capped at N inside counts only
# for the stay that took one of its places at entry (`sessions.assigned_right_id`). A right
# as `RightTerms.from_json` reads it (here and in the gates' offline whitelists).
RIGHT_JSON = """json_build_object(
    'id', ar.id, 'kind', sp.kind, 'name', sp.name, 'valid_from', ar.valid_from,
    'valid_until', ar.valid_until, 'free_minutes', sp.free_minutes,
    'discount_percent', sp.discount_percent, 'flat_fee_fen', sp.flat_fee_fen,
    'weekdays', sp.weekdays, 'window_start', sp.window_start, 'window_end', sp.window_end,
    'time_zone', sp.time_zone)"""
_ACTIVE_RIGHTS = f"""(SELECT json_agg({RIGHT_JSON})
     FROM assigned_right_plates rp
     JOIN assigned_rights ar ON ar.id = rp.right_id AND ar.status = 'active'
     JOIN right_specs sp ON sp.id = ar.spec_id
     WHERE rp.plate = s.plate AND rp.color = s.plate_color
       AND (ar.max_inside IS NULL OR ar.id = s.assigned_right_id)
       AND (s.car_park_id = ANY (sp.car_park_ids)
            OR (sp.car_park_ids IS NULL AND sp.operator_id
                = (SELECT operator_id FROM car_parks WHERE id = s.car_park_id))))"""
# What it cost: less what went back to the budget when the stay was priced lower (a stay
# reopened since takes off no more than the budget paid for: parking.merchants.service.settle).
_VALIDATION = """(SELECT json_build_object(
        'id', v.id, 'free_minutes', v.free_minutes, 'amount_fen', v.amount_fen,
        'cost_fen', v.cost_fen - v.returned_fen)
     FROM validations v WHERE v.session_id = s.id)"""
_RIGHTS_COLUMNS = f"""
    (SELECT bl.reason FROM plate_blacklist bl
     WHERE bl.plate = s.plate AND bl.color = s.plate_color AND bl.removed_at IS NULL
       AND bl.operator_id = (SELECT operator_id FROM car_parks WHERE id = s.car_park_id)
    ) AS blacklisted,
    {_ACTIVE_RIGHTS} AS rights,
    {_VALIDATION} AS validation"""
_STAY_READ = f"""{_STAY_COLUMNS}, {_PAY_LATER_COLUMNS}, {_RIGHTS_COLUMNS}
    FROM sessions s {STAY_PAY_LATER_JOINS}"""


async def open_session_for_update(
    conn: asyncpg.Connection, car_park_id: int, plate: str, color: str
) -> OpenSession | None:
    """The open stay of the vehicle (plate, colour) here, locked, with its driver's pay-later
    state, its rights here and whether it is blacklisted."""
    row = await conn.fetchrow(
        f"""SELECT {_STAY_READ}
            WHERE s.car_park_id = $1 AND s.plate = $2 AND s.plate_color = $3
              AND s.status = 'open'
            FOR UPDATE OF s""",
        car_park_id,
        plate,
        color,
    )
    return _open_session(row) if row else None


@dataclass(frozen=True, slots=True)
class MissedStay:
    """A stay whose exit was missed, ended when its vehicle entered here again
    (`reentered_at`). `owed`: it had been held with a fee, and that fee was made owed then (a
    debt, or an unpaid exit for an operator); otherwise it was left unpriced."""

    stay: OpenSession
    reentered_at: datetime
    owed: bool


async def stay_missed_at_for_update(
    conn: asyncpg.Connection, car_park_id: int, plate: str, color: str, at: datetime
) -> MissedStay | None:
    """The vehicle's stay here that was open at `at` and whose exit was missed (superseded at a
    re-entry after `at`), locked, read as an open stay is."""
    row = await conn.fetchrow(
        f"""SELECT s.settlement IS NOT NULL AS owed,
                   (SELECT n.entered_at FROM sessions n
                    WHERE n.car_park_id = s.car_park_id AND n.plate = s.plate
                      AND n.plate_color = s.plate_color AND n.entered_at > s.entered_at
                    ORDER BY n.entered_at LIMIT 1) AS reentered_at,
                   {_STAY_READ}
            WHERE s.car_park_id = $1 AND s.plate = $2 AND s.plate_color = $3
              AND s.status = 'superseded' AND s.entered_at <= $4
            ORDER BY s.entered_at DESC LIMIT 1
            FOR UPDATE OF s""",
        car_park_id,
        plate,
        color,
        at,
    )
    if row is None or row["reentered_at"] is None or row["reentered_at"] <= at:
        return None
    return MissedStay(_open_session(row), row["reentered_at"], row["owed"])


async def offline_crossing_near(
    conn: asyncpg.Connection,
    car_park_id: int,
    plate: str,
    color: str,
    gate_id: int,
    at: datetime,
    window: timedelta,
) -> int | None:
    """The vehicle's stay here that an offline capture of this gate, taken within `window` of
    `at` by the gate's own clock, ended: the same crossing read again, compared clock to clock
    (the stay's `exited_at` may have been bounded away from that clock's time)."""
    stay_id: int | None = await conn.fetchval(
        """SELECT s.id FROM sessions s
           JOIN captures c ON c.capture_id = s.exit_capture_id
           WHERE s.car_park_id = $1 AND s.plate = $2 AND s.plate_color = $3
             AND s.status <> 'open' AND c.gate_id = $4 AND c.offline
             AND c.captured_at BETWEEN $5::timestamptz - $6::interval
                                   AND $5::timestamptz + $6::interval
           ORDER BY c.captured_at DESC LIMIT 1""",
        car_park_id,
        plate,
        color,
        gate_id,
        at,
        window,
    )
    return stay_id


async def stay_entered_since(
    conn: asyncpg.Connection,
    car_park_id: int,
    plate: str,
    color: str | None,
    since: datetime,
    *,
    open_only: bool = False,
) -> int | None:
    """The latest stay here that began at `since` or later: of the vehicle (`plate`, `color`),
    or of the plate's characters in any colour (`color` None); whatever its status unless
    `open_only`."""
    stay_id: int | None = await conn.fetchval(
        """SELECT id FROM sessions
           WHERE car_park_id = $1 AND plate = $2 AND ($3::text IS NULL OR plate_color = $3)
             AND entered_at >= $4 AND (NOT $5 OR status = 'open')
           ORDER BY entered_at DESC LIMIT 1""",
        car_park_id,
        plate,
        color,
        since,
        open_only,
    )
    return stay_id


async def stay_ended_since(
    conn: asyncpg.Connection, car_park_id: int, plate: str, color: str, at: datetime
) -> int | None:
    """The vehicle's stay here that was open at `at` and has ended since."""
    stay_id: int | None = await conn.fetchval(
        """SELECT id FROM sessions
           WHERE car_park_id = $1 AND plate = $2 AND plate_color = $3
             AND entered_at <= $4 AND exited_at >= $4 AND status <> 'open'
           ORDER BY entered_at DESC LIMIT 1""",
        car_park_id,
        plate,
        color,
        at,
    )
    return stay_id


def _open_session(row: asyncpg.Record) -> OpenSession:
    rights = row.get("rights")
    return OpenSession(
        row["id"],
        row["entered_at"],
        _pay_later(row),
        row["fixed_fee_fen"],
        row["plate_color"],
        row["entry_certain"],
        tuple(RightTerms.from_json(r) for r in rights) if rights else (),
        row.get("blacklisted"),
        Validation.from_json(row["validation"]) if row.get("validation") else None,
        row["entry_proven"],
        row["status"],
    )


Identity = tuple[str, str]


@dataclass(frozen=True, slots=True)
class StayTerms:
    """What reduces a stay's fee besides the tariff: its vehicle's rights and a merchant's
    validation (billing.fees.stay_fee's `rights` and `validation`)."""

    rights: tuple[RightTerms, ...] = ()
    validation: Validation | None = None


async def stay_terms(conn: asyncpg.Connection, session_id: int) -> StayTerms:
    """The terms that price a stay wherever else it is priced (the gate's QR code, the booth,
    the quote, an operator's open, the receipt, a validation): an open stay's as its exit reads
    them, a closed one's the right its exit applied (whatever became of that right since)."""
    row = await conn.fetchrow(
        f"""SELECT CASE WHEN s.status = 'open' THEN {_ACTIVE_RIGHTS}
                   ELSE (SELECT json_agg({RIGHT_JSON}) FROM assigned_rights ar
                         JOIN right_specs sp ON sp.id = ar.spec_id
                         WHERE ar.id = s.applied_right_id) END AS rights,
                   {_VALIDATION} AS validation
            FROM sessions s WHERE s.id = $1""",
        session_id,
    )
    if row is None:
        return StayTerms()
    rights, validation = row["rights"], row["validation"]
    return StayTerms(
        tuple(RightTerms.from_json(r) for r in rights) if rights else (),
        Validation.from_json(validation) if validation else None,
    )


async def recent_exits(
    conn: asyncpg.Connection, car_park_id: int, since: datetime
) -> dict[Identity, int]:
    """Vehicles (plate, colour) that left since `since`, with their stay: a second read of one
    of them is the same car, never a stay of a parked look-alike."""
    rows = await conn.fetch(
        """SELECT DISTINCT ON (plate, plate_color) plate, plate_color, id FROM sessions
           WHERE car_park_id = $1 AND status = 'closed' AND exited_at >= $2
           ORDER BY plate, plate_color, exited_at DESC""",
        car_park_id,
        since,
    )
    return {(r["plate"], r["plate_color"]): r["id"] for r in rows}


# A stay is a ghost when it has been open longer than its car park's limit, or when its plate
# (of a compatible colour) has a stay at another car park that began after this one's entry: a
# car is in one place at a time, so it left here without an exit we saw. (Exit reads elsewhere
# that found no stay are not counted: such a read is for a person already.) Conditions on the
# stay `s` and its car park `cp` as of `{now}` (an exit read uploaded late is judged as of when
# it was taken, before the car entered elsewhere), shared by the lane (a ghost is no candidate
# from the moment it is one) and the sweep that files it for an operator (parking.booth.ghosts).
STAY_OPEN_TOO_LONG = (
    "s.entered_at < {now}::timestamptz - make_interval(days => cp.ghost_stay_after_days)"
)
GHOST_STAY = f"""({STAY_OPEN_TOO_LONG}
    OR EXISTS (
        SELECT 1 FROM sessions e
        WHERE e.plate = s.plate AND e.entered_at > s.entered_at
          AND e.entered_at <= {{now}}::timestamptz AND e.car_park_id <> s.car_park_id
          AND e.entry_certain
          AND (e.plate_color IS NULL OR s.plate_color IS NULL
               OR e.plate_color = s.plate_color)))"""


async def cars_here(
    conn: asyncpg.Connection, car_park_id: int, since: datetime, now: datetime
) -> tuple[dict[Identity, bool], dict[Identity, int]]:
    """What an uncertain exit read is matched against, in one round trip: the vehicles parked
    here at `now` (with whether their entry read was certain; stays that were ghosts at `now`
    are no candidates, whether or not the sweep has filed them since: an exit read uploaded
    late is judged as of when it was taken), and those that left since `since` (with their
    stay)."""
    rows = await conn.fetch(
        f"""SELECT s.plate, s.plate_color, s.entry_certain, NULL::bigint AS id
            FROM sessions s JOIN car_parks cp ON cp.id = s.car_park_id
            WHERE s.car_park_id = $1 AND s.status = 'open'
              AND NOT {GHOST_STAY.format(now="$3")}
            UNION ALL
            (SELECT DISTINCT ON (plate, plate_color) plate, plate_color, NULL, id FROM sessions
             WHERE car_park_id = $1 AND status = 'closed' AND exited_at >= $2
             ORDER BY plate, plate_color, exited_at DESC)""",
        car_park_id,
        since,
        now,
    )
    parked: dict[Identity, bool] = {}
    left: dict[Identity, int] = {}
    for r in rows:
        if r["id"] is None:
            parked[(r["plate"], r["plate_color"])] = r["entry_certain"]
        else:
            left[(r["plate"], r["plate_color"])] = r["id"]
    return parked, left


async def open_session(
    conn: asyncpg.Connection,
    *,
    car_park_id: int,
    plate: str,
    plate_color: str,
    entered_at: datetime,
    entry_capture_id: UUID | None,
    entry_certain: bool,
    fixed_fee_fen: int | None = None,
    assigned_right_id: int | None = None,
    entry_proven: bool = False,
) -> OpenSession:
    """Opens a stay and reads its driver's agreement and debts in the same round trip.
    `assigned_right_id`: the right whose place the stay takes (None: a visitor)."""
    row = await conn.fetchrow(
        f"""WITH s AS (
                INSERT INTO sessions
                    (car_park_id, plate, plate_color, entered_at, entry_capture_id, fixed_fee_fen,
                     entry_certain, assigned_right_id, entry_proven)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                RETURNING id, plate, entered_at, fixed_fee_fen, plate_color, entry_certain,
                          entry_proven, status)
            SELECT {_STAY_COLUMNS}, {_PAY_LATER_COLUMNS}
            FROM s {STAY_PAY_LATER_JOINS}""",
        car_park_id,
        plate,
        plate_color,
        entered_at,
        entry_capture_id,
        fixed_fee_fen,
        entry_certain,
        assigned_right_id,
        entry_proven,
    )
    return _open_session(row)


async def supersede_session(conn: asyncpg.Connection, session_id: int, at: datetime) -> None:
    """An entry for a plate already inside: the earlier stay's exit was missed. It is kept for an
    operator to review and never charged automatically."""
    await conn.execute(
        "UPDATE sessions SET status = 'superseded', exited_at = $2 WHERE id = $1",
        session_id,
        at,
    )


async def close_session(
    conn: asyncpg.Connection,
    *,
    session_id: int,
    exited_at: datetime,
    exit_capture_id: UUID,
    fee_fen: int,
    account_id: int | None,
    settlement: str,
    applied_right_id: int | None = None,
    status: str = "open",
) -> None:
    """Ends the stay, which is in `status` (open, or superseded: `OpenSession.status`)."""
    await conn.execute(
        """UPDATE sessions SET status = 'closed', exited_at = $2, exit_capture_id = $3,
                  fee_fen = $4, account_id = $5, settlement = $6, applied_right_id = $7
           WHERE id = $1 AND status = $8""",
        session_id,
        exited_at,
        exit_capture_id,
        fee_fen,
        account_id,
        settlement,
        applied_right_id,
        status,
    )


async def prepare_lookups(conn: asyncpg.Connection) -> None:
    """Runs a decision's lookups and its stay update with keys that match nothing: asyncpg then
    has them prepared on this connection, and its server process has read those tables'
    catalog. The inserts are left out: they cannot run without rows to refer to."""
    now = datetime.now(UTC)
    await load_gate(conn, "", "")
    await open_session_for_update(conn, 0, "", "")
    await recent_exits(conn, 0, now)
    await cars_here(conn, 0, now, now)
    await fees.tariff_versions(conn, 0)
    # An entry's blacklist and rights, and a capped pass's places (parking/rights/).
    await rights_repo.entry_standing(conn, operator_id=0, car_park_id=0, plate="", color="", at=now)
    await rights_repo.places_taken(conn, 0)
    await close_session(
        conn,
        session_id=0,
        exited_at=now,
        exit_capture_id=UUID(int=0),
        fee_fen=0,
        account_id=None,
        settlement="free",
    )


async def insert_exception(
    conn: asyncpg.Connection,
    *,
    capture_id: UUID,
    capture_captured_at: datetime,
    car_park_id: int,
    gate_id: int,
    reason: str,
    candidates: list[dict[str, Any]],
    image: bytes | None,
) -> int:
    exception_id: int = await conn.fetchval(
        """INSERT INTO lane_exceptions
               (capture_id, capture_captured_at, car_park_id, gate_id, reason, candidates, image)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id""",
        capture_id,
        capture_captured_at,
        car_park_id,
        gate_id,
        reason,
        candidates,
        image,
    )
    return exception_id


async def store_command(
    conn: asyncpg.Connection, capture_id: UUID, command: dict[str, Any], outcome: str
) -> None:
    """A decision taken later (paid at the gate, opened by an operator): a redelivered capture
    gets this command, not the first one."""
    await conn.execute(
        "UPDATE captures SET command = $2, outcome = $3 WHERE capture_id = $1",
        capture_id,
        command,
        outcome,
    )


@dataclass(frozen=True, slots=True)
class CameraOwnRead:
    """What the camera itself reported for a capture whose read the server's reader made (the
    camera was doubtful, or its read found no stay): its text as sent, colour, confidence
    (uncalibrated unless its model's is) and model, kept beside the decided read
    (`captures.camera_*`). For that end the camera is the second reader
    (`rules.frames_to_verify`)."""

    text: str
    color: str | None
    confidence: float
    model: str | None = None


@dataclass(frozen=True, slots=True)
class ChargeEvidence:
    """What a charge's verification reads: the stay's vehicle, whether each end's read was
    proven, and each end's kept frames (empty when none was sent or they have expired)."""

    status: str
    plate: str
    plate_color: str
    entry_proven: bool
    exit_proven: bool
    entry_frames: list[bytes]
    exit_frames: list[bytes]
    # Which reader made each end's read (`captures.plate_source`: camera, ocr, operator).
    entry_source: str | None = None
    exit_source: str | None = None
    # The camera's own read of an end the server's reader decided (None otherwise).
    entry_camera: CameraOwnRead | None = None
    exit_camera: CameraOwnRead | None = None


_FRAMES = """LEFT JOIN capture_keys {k} ON {k}.capture_id = {id}
    LEFT JOIN captures {c} ON {c}.capture_id = {k}.capture_id AND {c}.captured_at = {k}.captured_at
    LEFT JOIN capture_frames {f} ON {f}.capture_id = {id}"""


async def charge_evidence(conn: asyncpg.Connection, charge_id: int) -> ChargeEvidence | None:
    entry = _FRAMES.format(k="ek", c="ec", f="ef", id="s.entry_capture_id")
    exit_ = _FRAMES.format(k="xk", c="xc", f="xf", id="s.exit_capture_id")
    row = await conn.fetchrow(
        f"""SELECT ch.status, s.plate, s.plate_color, s.entry_proven,
                   COALESCE(xc.read_proven, false) AS exit_proven,
                   ec.plate_source AS entry_source, xc.plate_source AS exit_source,
                   ec.camera_plate AS entry_camera_plate, ec.camera_color AS entry_camera_color,
                   ec.camera_confidence AS entry_camera_confidence,
                   ec.camera_model AS entry_camera_model,
                   xc.camera_plate AS exit_camera_plate, xc.camera_color AS exit_camera_color,
                   xc.camera_confidence AS exit_camera_confidence,
                   xc.camera_model AS exit_camera_model,
                   ef.image AS entry_image, ef.more_images AS entry_more,
                   xf.image AS exit_image, xf.more_images AS exit_more
            FROM charges ch
            JOIN sessions s ON s.id = ch.session_id
            {entry}
            {exit_}
            WHERE ch.id = $1""",
        charge_id,
    )
    if row is None:
        return None

    def frames(first: bytes | None, more: list[bytes] | None) -> list[bytes]:
        return [first, *(more or [])] if first is not None else []

    def camera(end: str) -> CameraOwnRead | None:
        text = row[f"{end}_camera_plate"]
        if text is None:
            return None
        return CameraOwnRead(
            text,
            row[f"{end}_camera_color"],
            row[f"{end}_camera_confidence"],
            row[f"{end}_camera_model"],
        )

    return ChargeEvidence(
        row["status"],
        row["plate"],
        row["plate_color"],
        row["entry_proven"],
        row["exit_proven"],
        frames(row["entry_image"], row["entry_more"]),
        frames(row["exit_image"], row["exit_more"]),
        row["entry_source"],
        row["exit_source"],
        camera("entry"),
        camera("exit"),
    )

"""Rights and blacklists: the operator's side (create, renew, suspend, resume, cancel, bulk
import, blacklist) and the lane's entry (`entry_place`: a blacklisted vehicle, and which place of
a pass a stay takes).

A pass of "at most N inside" (`max_inside`) gives its places at entry: a vehicle of the pass
that enters while N of its vehicles are inside enters as a visitor (its stay holds no place and
is priced by the tariff), rather than being refused: the barrier never blocks a car that can
pay, and the driver learns it at the gate. Entries of one pass take its places one at a time
(the right's row lock), so two vehicles of a pass for one never both get the place.
"""

import csv
import io
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import asyncpg
from pydantic import ValidationError

from billing import audit, passes
from parking.auth.principal import Principal
from parking.errors import AppError, NotFound
from parking.lanes.rules import identity_color
from parking.rights import repository as repo
from parking.rights.schemas import (
    BlacklistEntry,
    ImportFailure,
    ImportReport,
    NewBlacklistEntry,
    NewRight,
    NewRightSpec,
    PassOccupancy,
    Renewal,
    Right,
    RightSpec,
    RightStatus,
    plate_of,
)

# Dates in an import are the car parks' local days.
LOCAL_ZONE = ZoneInfo("Asia/Shanghai")
IMPORT_COLUMNS = ("spec", "plates", "valid_from", "valid_until", "max_inside", "label")
MAX_IMPORT_ROWS = 5000


def company_of(principal: Principal) -> int:
    """The caller's operator company (the staff and merchant dependencies let no one else in)."""
    if principal.operator_id is None:
        raise AppError(403, "forbidden", "not a member of an operator company")
    return principal.operator_id


async def car_park_scope(
    conn: asyncpg.Connection, operator_id: int, codes: list[str] | None
) -> list[int] | None:
    """The ids of the company's car parks named (None: all of them, now and later); 404 when
    one is not the company's."""
    if codes is None:
        return None
    wanted = sorted(set(codes))
    ids = await repo.car_park_ids(conn, operator_id, wanted)
    if len(ids) != len(wanted):
        raise NotFound("car_park")
    return ids


def _spec(row: asyncpg.Record) -> RightSpec:
    data = dict(row)
    data["car_parks"] = None if data.pop("everywhere") else (data["car_parks"] or [])
    return RightSpec(**data)


async def create_spec(
    conn: asyncpg.Connection, principal: Principal, request: NewRightSpec
) -> RightSpec:
    operator_id = company_of(principal)
    ids = await car_park_scope(conn, operator_id, request.car_parks)
    row = await repo.insert_spec(
        conn,
        operator_id=operator_id,
        name=request.name,
        kind=request.kind,
        free_minutes=request.free_minutes,
        discount_percent=request.discount_percent,
        flat_fee_fen=request.flat_fee_fen,
        car_park_ids=ids,
        weekdays=request.weekdays,
        window_start=request.window_start,
        window_end=request.window_end,
        created_by=principal.actor,
    )
    if row is None:
        raise AppError(409, "right_spec_exists", "a right specification of that name exists")
    await audit.record(
        conn,
        principal.actor,
        "right_spec.created",
        f"right_spec:{row['id']}",
        request.model_dump(mode="json"),
    )
    return _spec(row)


async def list_specs(conn: asyncpg.Connection, principal: Principal) -> list[RightSpec]:
    return [_spec(r) for r in await repo.specs(conn, company_of(principal))]


async def _right(conn: asyncpg.Connection, operator_id: int, right_id: int) -> Right:
    row = await repo.right(conn, operator_id, right_id)
    if row is None:
        raise NotFound("right")
    return Right(**dict(row))


async def _insert(
    conn: asyncpg.Connection,
    principal: Principal,
    operator_id: int,
    request: NewRight,
    source: str,
) -> int:
    if not await repo.spec_exists(conn, operator_id, request.spec_id):
        raise NotFound("right_spec")
    # The one writer of assigned rights (operators, imports and purchases alike).
    right_id = await passes.assign_right(
        conn,
        operator_id=operator_id,
        spec_id=request.spec_id,
        vehicles=[(v.plate, v.color) for v in request.vehicles],
        valid_from=request.valid_from,
        valid_until=request.valid_until,
        max_inside=request.max_inside,
        label=request.label,
        source=source,
        created_by=principal.actor,
    )
    await audit.record(
        conn,
        principal.actor,
        "right.created",
        f"right:{right_id}",
        {
            "spec_id": request.spec_id,
            "vehicles": len(request.vehicles),
            "valid_from": request.valid_from.isoformat(),
            "valid_until": request.valid_until.isoformat(),
            "max_inside": request.max_inside,
            "source": source,
        },
    )
    return right_id


async def create_right(conn: asyncpg.Connection, principal: Principal, request: NewRight) -> Right:
    operator_id = company_of(principal)
    right_id = await _insert(conn, principal, operator_id, request, "operator")
    return await _right(conn, operator_id, right_id)


async def list_rights(
    conn: asyncpg.Connection,
    principal: Principal,
    *,
    status: RightStatus | None,
    plate: str | None,
    color: str | None,
    after_id: int,
    limit: int,
) -> list[Right]:
    rows = await repo.rights(
        conn,
        company_of(principal),
        status=status,
        plate=plate,
        color=color,
        after_id=after_id,
        limit=limit,
    )
    return [Right(**dict(r)) for r in rows]


# Which status a change may start from, and the status it leaves.
_TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "suspend": (frozenset({"active"}), "suspended"),
    "resume": (frozenset({"suspended"}), "active"),
    "cancel": (frozenset({"active", "suspended"}), "cancelled"),
}


async def change_status(
    conn: asyncpg.Connection, principal: Principal, right_id: int, change: str
) -> Right:
    """Suspends, resumes or cancels a right; a cancelled right is final. A stay inside keeps
    its place but the right no longer reduces its fee from the exit on."""
    operator_id = company_of(principal)
    row = await repo.right(conn, operator_id, right_id, lock=True)
    if row is None:
        raise NotFound("right")
    allowed, to = _TRANSITIONS[change]
    if row["status"] not in allowed:
        raise AppError(409, "right_status", f"a {row['status']} right cannot be {to}")
    await repo.update_right(conn, right_id, status=to)
    await audit.record(
        conn, principal.actor, f"right.{change}", f"right:{right_id}", {"from": row["status"]}
    )
    return await _right(conn, operator_id, right_id)


async def renew(
    conn: asyncpg.Connection, principal: Principal, right_id: int, request: Renewal
) -> Right:
    """Extends a right's validity (never shortens it: cancel for that). A vehicle parked under
    it is covered up to the new end at its exit."""
    operator_id = company_of(principal)
    row = await repo.right(conn, operator_id, right_id, lock=True)
    if row is None:
        raise NotFound("right")
    if row["status"] == "cancelled":
        raise AppError(409, "right_status", "a cancelled right cannot be renewed")
    if request.valid_until <= row["valid_until"]:
        raise AppError(409, "not_an_extension", "valid_until must be after the current end")
    await repo.update_right(conn, right_id, valid_until=request.valid_until)
    await audit.record(
        conn,
        principal.actor,
        "right.renewed",
        f"right:{right_id}",
        {"from": row["valid_until"].isoformat(), "to": request.valid_until.isoformat()},
    )
    return await _right(conn, operator_id, right_id)


# Bulk import


class _RowError(ValueError):
    """Why one CSV row is not imported: a code the console words, and the cell it failed on."""

    def __init__(self, code: str, value: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.value = value


def _local_instant(text: str, *, end_of_day: bool) -> datetime:
    """An ISO datetime with its offset, or a local date: its start (valid_from) or the end of
    that day (valid_until: the date is the last day of validity)."""
    text = text.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            if end_of_day:
                day += timedelta(days=1)
            return datetime.combine(day, time(0), tzinfo=LOCAL_ZONE)
        instant = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _RowError("invalid_date", text, f"{text!r} is not a date") from exc
    if instant.utcoffset() is None:
        raise _RowError(
            "invalid_date", text, f"{text!r} has no UTC offset (or give a date: YYYY-MM-DD)"
        )
    return instant


def _vehicles(cell: str) -> list[dict[str, str]]:
    vehicles = []
    for part in cell.replace("；", ";").split(";"):
        if not part.strip():
            continue
        plate, _, color = part.strip().partition("/")
        plate = plate.strip()
        color = color.strip() or identity_color(plate, None)
        try:
            vehicles.append({"plate": plate_of(plate, color), "color": color})
        except ValueError as exc:
            raise _RowError("invalid_plate", part.strip(), str(exc)) from exc
    return vehicles


def _row_request(row: dict[str, str], spec_ids: dict[str, int]) -> NewRight:
    spec = (row.get("spec") or "").strip()
    if spec not in spec_ids:
        raise _RowError("unknown_right_spec", spec, f"unknown right specification {spec!r}")
    max_inside = (row.get("max_inside") or "").strip()
    label = (row.get("label") or "").strip()
    return NewRight.model_validate(
        {
            "spec_id": spec_ids[spec],
            "vehicles": _vehicles(row.get("plates") or ""),
            "valid_from": _local_instant(row.get("valid_from") or "", end_of_day=False),
            "valid_until": _local_instant(row.get("valid_until") or "", end_of_day=True),
            "max_inside": int(max_inside) if max_inside else None,
            "label": label or None,
        }
    )


def _failure(line: int, exc: Exception) -> ImportFailure:
    if isinstance(exc, _RowError):
        return ImportFailure(line=line, code=exc.code, value=exc.value, error=str(exc))
    if isinstance(exc, ValidationError):
        error = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'row'}: {e['msg']}" for e in exc.errors()
        )
        return ImportFailure(line=line, code="invalid_row", error=error)
    if isinstance(exc, AppError):
        return ImportFailure(line=line, code=exc.code, error=exc.message)
    # A constraint the row broke in the database, or a cell that is no number.
    code = "conflict" if isinstance(exc, asyncpg.PostgresError) else "invalid_row"
    return ImportFailure(line=line, code=code, error=str(exc) or type(exc).__name__)


async def import_csv(conn: asyncpg.Connection, principal: Principal, body: bytes) -> ImportReport:
    """Imports one assigned right per CSV row (columns IMPORT_COLUMNS; `plates` is
    `浙A12345/blue;浙A12346/green`, the colour defaulting to the plate's grammar; dates are
    local days, `valid_until` the last day). Good rows are imported, each bad one is reported
    with its line and why, and changes nothing."""
    operator_id = company_of(principal)
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AppError(422, "invalid_csv", "the file is not UTF-8") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = set(IMPORT_COLUMNS[:4]) - set(reader.fieldnames or ())
    if missing:
        raise AppError(
            422,
            "invalid_csv",
            f"missing columns: {', '.join(sorted(missing))}",
            details={"columns": list(IMPORT_COLUMNS)},
        )
    spec_ids = await repo.spec_ids_by_name(conn, operator_id)
    imported: list[int] = []
    failed: list[ImportFailure] = []
    for index, row in enumerate(reader):
        line = reader.line_num
        if index >= MAX_IMPORT_ROWS:
            raise AppError(422, "invalid_csv", f"at most {MAX_IMPORT_ROWS} rows per file")
        try:
            request = _row_request(row, spec_ids)
            # A savepoint per row: one that fails in the database leaves the others.
            async with conn.transaction():
                imported.append(await _insert(conn, principal, operator_id, request, "import"))
        except (ValueError, AppError, asyncpg.PostgresError) as exc:
            failed.append(_failure(line, exc))
    return ImportReport(imported=len(imported), right_ids=imported, failed=failed)


async def pass_occupancy(conn: asyncpg.Connection, principal: Principal) -> list[PassOccupancy]:
    rows = await repo.occupancy_by_standing(conn, company_of(principal))
    return [PassOccupancy(**dict(r)) for r in rows]


# Blacklist


async def add_to_blacklist(
    conn: asyncpg.Connection, principal: Principal, request: NewBlacklistEntry
) -> BlacklistEntry:
    row = await repo.insert_blacklist(
        conn,
        operator_id=company_of(principal),
        plate=request.plate,
        color=request.color,
        reason=request.reason,
        created_by=principal.actor,
    )
    if row is None:
        raise AppError(409, "already_blacklisted", "the vehicle is on the blacklist already")
    await audit.record(
        conn,
        principal.actor,
        "blacklist.added",
        f"blacklist:{row['id']}",
        {"reason": request.reason},
    )
    return BlacklistEntry(**dict(row))


async def list_blacklist(
    conn: asyncpg.Connection, principal: Principal, *, include_removed: bool, limit: int
) -> list[BlacklistEntry]:
    rows = await repo.blacklist(
        conn, company_of(principal), include_removed=include_removed, limit=limit
    )
    return [BlacklistEntry(**dict(r)) for r in rows]


async def remove_from_blacklist(
    conn: asyncpg.Connection, principal: Principal, entry_id: int
) -> BlacklistEntry:
    row = await repo.remove_blacklist(conn, company_of(principal), entry_id, principal.actor)
    if row is None:
        raise NotFound("blacklist_entry")
    await audit.record(conn, principal.actor, "blacklist.removed", f"blacklist:{entry_id}", {})
    return BlacklistEntry(**dict(row))


# The lane's entry


@dataclass(frozen=True, slots=True)
class EntryStanding:
    """A vehicle at an entry gate: its blacklisting reason in the company (None: not listed)
    and its active, unexpired rights here as (id, max_inside), by id."""

    blacklisted: str | None
    rights: list[tuple[int, int | None]]


async def entry_standing(
    conn: asyncpg.Connection,
    *,
    operator_id: int,
    car_park_id: int,
    plate: str,
    color: str,
    at: datetime,
) -> EntryStanding:
    """One query: what the entry needs to know of the vehicle's blacklisting and rights."""
    blacklisted, found = await repo.entry_standing(
        conn, operator_id=operator_id, car_park_id=car_park_id, plate=plate, color=color, at=at
    )
    return EntryStanding(blacklisted, found)


async def take_place(
    conn: asyncpg.Connection, rights: list[tuple[int, int | None]]
) -> tuple[int | None, bool]:
    """The right whose place an entering stay takes, and whether it enters as a visitor because
    every place of its pass is taken.

    A capped pass's place is taken whenever one is free, whatever uncapped rights the vehicle
    also holds: at the exit every uncapped right and the capped one whose place the stay holds
    compete (the most favourable to the driver applies), so a stay that did not take a free
    place would lose its pass for nothing. Each capped right is tried after its row lock and a
    count of its stays inside, in id order. With none free, the stay holds its first uncapped
    right (no lock), or, with none, enters as a visitor."""
    if not rights:
        return None, False
    for right_id, cap in rights:
        if cap is None:
            continue
        await repo.lock_right(conn, right_id)
        if await repo.places_taken(conn, right_id) < cap:
            return right_id, False
    uncapped = [right_id for right_id, cap in rights if cap is None]
    if uncapped:
        return uncapped[0], False
    return None, True

"""The operator API's use cases. Every function is scoped to the caller's operator company:
another company's car parks, stays, exceptions and charges are not found (404), never
forbidden. Every change writes an audit_log row naming the staff member.

Functions that change a gate (`resolve_exception`, `open_gate`) return a `GateEffect` with the
decision: the caller commits and only then `apply` publishes the command and moves the
occupancy counter.
"""

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
from pydantic import ValidationError

from billing import audit, captures, charges, debts, fees, refunds, reports
from billing import queue as job_queue
from billing.tariff import Tariff
from gate_controller.protocol import CameraRead, Capture, Command, GateAddress
from parking.auth.principal import Principal
from parking.car_parks import service as car_parks_service
from parking.errors import AppError, NotFound
from parking.feeds import repository as feeds_repo
from parking.gates import repository as gates_repo
from parking.gates.commands import publish_command
from parking.lanes import repository as lanes_repo
from parking.lanes.reading import operator_reading
from parking.lanes.service import LaneService
from parking.logging import get_logger, mask_plate
from parking.merchants import service as merchants
from parking.occupancy.service import Occupancy
from parking.operators import repository as repo
from parking.operators.schemas import (
    AuditEntry,
    AuditPage,
    CaptureConflict,
    CarParkChange,
    ChargeException,
    DebtBucket,
    Gate,
    GateOpening,
    GhostStayEnd,
    GhostStayEnded,
    LaneException,
    ManualOpen,
    NewGate,
    NewRefund,
    NewTariff,
    Opened,
    OperatorCarPark,
    OutboxJob,
    Refund,
    RefundLine,
    Resolved,
    RevenueLine,
    Stay,
    TariffVersion,
)
from parking.runtime import Runtime
from plate_recognition.grammar import normalise

log = get_logger(__name__)

# A new tariff may start at most this long ago (clock skew between the console and us); any
# earlier would reprice stays that have already begun.
TARIFF_BACKDATE_TOLERANCE = timedelta(minutes=1)
# What the lane answers when a capture still needs a person: an operator's plate must not.
_STILL_AN_EXCEPTION = frozenset({"held_no_entry", "held_unreadable", "held_ambiguous"})
# Exceptions about a stay rather than an unread plate (parking.lanes.edges, parking.booth): their
# capture is an entry or an exit already decided, and deciding it again would enter or close a
# car a second time. The booth payment, a refund or a manual open settles them. An
# 'offline_exit' is one too: its car left while the gate was offline, its stay closed unpaid.
_ABOUT_A_STAY = frozenset({"unpaid_exit", "offline_booth", "offline_exit", "ghost_stay"})
# Exceptions whose car left long ago: a pay-later exit whose charge an operator rejected
# (parking.confirmations). Deciding them again records the decision, moves the stay and the
# occupancy, and commands no gate: an open command would wait unused at a barrier with
# nobody in front of it (or lift it for whoever is).
_CAR_GONE = frozenset({"rejected"})
# A ghost stay that has ended since (its exit came, its vehicle entered again, an operator ended
# it): its exception was resolved with it, and nothing an operator does to it may close, charge
# or open anything.
_STAY_ENDED = AppError(
    409,
    "stay_ended",
    "the ghost stay has ended since (its exit, its vehicle's return or an operator ended it): "
    "nothing is left to do",
)
REVENUE_COLUMNS = tuple(RevenueLine.model_fields)
_LONGEST_REPORT = timedelta(days=366)
_DEFAULT_REPORT = timedelta(days=29)  # the last 30 days, both ends included
MANUAL_OPEN_DISPLAY = "人工放行"
# A job not done this long after it was due, or tried this many times since its last retry, is
# stuck: listed for a person before it is dead.
JOB_OVERDUE = timedelta(minutes=15)
JOB_MANY_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class GateEffect:
    """What happens after commit: the command to the gate (None: no gate is commanded), the
    occupancy change."""

    car_park_id: int
    address: GateAddress
    command: Command | None
    occupancy_delta: int


async def apply(runtime: Runtime, effect: GateEffect) -> None:
    """After commit. Occupancy first: a publish that fails must not lose the counted change."""
    if effect.occupancy_delta:
        await runtime.occupancy.adjust(effect.car_park_id, effect.occupancy_delta)
    if effect.command is None:
        return
    await publish_command(runtime.mqtt, runtime.settings, effect.address, effect.command)
    log.info(
        "operator.gate_command",
        lot=effect.address.lot,
        gate=effect.address.gate,
        action=effect.command.action,
    )


def _operator_id(principal: Principal) -> int:
    if principal.operator_id is None:  # OperatorDep only lets staff tokens through
        raise AppError(403, "forbidden", "not a member of an operator company")
    return principal.operator_id


async def _own_car_park(
    conn: asyncpg.Connection, principal: Principal, code: str, *, lock: bool = False
) -> asyncpg.Record:
    row = await repo.car_park(conn, _operator_id(principal), code, lock=lock)
    if row is None:
        raise NotFound("car_park")
    return row


def _car_park_view(row: asyncpg.Record, occupied: int) -> OperatorCarPark:
    return OperatorCarPark(
        **car_parks_service.view(row, occupied).model_dump(),
        no_entry_policy=row["no_entry_policy"],
        no_entry_fee_fen=row["no_entry_fee_fen"],
        closed=row["closed"],
    )


# Car parks, gates, tariffs


async def list_car_parks(
    conn: asyncpg.Connection, occupancy: Occupancy, principal: Principal
) -> list[OperatorCarPark]:
    rows = await repo.car_parks(conn, _operator_id(principal))
    counts = await occupancy.get_many([r["id"] for r in rows])
    return [_car_park_view(r, counts[r["id"]]) for r in rows]


async def get_car_park(
    conn: asyncpg.Connection, occupancy: Occupancy, principal: Principal, code: str
) -> OperatorCarPark:
    row = await _own_car_park(conn, principal, code)
    return _car_park_view(row, await occupancy.get(row["id"]))


async def update_car_park(
    conn: asyncpg.Connection,
    occupancy: Occupancy,
    principal: Principal,
    code: str,
    change: CarParkChange,
) -> OperatorCarPark:
    row = await _own_car_park(conn, principal, code, lock=True)
    wanted = change.model_dump(exclude_none=True)
    changed = {k: {"from": row[k], "to": v} for k, v in wanted.items() if row[k] != v}
    if changed:
        row = await repo.update_car_park(
            conn,
            row["id"],
            name=wanted.get("name", row["name"]),
            capacity=wanted.get("capacity", row["capacity"]),
            closed=wanted.get("closed", row["closed"]),
        )
        await audit.record(
            conn, principal.actor, "car_park.updated", f"car_park:{row['id']}", changed
        )
    return _car_park_view(row, await occupancy.get(row["id"]))


async def list_gates(conn: asyncpg.Connection, principal: Principal, code: str) -> list[Gate]:
    car_park = await _own_car_park(conn, principal, code)
    return [Gate(**dict(r)) for r in await repo.gates(conn, car_park["id"])]


async def add_gate(conn: asyncpg.Connection, principal: Principal, code: str, new: NewGate) -> Gate:
    car_park = await _own_car_park(conn, principal, code)
    row = await repo.insert_gate(conn, car_park["id"], new.code, new.direction)
    if row is None:
        raise AppError(409, "gate_exists", f"the car park already has a gate {new.code!r}")
    await audit.record(
        conn,
        principal.actor,
        "gate.created",
        f"gate:{row['id']}",
        {"car_park": code, "gate": new.code, "direction": new.direction},
    )
    return Gate(code=row["code"], direction=row["direction"], created_at=row["created_at"])


def _tariff_view(row: asyncpg.Record) -> TariffVersion:
    return TariffVersion(
        id=row["id"],
        effective_from=row["effective_from"],
        rules=row["rules"],
        created_at=row["created_at"],
    )


async def list_tariffs(
    conn: asyncpg.Connection, principal: Principal, code: str
) -> list[TariffVersion]:
    car_park = await _own_car_park(conn, principal, code)
    return [_tariff_view(r) for r in await repo.tariffs(conn, car_park["id"])]


async def add_tariff(
    conn: asyncpg.Connection, principal: Principal, code: str, new: NewTariff, now: datetime
) -> TariffVersion:
    car_park = await _own_car_park(conn, principal, code)
    try:
        tariff = Tariff.from_json(new.rules)
    except ValidationError as exc:
        details = [
            {"loc": ["rules", *e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise AppError(422, "invalid_tariff", "the tariff rules are not valid", details) from exc
    if new.effective_from < now - TARIFF_BACKDATE_TOLERANCE:
        # A stay is priced by the tariff in force when it began: a version starting in the
        # past would change the price of stays already begun.
        raise AppError(
            422,
            "effective_from_in_past",
            "a tariff cannot start in the past: it would change the price of stays already begun",
        )
    row = await repo.insert_tariff(conn, car_park["id"], new.effective_from, tariff.to_json())
    if row is None:
        raise AppError(
            409, "tariff_exists", "the car park already has a tariff version from that instant"
        )
    await audit.record(
        conn,
        principal.actor,
        "tariff.created",
        f"tariff:{row['id']}",
        {"car_park": code, "effective_from": new.effective_from.isoformat()},
    )
    return _tariff_view(row)


# Stays


async def list_stays(
    conn: asyncpg.Connection,
    principal: Principal,
    *,
    car_park: str | None,
    plate: str | None,
    entered_from: datetime | None,
    entered_to: datetime | None,
    status: str | None,
    limit: int,
) -> list[Stay]:
    exact = None
    if plate is not None:
        # Exact, but written as people write plates: any case, with or without the dot.
        exact = normalise(plate)
        if exact is None:
            raise AppError(422, "invalid_plate", "not a licence plate")
    car_park_id = (await _own_car_park(conn, principal, car_park))["id"] if car_park else None
    rows = await repo.stays(
        conn,
        _operator_id(principal),
        car_park_id=car_park_id,
        plate=exact,
        entered_from=entered_from,
        entered_to=entered_to,
        status=status,
        limit=limit,
    )
    return [Stay(**{**dict(r), "plate": mask_plate(r["plate"])}) for r in rows]


# The exception queue


def image_url(exception_id: int) -> str:
    return f"/api/v1/operator/exceptions/{exception_id}/image"


async def list_exceptions(
    conn: asyncpg.Connection,
    principal: Principal,
    *,
    car_park: str | None,
    status: str | None,
    limit: int,
) -> list[LaneException]:
    car_park_id = (await _own_car_park(conn, principal, car_park))["id"] if car_park else None
    rows = await repo.exceptions(
        conn, _operator_id(principal), car_park_id=car_park_id, status=status, limit=limit
    )
    return [
        LaneException(**dict(r), image_url=image_url(r["id"]) if r["has_image"] else None)
        for r in rows
    ]


async def list_capture_conflicts(
    conn: asyncpg.Connection, principal: Principal, *, car_park: str | None, limit: int
) -> list[CaptureConflict]:
    car_park_id = (await _own_car_park(conn, principal, car_park))["id"] if car_park else None
    rows = await repo.capture_conflicts(
        conn, _operator_id(principal), car_park_id=car_park_id, limit=limit
    )
    return [CaptureConflict(**dict(r)) for r in rows]


async def audit_log(
    conn: asyncpg.Connection,
    principal: Principal,
    *,
    before: int | None,
    action: str | None,
    limit: int,
) -> AuditPage:
    rows = await repo.audit_log(
        conn, _operator_id(principal), before=before, action=action, limit=limit
    )
    return AuditPage(
        entries=[AuditEntry(**dict(r)) for r in rows],
        next_before=rows[-1]["id"] if len(rows) == limit else None,
    )


async def list_gate_openings(
    conn: asyncpg.Connection, principal: Principal, *, car_park: str | None, limit: int
) -> list[GateOpening]:
    car_park_id = (await _own_car_park(conn, principal, car_park))["id"] if car_park else None
    rows = await gates_repo.gate_events(
        conn, _operator_id(principal), car_park_id=car_park_id, limit=limit
    )
    return [GateOpening(**dict(r)) for r in rows]


async def exception_image(
    conn: asyncpg.Connection, principal: Principal, exception_id: int
) -> bytes:
    row = await repo.exception_image(conn, _operator_id(principal), exception_id)
    if row is None:
        raise NotFound("exception")
    if row["image"] is None:
        raise NotFound("image")
    image: bytes = row["image"]
    return image


def _held_capture(held: repo.HeldCapture, plate: str, color: str | None) -> Capture:
    """The held capture as the lane decides it again: the vehicle (plate, colour) as a person
    named it, the rest as the gate sent it."""
    return Capture(
        capture_id=held.capture_id,
        seq=held.seq,
        direction=held.direction,
        captured_at=held.captured_at,
        offline=held.offline,
        camera_read=(
            CameraRead(plate=plate, color=color, confidence=1.0)  # type: ignore[arg-type]
            if color
            else None
        ),
    )


async def resolve_exception(
    conn: asyncpg.Connection,
    lanes: LaneService,
    principal: Principal,
    exception_id: int,
    identity: tuple[str, str],
    now: datetime,
) -> tuple[Resolved, GateEffect]:
    """The attendant names the vehicle of a held capture, plate and colour: it is decided again,
    as the lane decides any capture, with that vehicle as a certain read; the capture row and
    the exception record the new decision in the caller's transaction."""
    plate, color = identity
    held = await repo.exception_for_update(conn, _operator_id(principal), exception_id)
    if held is None:
        raise NotFound("exception")
    if held.reason == "ghost_stay" and await repo.ghost_stay_ended(conn, held.capture_id):
        raise _STAY_ENDED
    if held.exception_status != "open":
        raise AppError(409, "already_resolved", "this exception has already been resolved")
    if held.reason in _ABOUT_A_STAY:
        raise AppError(409, "not_a_plate_question", "this exception is about a stay, not a plate")
    gate = await lanes_repo.load_gate(conn, held.lot, held.gate)
    if gate is None:  # the exception's gate is a foreign key: this cannot happen
        raise NotFound("gate")
    # Decided as of when the capture reached us: the car was at the barrier then (and, for an
    # exit, may have come back in since).
    decision = await lanes.decide(
        conn,
        gate,
        _held_capture(held, plate, color),
        operator_reading(plate, color),
        now,
        received_at=held.received_at,
    )
    if decision.outcome in _STILL_AN_EXCEPTION:
        raise AppError(
            409,
            "no_open_stay",
            "no stay of a car with this plate was open here when the capture was taken: check "
            "the plate, or open the gate by hand",
        )
    if decision.outcome == "held_blacklisted":
        raise AppError(
            409,
            "blacklisted",
            "the vehicle is on the blacklist: remove it first, or open the gate by hand",
        )
    command = decision.command
    # A duplicate read: the vehicle went through on another capture (a re-read at the barrier,
    # or its later crossing), so nobody waits at the barrier for this one.
    commanded = held.reason not in _CAR_GONE and decision.outcome != "duplicate_read"
    await lanes_repo.update_capture_decision(
        conn,
        held.capture_id,
        plate=decision.plate,
        plate_color=color,
        plate_source="operator",
        match_status=decision.match_status,
        outcome=decision.outcome,
        session_id=decision.session_id,
        # Uncommanded, the gate's redelivery of the capture still gets what it was told then.
        command=command.model_dump(mode="json", exclude_none=True) if commanded else None,
    )
    await repo.mark_exception_resolved(conn, held.capture_id, plate, principal.actor)
    await audit.record(
        conn,
        principal.actor,
        "lane_exception.resolved",
        f"lane_exception:{held.exception_id}",
        {
            "capture_id": str(held.capture_id),
            "outcome": decision.outcome,
            "action": command.action,
            "gate_commanded": commanded,
            "fee_fen": decision.fee_fen,
            "session_id": decision.session_id,
            "charge_id": decision.charge_id,
        },
    )
    effect = GateEffect(
        held.car_park_id,
        GateAddress(held.lot, held.gate),
        command if commanded else None,
        decision.occupancy_delta,
    )
    resolved = Resolved(
        outcome=decision.outcome,
        action=command.action,
        fee_fen=decision.fee_fen,
        gate_commanded=commanded,
    )
    return resolved, effect


# Opening a gate by hand


async def open_gate(
    conn: asyncpg.Connection,
    principal: Principal,
    code: str,
    gate_code: str,
    request: ManualOpen,
    *,
    command_ttl: timedelta,
    now: datetime,
) -> tuple[Opened, GateEffect]:
    """Opens a gate for the reason given. With the capture of a held exit, its stay is closed
    (settlement 'operator': the fee is recorded, nobody is charged) and its exception, if any,
    is resolved."""
    car_park = await _own_car_park(conn, principal, code)
    gate = await repo.gate(conn, car_park["id"], gate_code)
    if gate is None:
        raise NotFound("gate")
    # Without a capture the command gets an id of its own: the gate opens for nobody in its
    # records.
    capture_id = request.capture_id or uuid.uuid4()
    plate: str | None = None
    session_id: int | None = None
    fee_fen: int | None = None
    occupancy_delta = 0
    exception_id: int | None = None
    held = None
    if request.capture_id is not None:
        # Its exception, the capture, then its stay: as a payment being booked or taken at the
        # booth locks them (`billing.captures`), which waited for the exception this held its
        # capture and stay for (a deadlock, one of them a 500).
        await captures.lock_for_decision(conn, request.capture_id, car_park["id"])
        held = await repo.capture_at_gate(conn, gate["id"], request.capture_id)
        if held is None:
            raise NotFound("capture")
        if await repo.ghost_stay_ended(conn, held.capture_id):
            raise _STAY_ENDED
        stay = held.stay
        # Only a held exit's car is at the barrier: one answered "open" left then, and its stay
        # open now is one reopened since (a rejected charge), whose car may be inside.
        if (
            held.direction == "out"
            and held.action == "hold"
            and stay is not None
            and stay.status == "open"
        ):
            terms = await lanes_repo.stay_terms(conn, stay.id)
            priced = fees.stay_fee(
                await fees.tariff_versions(conn, car_park["id"]),
                entered_at=stay.entered_at,
                at=now,
                plate_color=stay.plate_color,
                fixed_fee_fen=stay.fixed_fee_fen,
                rights=terms.rights,
                validation=terms.validation,
            )
            fee_fen = priced.fee_fen if priced else None
            await repo.close_stay_by_operator(
                conn,
                session_id=stay.id,
                exited_at=now,
                exit_capture_id=held.capture_id,
                fee_fen=fee_fen,
            )
            if priced is not None:
                await merchants.settle(conn, stay.id, priced.validation_fen, principal.actor)
            plate, session_id = stay.plate, stay.id
            occupancy_delta = -1 if stay.counted_in else 0
    command = Command(
        capture_id=capture_id,
        action="open",
        display=[plate, MANUAL_OPEN_DISPLAY] if plate else [MANUAL_OPEN_DISPLAY],
        issued_at=now,
        expires_at=now + command_ttl,
        remote=True,
    )
    if held is not None and held.action == "hold":
        # A redelivery of the held capture must not hold the car again.
        await lanes_repo.store_command(
            conn,
            capture_id,
            command.model_dump(mode="json", exclude_none=True),
            "opened_by_operator",
        )
        exception_id = await repo.mark_exception_resolved(conn, capture_id, None, principal.actor)
    await audit.record(
        conn,
        principal.actor,
        "gate.opened",
        f"gate:{gate['id']}",
        {
            "car_park": code,
            "gate": gate_code,
            "reason": request.reason,
            "capture_id": str(request.capture_id) if request.capture_id else None,
            "session_id": session_id,
            "fee_fen": fee_fen,
            "exception_id": exception_id,
        },
    )
    effect = GateEffect(car_park["id"], GateAddress(code, gate_code), command, occupancy_delta)
    return Opened(capture_id=capture_id, session_id=session_id, fee_fen=fee_fen), effect


# Ending a ghost stay


async def end_ghost_stay(
    conn: asyncpg.Connection,
    principal: Principal,
    exception_id: int,
    request: GhostStayEnd,
    now: datetime,
) -> tuple[GhostStayEnded, GateEffect]:
    """The operator knows a ghost stay's car is gone (it left unseen, or it is parked
    elsewhere): the stay closes as left at an unknown time, settlement 'operator', no fee and
    nobody charged, and its ghost exception is resolved with it (migration 0055). No gate is
    commanded: the exception's capture is the stay's entry, and nobody waits at any barrier."""
    ghost = await repo.ghost_exception(conn, _operator_id(principal), exception_id)
    if ghost is None:
        raise NotFound("exception")
    if ghost.session_id is None:
        raise AppError(409, "not_a_ghost_stay", "this exception is not about a ghost stay")
    ended = await repo.end_ghost_stay(conn, ghost.session_id, now)
    if ended is None:
        raise _STAY_ENDED
    # Charged nobody: a merchant's validation took nothing off, all of it goes back.
    await merchants.settle(conn, ended["id"], 0, principal.actor)
    await audit.record(
        conn,
        principal.actor,
        "stay.ended",
        f"session:{ended['id']}",
        {
            "exception_id": ghost.exception_id,
            "reason": request.reason,
            "settlement": "operator",
            "exit_time": "unknown",
            "counted_out": ended["counted_in"],
        },
    )
    effect = GateEffect(
        ghost.car_park_id,
        GateAddress(ghost.lot, ghost.gate),
        None,
        -1 if ended["counted_in"] else 0,
    )
    return GhostStayEnded(
        session_id=ended["id"], exception_id=ghost.exception_id, exited_at=now
    ), effect


# Money


async def refund_charge(
    conn: asyncpg.Connection, principal: Principal, charge_id: int, request: NewRefund
) -> Refund:
    """Gives (part of) a collected fee back; billing audit-logs the request."""
    if not await repo.charge_of_operator(conn, _operator_id(principal), charge_id):
        raise NotFound("charge")
    try:
        refund = await refunds.request_for_charge(
            conn,
            charge_id=charge_id,
            amount_fen=request.amount_fen,
            reason=request.reason,
            actor=principal.actor,
        )
    except refunds.RefundNotAllowed as exc:
        raise AppError(409, "refund_not_allowed", str(exc)) from exc
    return Refund(
        id=refund.id,
        charge_id=refund.charge_id,
        amount_fen=refund.amount_fen,
        kind=refund.kind,
        reason=refund.reason,
        status=refund.status,
    )


async def list_charge_exceptions(
    conn: asyncpg.Connection,
    principal: Principal,
    *,
    car_park: str | None,
    status: str | None,
    limit: int,
) -> list[ChargeException]:
    car_park_id = (await _own_car_park(conn, principal, car_park))["id"] if car_park else None
    rows = await repo.charge_exceptions(
        conn, _operator_id(principal), car_park_id=car_park_id, status=status, limit=limit
    )
    return [ChargeException(**dict(r)) for r in rows]


async def retry_charge_exception(
    conn: asyncpg.Connection, principal: Principal, exception_id: int
) -> ChargeException:
    """The cause is fixed (a car park renamed, credentials renewed): the charge is sent again
    by the outbox worker, which asks the provider first. Audit-logged by billing."""
    operator_id = _operator_id(principal)
    if not await repo.charge_exception_of_operator(conn, operator_id, exception_id):
        raise NotFound("charge_exception")
    if await charges.retry_held(conn, exception_id, principal.actor) is None:
        raise AppError(409, "already_handled", "this charge exception is no longer open")
    rows = await repo.charge_exceptions(conn, operator_id, car_park_id=None, status=None, limit=500)
    return next(ChargeException(**dict(r)) for r in rows if r["id"] == exception_id)


def period(start: date | None, end: date | None, timezone: str) -> tuple[date, date]:
    """A report's days, both included; by default the last 30 local days."""
    end = end or datetime.now(ZoneInfo(timezone)).date()
    if start is None:
        # Not before the first day there is (a date near date.min cannot go back 29 days).
        start = end - _DEFAULT_REPORT if end - date.min >= _DEFAULT_REPORT else date.min
    if start > end:
        raise AppError(422, "invalid_period", "'from' must not be after 'to'")
    if end - start > _LONGEST_REPORT:
        raise AppError(422, "invalid_period", "a report covers at most 366 days")
    return start, end


async def list_refunds(
    conn: asyncpg.Connection, principal: Principal, start: date, end: date, timezone: str
) -> list[RefundLine]:
    own = [r["id"] for r in await repo.car_parks(conn, _operator_id(principal))]
    rows = await reports.refunds(conn, start=start, end=end, timezone=timezone, car_park_ids=own)
    return [RefundLine(**r) for r in rows]


async def revenue(
    conn: asyncpg.Connection, principal: Principal, start: date, end: date, timezone: str
) -> list[dict[str, Any]]:
    own = [r["id"] for r in await repo.car_parks(conn, _operator_id(principal))]
    return await reports.revenue(conn, start=start, end=end, timezone=timezone, car_park_ids=own)


def revenue_csv(rows: list[dict[str, Any]]) -> str:
    # An empty report still has its header, so that it parses as a table.
    return reports.to_csv(rows) or ",".join(REVENUE_COLUMNS) + "\r\n"


async def debts_by_age(
    conn: asyncpg.Connection, principal: Principal, now: datetime
) -> list[DebtBucket]:
    rows = await repo.open_debts(conn, _operator_id(principal), now)
    return [DebtBucket.model_validate(bucket) for bucket in debts.age_buckets(rows)]


# The outbox's jobs that need a person


def _job_view(row: asyncpg.Record, now: datetime) -> OutboxJob:
    state: Literal["due", "stuck", "dead"]
    if row["dead_at"] is not None:
        state = "dead"
    elif row["done_at"] is None and (
        row["available_at"] < now - JOB_OVERDUE or row["attempts"] >= JOB_MANY_ATTEMPTS
    ):
        state = "stuck"
    else:
        state = "due"
    fields = {k: row[k] for k in OutboxJob.model_fields if k != "state"}
    return OutboxJob(**fields, state=state)


async def list_jobs(
    conn: asyncpg.Connection,
    principal: Principal,
    *,
    car_park: str | None,
    state: str | None,
    limit: int,
    now: datetime,
) -> list[OutboxJob]:
    """Dead and stuck charges, refunds and gate commands of the company's car parks."""
    car_park_id = (await _own_car_park(conn, principal, car_park))["id"] if car_park else None
    rows = await repo.jobs_needing_a_person(
        conn,
        _operator_id(principal),
        car_park_id=car_park_id,
        dead=state in (None, "dead"),
        stuck=state in (None, "stuck"),
        overdue_before=now - JOB_OVERDUE,
        many_attempts=JOB_MANY_ATTEMPTS,
        limit=limit,
    )
    return [_job_view(r, now) for r in rows]


async def retry_job(
    conn: asyncpg.Connection, principal: Principal, job_id: int, now: datetime
) -> OutboxJob:
    """A dead job due again now, with its kind's attempts afresh (audit-logged). A charge's
    retry asks the provider for its order first, like every retry; a feed's delivery takes
    the other end of its stay with it when that is dead too."""
    job = await repo.job_of_operator(conn, _operator_id(principal), job_id)
    if job is None:
        raise NotFound("job")
    if await job_queue.retry_dead(conn, job_id) is None:
        raise AppError(409, "job_not_dead", "only a dead job can be retried")
    # A feed's delivery goes again with the other end of its stay when that died with it.
    with_it = (
        await feeds_repo.retried(conn, job["ref_id"]) if job["kind"] == "feed_delivery" else []
    )
    await audit.record(
        conn,
        principal.actor,
        "job.retried",
        f"outbox:{job_id}",
        {
            "kind": job["kind"],
            "ref_id": job["ref_id"],
            "car_park": job["car_park"],
            "attempts": job["total_attempts"],
            "last_error": job["last_error"],
            **({"retried_with": with_it} if with_it else {}),
        },
    )
    await repo.wake_outbox_workers(conn)
    retried = await repo.job_of_operator(conn, _operator_id(principal), job_id)
    assert retried is not None
    return _job_view(retried, now)

"""Booth payments and gate clock records: the attendant's side of the lane's edges.

An attendant records cash or a card taken at the booth for a held exit or for a stay whose car
left while the gate was offline. The stay closes as 'paid_at_booth', the ledger books the
money from the booth's clearing account (`clearing:cash|card:car_park:N`) to the car park's
revenue, the exit's exception (awaiting the booth) is resolved and the audit log names the
attendant; a held gate is sent its open command after commit, unless another car has been
captured there since (`parking.payments.service.capture_to_open`). The stay's fee can be taken
once only: a second booking of it (by a booth, a charge or a QR payment) is a unique violation
of `stay_fee_bookings` (migration 0018), and every path first finds the stay settled.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from billing import audit, captures, fees, ledger
from billing.tariff import format_fen
from gate_controller.protocol import Command, GateAddress
from parking.auth.principal import Principal
from parking.booth import repository as repo
from parking.booth.schemas import BoothPayment, ClockSkew, NewBoothPayment
from parking.errors import AppError, NotFound
from parking.gates.commands import publish_command
from parking.lanes import repository as lanes_repo
from parking.logging import get_logger
from parking.operators import repository as operators_repo
from parking.payments import repository as payments_repo
from parking.payments import service as payments_service
from parking.runtime import Runtime

log = get_logger(__name__)

# Held exits with a fee a person can take at the booth: the ones the QR code is shown for.
_HELD_WITH_FEE = frozenset({"held_unbound", "held_no_agreement", "held_over_limit", "held_arrears"})
_PAID_DISPLAY = "已缴费 一路顺风"


@dataclass(frozen=True, slots=True)
class BoothEffect:
    """After commit: the held gate's open command (if any) and the occupancy change."""

    car_park_id: int
    address: GateAddress | None = None
    command: Command | None = None
    occupancy_delta: int = 0


async def _own_car_park(
    conn: asyncpg.Connection, principal: Principal, code: str
) -> asyncpg.Record:
    if principal.operator_id is None:  # OperatorDep lets only staff through
        raise AppError(403, "forbidden", "not a member of an operator company")
    row = await operators_repo.car_park(conn, principal.operator_id, code)
    if row is None:
        raise NotFound("car_park")
    return row


async def _due(conn: asyncpg.Connection, stay: repo.BoothStay, now: datetime) -> int:
    """The fee the booth takes: an open stay's fee now (as the QR code would ask), or the fee
    recorded when a car that left offline was uploaded."""
    if stay.status == "open":
        terms = await lanes_repo.stay_terms(conn, stay.id)
        priced = fees.stay_fee(
            await fees.tariff_versions(conn, stay.car_park_id),
            entered_at=stay.entered_at,
            at=now,
            plate_color=stay.plate_color,
            fixed_fee_fen=stay.fixed_fee_fen,
            rights=terms.rights,
            validation=terms.validation,
        )
        if priced is None:
            raise AppError(409, "no_tariff", "the car park has no tariff for this stay")
        due = priced.fee_fen
    elif stay.settlement in ("offline_booth", "offline_unpaid"):
        due = stay.fee_fen or 0
    else:
        raise AppError(409, "stay_already_settled", "this stay's fee has already been settled")
    if due == 0:
        raise AppError(409, "nothing_to_pay", "nothing is due for this stay")
    return due


async def record_payment(
    conn: asyncpg.Connection,
    principal: Principal,
    code: str,
    request: NewBoothPayment,
    *,
    now: datetime,
    command_ttl: timedelta,
) -> tuple[BoothPayment, BoothEffect]:
    """Records a booth payment in the caller's transaction; the effect is applied after commit."""
    car_park = await _own_car_park(conn, principal, code)
    held: payments_repo.HeldExit | None = None
    # Locked as an operator deciding a capture locks it: its exception, the capture, then the
    # stay (`billing.captures`). The other way round, a booth payment and an operator acting on
    # the same capture each waited for what the other held (a deadlock, one of them a 500).
    if request.capture_id is not None:
        await captures.lock_for_decision(conn, request.capture_id, car_park["id"])
        held = await payments_repo.held_exit(conn, request.capture_id)
        if held is None or held.car_park_id != car_park["id"]:
            raise NotFound("capture")
        if held.outcome not in _HELD_WITH_FEE or held.session_id is None:
            raise AppError(409, "not_held_for_a_fee", "this exit was not held for a fee")
        session_id = held.session_id
    else:
        assert request.session_id is not None  # the schema asks for one of the two
        session_id = request.session_id
    # The stay's exit capture (its exception awaits the booth) is known from the stay only:
    # read unlocked, locked before the stay, and the same once the stay is locked.
    seen = await repo.stay_exit_capture(conn, car_park["id"], session_id)
    if seen is not None and seen != request.capture_id:
        await captures.lock_for_decision(conn, seen, car_park["id"])
    stay = await repo.stay_for_update(conn, car_park["id"], session_id)
    if stay is None:
        raise NotFound("stay")
    if stay.exit_capture_id != seen:
        raise AppError(
            409, "stay_changed", "the stay's exit was recorded meanwhile: look it up again"
        )
    due = await _due(conn, stay, now)
    if request.amount_fen != due:
        raise AppError(
            409,
            "amount_mismatch",
            f"the stay's fee is {format_fen(due)}",
            details={"fee_fen": due},
        )
    was_open = stay.status == "open"
    try:
        # A savepoint: the unique constraints answer a race as a 409, not a failed request.
        async with conn.transaction():
            row = await repo.insert_payment(
                conn,
                car_park_id=car_park["id"],
                session_id=stay.id,
                capture=(held.capture_id, held.captured_at) if held else None,
                method=request.method,
                amount_fen=due,
                recorded_by=principal.actor,
            )
            if not await repo.close_paid_at_booth(
                conn,
                stay.id,
                exited_at=now,
                exit_capture_id=held.capture_id if held else None,
                fee_fen=due,
            ):
                raise AppError(409, "stay_already_settled", "this stay's fee has been settled")
            await ledger.post(
                conn,
                "booth_payment",
                [
                    (ledger.booth_clearing(request.method, car_park["id"]), due),
                    (ledger.revenue(car_park["id"]), -due),
                ],
                session_id=stay.id,
            )
    except asyncpg.UniqueViolationError as exc:
        raise AppError(409, "fee_already_taken", "this stay's fee has already been taken") from exc
    exception_id = (
        await repo.resolve_stay_exceptions(conn, stay.exit_capture_id, principal.actor)
        if stay.exit_capture_id is not None
        else None
    )
    effect = BoothEffect(car_park["id"], occupancy_delta=-1 if was_open and stay.counted_in else 0)
    if held is not None and was_open:
        command = Command(
            capture_id=held.capture_id,
            action="open",
            display=[stay.plate, _PAID_DISPLAY],
            issued_at=now,
            expires_at=now + command_ttl,
        )
        # A redelivery of the held capture gets the open command, not the hold.
        await lanes_repo.store_command(
            conn,
            held.capture_id,
            command.model_dump(mode="json", exclude_none=True),
            "paid_at_booth",
        )
        target = await payments_service.capture_to_open(conn, held)
        if target is None:
            # Another car has been captured at the gate since: the paid car is not the one at
            # the barrier, and an open would let out the one that is.
            log.warning(
                "booth.gate_open_skipped", lot=held.lot, gate=held.gate, why="newer_capture"
            )
        else:
            effect = BoothEffect(
                car_park["id"],
                GateAddress(held.lot, held.gate),
                command.model_copy(update={"capture_id": target}),
                effect.occupancy_delta,
            )
    await audit.record(
        conn,
        principal.actor,
        "booth_payment.recorded",
        f"booth_payment:{row['id']}",
        {
            "car_park": code,
            "session_id": stay.id,
            "capture_id": str(held.capture_id) if held else None,
            "method": request.method,
            "amount_fen": due,
            "exception_id": exception_id,
        },
    )
    payment = BoothPayment(**dict(row), car_park=code, gate_opened=effect.command is not None)
    return payment, effect


async def apply(runtime: Runtime, effect: BoothEffect) -> None:
    """After commit. Occupancy first: a publish that fails must not lose the counted change.
    The open goes through the one signer, bound to the held capture's gate: the agent acts on
    nothing else."""
    if effect.occupancy_delta:
        await runtime.occupancy.adjust(effect.car_park_id, effect.occupancy_delta)
    if effect.address is not None and effect.command is not None:
        await publish_command(runtime.mqtt, runtime.settings, effect.address, effect.command)
        log.info("booth.gate_opened", lot=effect.address.lot, gate=effect.address.gate)


async def list_clock_skews(
    conn: asyncpg.Connection, principal: Principal, *, car_park: str | None, limit: int
) -> list[ClockSkew]:
    car_park_id = (await _own_car_park(conn, principal, car_park))["id"] if car_park else None
    assert principal.operator_id is not None
    rows = await repo.clock_skews(conn, principal.operator_id, car_park_id=car_park_id, limit=limit)
    return [ClockSkew(**dict(r)) for r in rows]

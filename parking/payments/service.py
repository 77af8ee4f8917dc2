"""Driver payments at the gate and the provider's notifications.

A held car's QR code leads here: the phone asks for the amount (the stay's fee now plus any
debts), starts a provider payment and is sent to the provider's page. The provider's signed
notification (or, when it is lost, an order query) books the payment; the held stay closes and
the outbox worker publishes the gate's open command (`release_gate`).

Starting a payment spans two units of work on purpose: the payment row commits before the
provider is called (a side effect after commit), and its pay URL is stored after.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg

from billing import agreements, dead_letters, debts, fees, payments, settlement
from billing.providers import (
    InvalidNotification,
    MalformedNotification,
    PaymentProvider,
    ProviderRejected,
    ProviderUnavailable,
    ServiceStateChange,
)
from billing.tariff import PricedSegment
from gate_controller.protocol import Command, GateAddress
from parking.errors import AppError, NotFound
from parking.gates.commands import publish_command
from parking.lanes import repository as lanes_repo
from parking.lanes.rules import priced_color
from parking.logging import get_logger, mask_plate
from parking.messages import message_style
from parking.payments import repository as repo
from parking.payments.schemas import (
    GatePayment,
    GatePaymentPage,
    PageDebt,
    PageState,
    Quote,
    QuoteSegment,
)
from parking.ratelimit import hit

if TYPE_CHECKING:  # the runtime wires this module's release_gate into the outbox worker
    from parking.runtime import Runtime

log = get_logger(__name__)

# Exits the driver may pay for at the gate: a known stay with a fee, not let out on pay-later.
_PAYABLE_OUTCOMES = frozenset(
    {
        "held_unbound",
        "held_no_agreement",
        "held_over_limit",
        "held_arrears",
        "held_uncertain",
        "held_no_entry_fee",
    }
)
# A held exit's outcome once the hold is lifted (parking.lanes.repository.store_command).
_LIFTED = frozenset({"paid_at_gate", "paid_at_booth", "opened_by_operator"})
# Holds whose vehicle rests on a read that is not certain (or on one read): nobody's debts are
# collected through them.
_NOBODYS = frozenset({"held_uncertain", "held_no_entry_fee"})


class ProviderDown(AppError):
    def __init__(self) -> None:
        super().__init__(503, "payment_provider_unavailable", "try again in a moment")


class QrExpired(AppError):
    def __init__(self) -> None:
        super().__init__(
            410,
            "qr_expired",
            "二维码已过期，请在出口重新扫码 / this QR code has expired: scan the one at the exit",
        )


@dataclasses.dataclass(frozen=True, slots=True)
class _Due:
    held: repo.HeldExit
    priced: fees.StayFee
    owed: list[debts.Debt]
    account_id: int | None


def _expired(held: repo.HeldExit, ttl_s: int, now: datetime) -> bool:
    return held.received_at is not None and now - held.received_at > timedelta(seconds=ttl_s)


async def _payable(conn: asyncpg.Connection, capture_id: UUID, qr_ttl_s: int) -> _Due:
    """What a held exit owes now, for a payment not yet started: 404 for no held exit, 409
    for a stay already settled, 410 for a QR code scanned after PARKING_GATE_QR_TTL_S."""
    held = await repo.held_exit(conn, capture_id)
    if held is None or held.outcome not in _PAYABLE_OUTCOMES or held.plate is None:
        raise NotFound("gate_payment")
    if held.session_status != "open" or held.entered_at is None:
        raise AppError(409, "stay_already_closed", "this stay has already been settled")
    now = datetime.now(UTC)
    if _expired(held, qr_ttl_s, now):
        raise QrExpired()
    holder = (
        None
        if held.outcome in _NOBODYS or held.plate_color is None
        else await repo.account_for_vehicle(conn, held.plate, held.plate_color)
    )
    # Debts are the holder's, shown and collected only when both ends surely read the vehicle:
    # on a doubtful read the car at the barrier may be a stranger's, who would be shown the
    # holder's debts (dates and amounts) and asked to pay them.
    account_id = holder if held.exit_certain and held.entry_certain else None
    terms = (
        await lanes_repo.stay_terms(conn, held.session_id)
        if held.session_id
        else lanes_repo.StayTerms()
    )
    priced = fees.stay_fee(
        await fees.tariff_versions(conn, held.car_park_id),
        entered_at=held.entered_at,
        at=now,
        # As the lane priced the hold (parking.lanes.rules.priced_color).
        plate_color=priced_color(
            held.plate,
            held.plate_color,
            vouched=holder is not None or bool(held.entry_certain),
        ),
        fixed_fee_fen=held.fixed_fee_fen,
        rights=terms.rights,
        validation=terms.validation,
    )
    if priced is None:
        raise AppError(409, "no_tariff", "the car park has no tariff; ask the attendant")
    owed = await debts.open_debts(conn, account_id) if account_id is not None else []
    return _Due(held, priced, owed, account_id)


def _view(held: repo.HeldExit, payment: payments.Payment) -> GatePayment:
    return GatePayment(
        capture_id=held.capture_id,
        car_park=held.car_park_name,
        status=payment.status,
        stay_fee_fen=payment.stay_fee_fen,
        debt_fen=payment.debt_fen,
        amount_fen=payment.amount_fen,
        pay_url=payment.pay_url,
        gate_open=held.outcome not in _PAYABLE_OUTCOMES,
    )


async def start_gate_payment(runtime: Runtime, capture_id: UUID) -> GatePayment:
    """Creates the payment for a held exit, or returns the one already started."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        # Locked: two scans of the same QR code at once start one payment.
        held = await repo.held_exit(conn, capture_id, lock=True)
        payment = await payments.open_for_capture(conn, capture_id)
        if payment is None:
            if held is not None and held.session_id is not None:
                # The stay too, before it is priced: a merchant's validation (given under this
                # lock, only while no payment is pending) is then either in the price or
                # refused, never paid for by the budget and the driver both.
                await repo.lock_stay(conn, held.session_id)
            due = await _payable(conn, capture_id, runtime.settings.gate_qr_ttl_s)
            held = due.held
            if due.priced.fee_fen + sum(d.amount_fen for d in due.owed) == 0:
                raise AppError(409, "nothing_to_pay", "nothing is due; the gate opens by itself")
            payment = await payments.create(
                conn,
                provider=runtime.provider.name,
                purpose="gate",
                account_id=due.account_id,
                session_id=held.session_id,
                capture=(held.capture_id, held.captured_at),
                stay_fee_fen=due.priced.fee_fen,
                owed=due.owed,
            )
    assert held is not None
    return _view(held, await open_at_provider(runtime, payment, f"parking {held.car_park_name}"))


async def start_debt_payment(runtime: Runtime, account_id: int) -> payments.Payment:
    """A driver settles their debts in the app: one payment for exactly what is open now. An
    unpaid payment priced with the same debts is offered again; one priced with debts settled
    since (at a gate, say) is withdrawn at the provider first, never offered."""
    for _ in range(2):
        async with runtime.pool.acquire() as conn, conn.transaction():
            owed = await debts.open_debts(conn, account_id, lock=True)
            payment = await payments.open_debts_payment(conn, account_id)
            if payment is None:
                if not owed:
                    raise AppError(409, "no_debts", "there is nothing to pay")
                payment = await payments.create(
                    conn,
                    provider=runtime.provider.name,
                    purpose="debts",
                    account_id=account_id,
                    session_id=None,
                    capture=None,
                    stay_fee_fen=0,
                    owed=owed,
                )
            elif sorted(payment.debt_ids) != sorted(d.id for d in owed):
                stale = payment
                payment = None
        if payment is not None:
            return await open_at_provider(runtime, payment, "parking fees owed")
        await _withdraw(runtime, stale)
    raise ProviderDown()  # the stale order could not be withdrawn: ask again in a moment


async def _withdraw(runtime: Runtime, payment: payments.Payment) -> None:
    """Closes an unpaid payment at the provider and books what the provider says happened to
    it (paid in the meantime, it is booked like any payment; money taken twice is refunded)."""
    if payment.pay_url is None:
        async with runtime.pool.acquire() as conn:
            await payments.mark_closed(conn, payment.out_trade_no)
        return
    try:
        result = await runtime.provider.close_payment(out_trade_no=payment.out_trade_no)
    except (ProviderUnavailable, ProviderRejected) as exc:
        log.warning("payments.withdraw_failed", error=str(exc))
        raise ProviderDown() from exc
    async with runtime.pool.acquire() as conn, conn.transaction():
        await settlement.apply(conn, runtime.provider.name, result, message_style(runtime.settings))


async def open_at_provider(
    runtime: Runtime, payment: payments.Payment, description: str
) -> payments.Payment:
    """Creates the provider order of a committed payment (idempotent by its number)."""
    if payment.status != "pending" or payment.pay_url:
        return payment
    try:
        order, pay_url = await runtime.provider.create_payment(
            out_trade_no=payment.out_trade_no,
            amount_fen=payment.amount_fen,
            description=description,
        )
    except (ProviderUnavailable, ProviderRejected) as exc:
        log.warning("payments.provider_failed", error=str(exc))
        raise ProviderDown() from exc
    async with runtime.pool.acquire() as conn:
        offered = await payments.set_pay_url(conn, payment.id, pay_url, order.provider_ref)
    made = dataclasses.replace(payment, pay_url=pay_url)
    if not offered:
        # Withdrawn while its order was being made (a second tap found it priced with debts
        # no longer owed, and, with no page stored yet, closed it in our books only): the
        # order is closed at the provider too, never shown to be paid.
        await _withdraw(runtime, made)
        raise AppError(409, "payment_withdrawn", "this payment was withdrawn; start it again")
    return made


async def gate_payment_status(runtime: Runtime, capture_id: UUID) -> GatePayment:
    """The payment for a held exit; a pending one is asked about at the provider, so a lost
    notification does not keep a paying driver at the barrier."""
    async with runtime.pool.acquire() as conn:
        payment = await payments.open_for_capture(conn, capture_id)
        held = await repo.held_exit(conn, capture_id)
    if payment is None and held is not None and held.outcome in _LIFTED:
        # Lifted before any payment started (the booth, staff by hand): the page that was
        # showing the fee learns it from its poll.
        raise AppError(
            409,
            "hold_lifted",
            "the hold was lifted without this payment",
            details={"outcome": held.outcome},
        )
    if payment is None or held is None:
        raise NotFound("gate_payment")
    if payment.status == "pending":
        try:
            result = await runtime.provider.query(out_trade_no=payment.out_trade_no)
        except (ProviderUnavailable, ProviderRejected):
            result = None
        if result is not None and result.final:
            async with runtime.pool.acquire() as conn, conn.transaction():
                await settlement.apply(
                    conn, runtime.provider.name, result, message_style(runtime.settings)
                )
                payment = await payments.open_for_capture(conn, capture_id) or payment
    return _view(held, payment)


def _lifted_state(outcome: str) -> PageState:
    return "opened" if outcome == "opened_by_operator" else "settled"


async def gate_payment_page(runtime: Runtime, capture_id: UUID) -> GatePaymentPage | None:
    """What the page a held gate's QR code opens shows; None for no such held exit. A
    payment started is asked about at the provider (gate_payment_status) as the poll does."""
    try:
        status = await gate_payment_status(runtime, capture_id)
    except AppError as exc:
        if exc.code not in ("gate_payment_not_found", "hold_lifted"):
            raise
        status = None
    async with runtime.pool.acquire() as conn:
        held = await repo.held_exit(conn, capture_id)
        if held is None or held.session_id is None:
            return None
        page = GatePaymentPage(
            capture_id=capture_id,
            state="due",
            car_park=held.car_park_name,
            plate_masked=mask_plate(held.plate) if held.plate else None,
            entered_at=held.entered_at,
        )
        if status is not None:
            state: PageState = "settled"
            if status.status == "pending":
                state = "paying"
            elif status.status == "succeeded":
                state = "open" if status.gate_open else "paid"
            return page.model_copy(
                update={
                    "state": state,
                    "stay_fee_fen": status.stay_fee_fen,
                    "amount_fen": status.amount_fen,
                    "debts": [PageDebt(created_at=None, amount_fen=status.debt_fen)]
                    if status.debt_fen
                    else [],
                    "pay_url": status.pay_url,
                }
            )
        try:
            due = await _payable(conn, capture_id, runtime.settings.gate_qr_ttl_s)
        except QrExpired:
            return page.model_copy(update={"state": "expired"})
        except NotFound:
            # A hold lifted another way (booth, operator) says so; any other capture is unknown.
            if held.outcome not in _LIFTED:
                return None
            return page.model_copy(update={"state": _lifted_state(held.outcome)})
        except AppError as exc:
            state = "no_tariff" if exc.code == "no_tariff" else "settled"
            return page.model_copy(update={"state": state})
    quote = due.priced.quote
    amount = due.priced.fee_fen + sum(d.amount_fen for d in due.owed)
    return page.model_copy(
        update={
            "state": "due" if amount else "nothing_due",
            "stay_fee_fen": due.priced.fee_fen,
            "gross_fen": quote.gross_fen if quote else None,
            "discount_fen": quote.discount_fen if quote else 0,
            "segments": [_segment(s) for s in (quote.segments if quote else ())],
            "debts": [PageDebt(created_at=d.created_at, amount_fen=d.amount_fen) for d in due.owed],
            "amount_fen": amount,
        }
    )


def _segment(s: PricedSegment) -> QuoteSegment:
    return QuoteSegment(start=s.start, end=s.end, band=s.band, day_type=s.day_type, fee_fen=s.fen)


async def accept_notification(
    runtime: Runtime, provider: PaymentProvider, body: bytes, headers: Any, client: str
) -> settlement.Applied:
    """Verifies and books a provider notification; a forged one is dead-lettered (an excerpt)
    and changes nothing else. Rejected ones are throttled per client (429 beyond
    PARKING_REJECTED_NOTIFICATIONS_PER_MINUTE_PER_CLIENT, nothing stored) and from all clients
    together (PARKING_REJECTED_NOTIFICATIONS_PER_MINUTE: junk from many addresses stores a
    bounded amount); the provider's valid notifications never are."""
    try:
        result = provider.parse_notification(body, headers, now=int(datetime.now(UTC).timestamp()))
    except InvalidNotification as exc:
        settings = runtime.settings
        prefix = f"{settings.redis_key_prefix}ratelimit:rejected-notification"
        await hit(
            runtime.redis,
            f"{prefix}:{client}",
            settings.rejected_notifications_per_minute_per_client,
            60,
        )
        # Counted after the client's own limit: one client over it takes nothing from others.
        await hit(runtime.redis, f"{prefix}:all", settings.rejected_notifications_per_minute, 60)
        # Signed but not a valid event (a list, a float amount, a missing field): the provider's
        # fault, not a forgery; 400 so that it is not taken for a key problem.
        malformed = isinstance(exc, MalformedNotification)
        reason = "malformed_notification" if malformed else "invalid_notification"
        async with runtime.pool.acquire() as conn:
            await dead_letters.insert_dead_letter(
                conn,
                source="provider_notification",
                topic=provider.name,
                reason=reason,
                detail=str(exc)[:1000],
                payload=body,
            )
        log.warning("payments.notification_rejected", reason=str(exc))
        raise AppError(400 if malformed else 401, reason, str(exc)) from exc
    if isinstance(result, ServiceStateChange):
        # A plate's pay-later service changed during a stay: the lane reads it at the exit.
        async with runtime.pool.acquire() as conn:
            recorded = await agreements.record_service_state(
                conn,
                provider.name,
                result.plate,
                result.color,
                result.state,
                result.changed_at or datetime.now(UTC),
                about_agreement=False,
            )
        log.info("payments.service_state_changed", state=result.state, recorded=recorded)
        if result.state == "normal" and not recorded:
            await agreements.ask_if_resumed(runtime.pool, provider, result.plate, result.color)
        return settlement.Applied("service_state" if recorded else "no_change")
    async with runtime.pool.acquire() as conn, conn.transaction():
        applied = await settlement.apply(
            conn, provider.name, result, message_style(runtime.settings)
        )
    log.info("payments.notification_applied", kind=result.kind, effect=applied.effect)
    return applied


async def capture_to_open(conn: asyncpg.Connection, held: repo.HeldExit) -> UUID | None:
    """The capture a settled hold's open is for: the held one while it is still the newest its
    gate took; the newest when that is the same stay's car read again at the barrier; None when
    another car has been captured there since. That car is first in the lane now and the held
    one is not (let out by the attendant's button, or behind it): an open would lift the
    barrier for the wrong car, so none is sent (the gate agent refuses it too). The payment is
    booked all the same; the held car, if still in the lane, is captured again at the barrier
    and finds its stay settled."""
    newer = await repo.newest_after(conn, held.capture_id)
    if newer is None:
        return held.capture_id
    if held.session_id is not None and newer.session_id == held.session_id:
        return newer.capture_id
    return None


async def release_gate(runtime: Runtime, payment_id: int) -> None:
    """Opens the barrier for a held car whose payment was booked (an outbox job), unless
    another car has been captured at its gate since (`capture_to_open`)."""
    async with runtime.pool.acquire() as conn:
        capture_id = await repo.payment_for_release(conn, payment_id)
        held = await repo.held_exit(conn, capture_id) if capture_id else None
        target = await capture_to_open(conn, held) if held else None
    if held is None:
        return
    now = datetime.now(UTC)
    command = Command(
        capture_id=held.capture_id,
        action="open",
        display=[held.plate or "", "已缴费 一路顺风"],
        fee_fen=None,
        payment_qr_url=None,
        issued_at=now,
        expires_at=now + timedelta(seconds=runtime.settings.command_ttl_s),
    )
    async with runtime.pool.acquire() as conn:
        # Also when no open is sent: the hold is lifted by the payment, and a redelivery of the
        # held capture must not hold the car again.
        await lanes_repo.store_command(
            conn,
            held.capture_id,
            command.model_dump(mode="json", exclude_none=True),
            "paid_at_gate",
        )
    address = GateAddress(held.lot, held.gate)
    if target is not None:
        await publish_command(
            runtime.mqtt,
            runtime.settings,
            address,
            command.model_copy(update={"capture_id": target}),
        )
    if held.counted_in:
        await runtime.occupancy.adjust(held.car_park_id, -1)
    if target is None:
        log.warning("payments.gate_open_skipped", lot=held.lot, gate=held.gate, why="newer_capture")
    else:
        log.info("lane.exit_opened_after_payment", lot=held.lot, gate=held.gate)


def _stay_of_vehicle(rows: list[asyncpg.Record], color: str | None) -> asyncpg.Record:
    """The one open stay of the vehicle asked about. A plate's identity is (plate, colour):
    with stays of one plate text in several colours, a quote without a colour is a 409 asking
    for it, never a guess. A stay whose colour was not read answers for any colour."""
    if color is not None:
        exact = [r for r in rows if r["plate_color"] == color]
        rows = exact or [r for r in rows if r["plate_color"] is None]
    if not rows:
        raise NotFound("stay")
    if len(rows) > 1:
        raise AppError(
            409,
            "plate_color_required",
            "此车牌号有多辆车在场，请指明车牌颜色 / several vehicles with this plate are parked "
            "here: give the plate colour (color=blue, yellow, green, white or black)",
            {"colors": sorted({r["plate_color"] or "unknown" for r in rows})},
        )
    return rows[0]


async def quote(
    conn: asyncpg.Connection, car_park_code: str, plate: str, color: str | None = None
) -> Quote:
    row = _stay_of_vehicle(await repo.open_stays(conn, car_park_code, plate), color)
    now = datetime.now(UTC)
    terms = await lanes_repo.stay_terms(conn, row["id"])
    bound = await repo.account_for_vehicle(conn, plate, row["plate_color"]) is not None
    priced = fees.stay_fee(
        await fees.tariff_versions(conn, row["car_park_id"]),
        entered_at=row["entered_at"],
        at=now,
        # The plate type the exit would price (parking.lanes.rules.priced_color), not a
        # colour a doubtful entry read guessed.
        plate_color=priced_color(
            plate, row["plate_color"], vouched=bound or bool(row["entry_certain"])
        ),
        fixed_fee_fen=row["fixed_fee_fen"],
        rights=terms.rights,
        validation=terms.validation,
    )
    if priced is None:
        raise AppError(409, "no_tariff", "the car park has no tariff")
    parked = int((now - row["entered_at"]).total_seconds() // 60)
    q = priced.quote
    return Quote(
        car_park=row["name"],
        plate=plate,
        color=row["plate_color"],
        parked_minutes=max(0, parked),
        fee_fen=priced.fee_fen,
        gross_fen=q.gross_fen if q else priced.fee_fen,
        discount_fen=q.discount_fen if q else 0,
        right=priced.right.right.name if priced.right else None,
        right_reduction_fen=priced.right.reduction_fen if priced.right else 0,
        validation_fen=priced.validation_fen,
        segments=[_segment(s) for s in (q.segments if q else ())],
    )

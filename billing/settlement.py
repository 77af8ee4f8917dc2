"""Books what the provider says about an order, whichever way it arrived: a signed notification,
the answer to a request, or an order query. Every path ends here, and every booking is
conditional on the order still being pending, so duplicates, late and out-of-order news change
nothing the second time."""

from dataclasses import dataclass
from typing import Literal

import asyncpg
import structlog

from billing import audit, charges, notifications, payments, refunds
from billing.providers import OrderResult
from billing.tariff import format_fen

log = structlog.get_logger(__name__)

Effect = Literal[
    "charged",
    "arrears",
    "paid",
    "refunded",
    "refunding",  # a charge collected after it was cancelled: booked, its refund requested
    "closed",
    "no_change",
    "unknown_order",
    "amount_mismatch",
    "service_state",  # a plate's service state changed (not an order: parking.payments)
]


@dataclass(frozen=True, slots=True)
class Applied:
    effect: Effect
    # A payment that closed a held stay: its gate gets an open command (queued in the outbox).
    payment_id: int | None = None


async def apply(
    conn: asyncpg.Connection,
    provider_name: str,
    result: OrderResult,
    style: notifications.MessageStyle,
) -> Applied:
    """Runs in the caller's transaction; drivers' messages are written in `style`."""
    if result.kind == "charge":
        return await _charge(conn, provider_name, result, style)
    if result.kind == "payment":
        if result.status == "succeeded":
            if _another_amount(await payments.amount_of(conn, result.out_trade_no), result):
                return Applied("amount_mismatch")
            paid = await payments.mark_paid(
                conn,
                result.out_trade_no,
                result.provider_ref,
                result.finished_at,
                language=style.language,
            )
            return Applied("paid", paid.id) if paid else Applied("no_change")
        if result.status == "closed":
            await payments.mark_closed(conn, result.out_trade_no)
            return Applied("closed")
        return Applied("no_change")
    if result.status == "succeeded":
        if _another_amount(await refunds.amount_of(conn, result.out_trade_no), result):
            return Applied("amount_mismatch")
        refund = await refunds.mark_succeeded(
            conn, result.out_trade_no, result.provider_ref, result.finished_at, style=style
        )
        return Applied("refunded") if refund else Applied("no_change")
    return Applied("no_change")


def _another_amount(ours: int | None, result: OrderResult) -> bool:
    """A success for another amount than the order we made: never booked (the books would say
    what did not move, and the driver be told so); reconciliation and a person take it up."""
    if ours is None or ours == result.amount_fen:
        return False
    log.error(
        "billing.amount_mismatch",
        kind=result.kind,
        provider_ref=result.provider_ref,
        ours=ours,
        theirs=result.amount_fen,
    )
    return True


async def _charge(
    conn: asyncpg.Connection,
    provider_name: str,
    result: OrderResult,
    style: notifications.MessageStyle,
) -> Applied:
    charge = await charges.load_by_key(conn, result.out_trade_no)
    if charge is None:
        log.warning("billing.unknown_order", provider_ref=result.provider_ref)
        return Applied("unknown_order")
    if not result.final or charge.status == "succeeded":
        return Applied("no_change")
    if charge.status == "failed" and result.status != "succeeded":
        return Applied("no_change")
    if _another_amount(charge.amount_fen, result):
        return Applied("amount_mismatch")
    if result.status == "succeeded" and charge.status == "failed":
        return await _late_success(conn, provider_name, charge, result, style)
    if result.status == "succeeded" and charge.status == "cancelled":
        return await _collected_after_cancel(conn, provider_name, charge, result)
    if result.status == "succeeded":
        if not await charges.mark_succeeded(
            conn,
            charge,
            result.provider_ref,
            provider_name,
            result.finished_at,
            advanced=result.advanced,
        ):
            return Applied("no_change")
        message = notifications.exit_charged(
            charge.plate,
            charge.car_park_name,
            charge.entered_at,
            charge.exited_at,
            charge.amount_fen,
            style.tz,
            language=style.language,
            receipt_url=await notifications.receipt_link(conn, charge.charge_id, style),
        )
        await notifications.enqueue(
            conn,
            account_id=charge.account_id,
            kind="exit_charged",
            source_key=f"charge:{charge.charge_id}:succeeded",
            body=message.body,
            params=message.params,
        )
        log.info("billing.charged", charge_id=charge.charge_id, amount_fen=charge.amount_fen)
        return Applied("charged")
    return await fail_charge(conn, charge, f"{result.status}: {result.reason}", style)


async def _late_success(
    conn: asyncpg.Connection,
    provider_name: str,
    charge: charges.ChargeJob,
    result: OrderResult,
    style: notifications.MessageStyle,
) -> Applied:
    """The provider collected a charge we had marked failed (a success notification or order
    query after a decline, a refusal or a lost answer): booked once, the debt settled, the
    block lifted, and whatever the driver paid for that debt meanwhile refunded by itself."""
    twice = await charges.mark_succeeded_late(
        conn,
        charge,
        result.provider_ref,
        provider_name,
        result.finished_at,
        advanced=result.advanced,
    )
    if twice is None:
        return Applied("no_change")
    refund_id = None
    if twice:
        refund = await refunds.request_for_charge(
            conn,
            charge_id=charge.charge_id,
            amount_fen=twice,
            reason="paid twice: the debt was settled before the charge's late success",
            actor="system",
            kind="overpayment",
        )
        refund_id = refund.id
    await audit.record(
        conn,
        "system",
        "charge.late_success",
        f"charge:{charge.charge_id}",
        {
            "provider_ref": result.provider_ref,
            "amount_fen": charge.amount_fen,
            "refunded_fen": twice,
            "refund_id": refund_id,
        },
    )
    await notifications.enqueue(
        conn,
        account_id=charge.account_id,
        kind="charge_collected_late",
        source_key=f"charge:{charge.charge_id}:late_success",
        body=notifications.render(
            "charge_collected_late",
            style.language,
            plate=charge.plate,
            car_park=charge.car_park_name,
            amount=format_fen(charge.amount_fen),
            twice=notifications.twice_sentence(style.language, twice),
            receipt=notifications.receipt_sentence(
                style.language, await notifications.receipt_link(conn, charge.charge_id, style)
            ),
        ),
    )
    log.warning("billing.charge_late_success", charge_id=charge.charge_id, refunded_fen=twice)
    return Applied("charged")


async def _collected_after_cancel(
    conn: asyncpg.Connection,
    provider_name: str,
    charge: charges.ChargeJob,
    result: OrderResult,
) -> Applied:
    """The provider collected a charge we had cancelled (a dispute found it was not the
    driver's car before it was sent, yet the provider has the order): money taken is never
    lost. It is booked once, owed back to the driver, and refunded in full by itself; the
    audit log and the refund's record say why."""
    if not await charges.mark_collected_after_cancel(
        conn, charge, result.provider_ref, provider_name, result.finished_at
    ):
        return Applied("no_change")
    refund = await refunds.request_for_charge(
        conn,
        charge_id=charge.charge_id,
        amount_fen=charge.amount_fen,
        reason="collected after the charge was cancelled",
        actor="system",
        kind="overpayment",
    )
    await audit.record(
        conn,
        "system",
        "charge.collected_after_cancel",
        f"charge:{charge.charge_id}",
        {
            "provider_ref": result.provider_ref,
            "amount_fen": charge.amount_fen,
            "refund_id": refund.id,
        },
    )
    log.warning("billing.charge_collected_after_cancel", charge_id=charge.charge_id)
    return Applied("refunding")


async def fail_charge(
    conn: asyncpg.Connection,
    charge: charges.ChargeJob,
    reason: str,
    style: notifications.MessageStyle,
) -> Applied:
    """The charge finally failed: it becomes a debt and the driver is told how to pay it."""
    if not await charges.mark_failed(conn, charge, reason):
        return Applied("no_change")
    await notifications.enqueue(
        conn,
        account_id=charge.account_id,
        kind="charge_failed",
        source_key=f"charge:{charge.charge_id}:failed",
        body=notifications.render(
            "charge_failed",
            style.language,
            plate=charge.plate,
            car_park=charge.car_park_name,
            amount=format_fen(charge.amount_fen),
            receipt=notifications.receipt_sentence(
                style.language, await notifications.receipt_link(conn, charge.charge_id, style)
            ),
        ),
    )
    log.warning("billing.charge_failed", charge_id=charge.charge_id, reason=reason)
    return Applied("arrears")

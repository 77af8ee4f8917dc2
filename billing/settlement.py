"""Books what the provider says about an order, whichever way it arrived: a signed notification,
the answer to a request, or an order query. Every path ends here, and every booking is
conditional on the order still being pending, so duplicates, late and out-of-order news change
nothing the second time."""

from dataclasses import dataclass
from typing import Literal
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from billing import charges, notifications, payments, refunds
from billing.providers import OrderResult

log = structlog.get_logger(__name__)

Effect = Literal[
    "charged",
    "arrears",
    "paid",
    "refunded",
    "closed",
    "no_change",
    "unknown_order",
    "amount_mismatch",
]


@dataclass(frozen=True, slots=True)
class Applied:
    effect: Effect
    # A payment that closed a held stay: its gate gets an open command (queued in the outbox).
    payment_id: int | None = None


async def apply(
    conn: asyncpg.Connection, provider_name: str, result: OrderResult, tz: ZoneInfo
) -> Applied:
    """Runs in the caller's transaction."""
    if result.kind == "charge":
        return await _charge(conn, provider_name, result, tz)
    if result.kind == "payment":
        if result.status == "succeeded":
            expected = await payments.amount_of(conn, result.out_trade_no)
            if expected is not None and expected != result.amount_fen:
                log.error("billing.amount_mismatch", provider_ref=result.provider_ref)
                return Applied("amount_mismatch")
            paid = await payments.mark_paid(
                conn, result.out_trade_no, result.provider_ref, result.finished_at
            )
            return Applied("paid", paid.id) if paid else Applied("no_change")
        if result.status == "closed":
            await payments.mark_closed(conn, result.out_trade_no)
            return Applied("closed")
        return Applied("no_change")
    if result.status == "succeeded":
        refund = await refunds.mark_succeeded(
            conn, result.out_trade_no, result.provider_ref, result.finished_at
        )
        return Applied("refunded") if refund else Applied("no_change")
    return Applied("no_change")


async def _charge(
    conn: asyncpg.Connection, provider_name: str, result: OrderResult, tz: ZoneInfo
) -> Applied:
    charge = await charges.load_by_key(conn, result.out_trade_no)
    if charge is None:
        log.warning("billing.unknown_order", provider_ref=result.provider_ref)
        return Applied("unknown_order")
    if charge.status != "pending" or not result.final:
        return Applied("no_change")
    if result.amount_fen != charge.amount_fen:
        # Never book an amount we did not ask for; reconciliation and a person take it up.
        log.error(
            "billing.amount_mismatch",
            charge_id=charge.charge_id,
            ours=charge.amount_fen,
            theirs=result.amount_fen,
        )
        return Applied("amount_mismatch")
    if result.status == "succeeded":
        if not await charges.mark_succeeded(
            conn, charge, result.provider_ref, provider_name, result.finished_at
        ):
            return Applied("no_change")
        await notifications.enqueue(
            conn,
            account_id=charge.account_id,
            kind="exit_charged",
            source_key=f"charge:{charge.charge_id}:succeeded",
            body=notifications.exit_charged_text(
                charge.plate,
                charge.car_park_name,
                charge.entered_at,
                charge.exited_at,
                charge.amount_fen,
                tz,
            ),
        )
        log.info("billing.charged", charge_id=charge.charge_id, amount_fen=charge.amount_fen)
        return Applied("charged")
    return await fail_charge(conn, charge, f"{result.status}: {result.reason}")


async def fail_charge(conn: asyncpg.Connection, charge: charges.ChargeJob, reason: str) -> Applied:
    """The charge finally failed: it becomes a debt and the driver is told how to pay it."""
    if not await charges.mark_failed(conn, charge, reason):
        return Applied("no_change")
    await notifications.enqueue(
        conn,
        account_id=charge.account_id,
        kind="charge_failed",
        source_key=f"charge:{charge.charge_id}:failed",
        body=(
            f"{charge.plate}: the parking fee at {charge.car_park_name} could not be collected; "
            "pay it in the app to keep leaving without stopping"
        ),
    )
    log.warning("billing.charge_failed", charge_id=charge.charge_id, reason=reason)
    return Applied("arrears")

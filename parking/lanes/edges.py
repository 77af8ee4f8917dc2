"""The edges of the lane: what the exit decision does around a stay besides open, charge or hold.

- A held stay whose car left anyway (tailgating, a barrier lifted by hand without a record) is
  found when its plate enters again: its fee becomes a debt of the account the plate was bound
  to at its entry, or, with nobody to owe it, an exception for an operator. Never a silent
  `superseded`.
- Gate clocks: an offline capture's time is the gate's, which may be wrong. It is clamped
  between the stay's entry and the moment we received the capture; a gate time more than
  `gate_clock_tolerance_s` after the receipt, or before the entry, proves the clock wrong: the
  capture is flagged (`gate_clock_skews`) and the stay priced at the receipt time, the one
  moment we witnessed by which the car had certainly left.

Everything runs in the lane's transaction; nothing here publishes or touches Redis.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import asyncpg

from billing import charges, debts, fees, ledger, notifications
from billing.tariff import format_fen
from gate_controller.protocol import Capture
from parking.lanes import edges_repository as edges_repo
from parking.lanes import repository as repo
from parking.lanes.repository import GateInfo, OpenSession
from parking.lanes.rules import identity_color
from parking.logging import get_logger

log = get_logger(__name__)


async def end_missed_stay(
    conn: asyncpg.Connection,
    gate: GateInfo,
    stay: OpenSession,
    plate: str,
    at: datetime,
    versions: fees.TariffVersions,
) -> None:
    """The plate enters while its earlier stay is still open: that stay's exit was missed. A stay
    last held with a fee is owed (a debt, or an exception); any other is superseded as before,
    kept for review and never charged."""
    hold = await edges_repo.last_payable_hold(conn, stay.id)
    priced = (
        fees.stay_fee(
            versions,
            entered_at=stay.entered_at,
            at=max(hold.held_at, stay.entered_at),
            plate_color=stay.plate_color,
            fixed_fee_fen=stay.fixed_fee_fen,
            rights=stay.rights,
            validation=stay.validation,
        )
        if hold is not None
        else None
    )
    if hold is None or priced is None or priced.fee_fen == 0:
        await repo.supersede_session(conn, stay.id, at)
        return
    # Priced up to the hold: the gate showed that fee, and it is what the car owed when it left.
    fee = priced.fee_fen
    account_id = await edges_repo.account_bound_at(
        conn, plate, identity_color(plate, stay.plate_color), stay.entered_at
    )
    await edges_repo.supersede_unpaid(
        conn,
        session_id=stay.id,
        exited_at=hold.held_at,
        fee_fen=fee,
        account_id=account_id,
        settlement="debt" if account_id is not None else "unpaid_exit",
    )
    if account_id is not None:
        await ledger.post(
            conn,
            "fee_accrued",
            charges.accrual_lines(account_id, gate.car_park_id, fee),
            session_id=stay.id,
        )
        await debts.open_stay_debt(conn, account_id, stay.id, fee)
        await notifications.enqueue(
            conn,
            account_id=account_id,
            kind="unpaid_exit",
            source_key=f"session:{stay.id}:unpaid_exit",
            body=(
                f"{plate} 于{gate.car_park_name}离场时未缴费 {format_fen(fee)}，"
                "已记为欠费，请在App缴纳"
            ),
        )
        log.info("lane.unpaid_exit_debt", session_id=stay.id, fee_fen=fee)
        return
    await repo.insert_exception(
        conn,
        capture_id=hold.capture_id,
        capture_captured_at=hold.captured_at,
        car_park_id=gate.car_park_id,
        gate_id=hold.gate_id,
        reason="unpaid_exit",
        candidates=[
            {
                "plate": plate,
                "kind": "stay",
                "session_id": stay.id,
                "fee_fen": fee,
                "held_because": hold.outcome,
            }
        ],
        image=None,
    )
    log.info("lane.unpaid_exit_exception", session_id=stay.id, fee_fen=fee)


SkewKind = Literal["ahead", "behind"]


@dataclass(frozen=True, slots=True)
class GateTime:
    """The time an offline capture is taken at, and why the gate's own was not, if it was not."""

    at: datetime
    skew: SkewKind | None = None
    skew_s: int = 0


def bounded_gate_time(
    gate_time: datetime,
    received_at: datetime,
    entered_at: datetime | None,
    tolerance: timedelta,
) -> GateTime:
    """An offline capture's time, within what the server can prove: never after we received it,
    never before the stay's entry. Beyond the tolerance the gate's clock is proven wrong and
    its time says nothing: the receipt time is taken (the car had left by then)."""
    if gate_time > received_at:
        ahead = gate_time - received_at
        if ahead > tolerance:
            return GateTime(received_at, "ahead", int(ahead.total_seconds()))
        return GateTime(received_at)
    if entered_at is not None and gate_time < entered_at:
        behind = entered_at - gate_time
        if behind > tolerance:
            return GateTime(received_at, "behind", -int(behind.total_seconds()))
        return GateTime(entered_at)
    return GateTime(gate_time)


async def gate_time(
    conn: asyncpg.Connection,
    gate: GateInfo,
    capture: Capture,
    received_at: datetime,
    *,
    session_id: int | None,
    entered_at: datetime | None,
    tolerance: timedelta,
) -> datetime:
    """`bounded_gate_time` for an offline capture, flagging a wrong clock for an operator."""
    taken = bounded_gate_time(capture.captured_at, received_at, entered_at, tolerance)
    if taken.skew is not None:
        await edges_repo.insert_clock_skew(
            conn,
            capture_id=capture.capture_id,
            car_park_id=gate.car_park_id,
            gate_id=gate.gate_id,
            direction=capture.direction,
            session_id=session_id,
            gate_time=capture.captured_at,
            received_at=received_at,
            kind=taken.skew,
            skew_s=taken.skew_s,
            taken_at=taken.at,
        )
        log.warning("lane.gate_clock_skew", gate_id=gate.gate_id, kind=taken.skew, s=taken.skew_s)
    return taken.at

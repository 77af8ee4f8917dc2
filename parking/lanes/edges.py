"""The edges of the lane: what the exit decision does around a stay besides open, charge or hold.

- A held stay whose car left anyway (tailgating, a barrier lifted by hand without a record) is
  found when its plate enters again: its fee becomes a debt of the account the vehicle was
  bound to from the stay's entry to its hold, when both ends were read with proven certainty
  (a debt is a charge without a person: DESIGN.md, "The exit decision"); otherwise an
  exception for an operator. Never a silent `superseded`.
- Gate clocks: an offline capture's time is the gate's, which may be wrong. What the server
  can prove bounds it: not before the stay's entry nor the gate's last live capture before it
  (a lower seq), not after the gate's next live capture (a higher seq) nor the moment we
  received it. Within the tolerance it is clamped to those bounds; beyond, the clock is proven
  wrong (`gate_clock_skews`, for an operator): the latest provable moment is taken (an entry's
  shortest stay; an exit by which the car had certainly left) and an exit's charge waits for
  an operator when the earliest provable moment would cost less (`rules.exit_rule`).

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
from parking.merchants import service as merchants

log = get_logger(__name__)


async def end_missed_stay(
    conn: asyncpg.Connection,
    gate: GateInfo,
    stay: OpenSession,
    plate: str,
    at: datetime,
    versions: fees.TariffVersions,
    entry_proven: bool,
) -> None:
    """The plate enters while its earlier stay is still open: that stay's exit was missed. A stay
    last held with a fee is owed (a debt, or an exception); any other is superseded as before,
    kept for review and never charged. `entry_proven`: this entry's read could rest a charge;
    it is the only sign the held car left unseen."""
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
    if priced is not None:
        # Ended at the hold's price: a validation is worth what it took off that (nothing, if
        # it was committed after this stay was read: `merchants.settle` reads it afresh).
        await merchants.settle(conn, stay.id, priced.validation_fen, "system:lane")
    if hold is None or priced is None or priced.fee_fen == 0:
        await repo.supersede_session(conn, stay.id, at)
        return
    # Priced up to the hold: the gate showed that fee, and it is what the car owed when it left.
    fee = priced.fee_fen
    # Owed without a person only on reads a charge could rest on: a stranger read as this plate
    # at a gate (even twice, the same way), or entering read as it, must not become its owner's
    # debt. Nor an entry from before the hold (an offline gate's, uploaded late): the car held
    # then had not left by it, so it is no sign the car left since.
    account_id = (
        await edges_repo.account_bound_throughout(
            conn, plate, identity_color(plate, stay.plate_color), stay.entered_at, hold.held_at
        )
        if stay.entry_proven and hold.read_proven and entry_proven and at >= hold.held_at
        else None
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
                "reads_proven": stay.entry_proven and hold.read_proven,
            }
        ],
        image=None,
    )
    log.info("lane.unpaid_exit_exception", session_id=stay.id, fee_fen=fee)


SkewKind = Literal["ahead", "behind"]


@dataclass(frozen=True, slots=True)
class GateTime:
    """The time an offline capture is taken at, and why the gate's own was not, if it was not.
    `earliest`: with a clock proven wrong, the earliest moment the capture can have happened
    (`at` is the latest)."""

    at: datetime
    skew: SkewKind | None = None
    skew_s: int = 0
    earliest: datetime | None = None


def bounded_gate_time(
    gate_time: datetime,
    received_at: datetime,
    tolerance: timedelta,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> GateTime:
    """An offline capture's time, within what the server can prove: between `not_before` (the
    stay's entry, the gate's last live capture before it) and `not_after` (its next live
    capture) and never after we received it. Beyond the tolerance the gate's clock is proven
    wrong and its time says nothing: the latest provable moment is taken, with the earliest
    beside it."""
    latest = received_at if not_after is None else min(received_at, not_after)
    earliest = None if not_before is None else min(not_before, latest)
    if gate_time > latest:
        ahead = gate_time - latest
        if ahead > tolerance:
            return GateTime(latest, "ahead", int(ahead.total_seconds()), earliest)
        return GateTime(latest)
    if earliest is not None and gate_time < earliest:
        behind = earliest - gate_time
        if behind > tolerance:
            return GateTime(latest, "behind", -int(behind.total_seconds()), earliest)
        return GateTime(earliest)
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
    ends_by: datetime | None = None,
) -> GateTime:
    """`bounded_gate_time` for an offline capture, bounded by the stay's entry (and by
    `ends_by`, the vehicle's re-entry, for a stay that ended there) and the gate's live
    captures around it, flagging a wrong clock for an operator."""
    before, after = await edges_repo.live_neighbours(conn, gate.gate_id, capture.seq)
    floors = [t for t in (entered_at, before) if t is not None]
    ceilings = [t for t in (ends_by, after) if t is not None]
    taken = bounded_gate_time(
        capture.captured_at,
        received_at,
        tolerance,
        not_before=max(floors) if floors else None,
        not_after=min(ceilings) if ceilings else None,
    )
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
    return taken

"""The exit (and entry) decision for one capture. See ../shared/DESIGN.md, "The exit decision".

`decide` runs inside the caller's transaction and returns what to tell the gate and what to do
after commit; it never publishes or touches Redis itself.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import asyncpg

from billing import charges
from billing.tariff import format_fen
from gate_controller.protocol import Action, Capture, Command
from parking.lanes import repository as repo
from parking.lanes.repository import GateInfo, OpenSession
from parking.settings import Settings
from plate_recognition.grammar import normalise

Outcome = Literal[
    "entered",
    "entered_superseding",
    "duplicate_read",
    "exited_free",
    "exited_pay_later",
    "held_unbound",
    "held_no_agreement",
    "held_over_limit",
    "held_arrears",
    "held_no_entry",
    "held_unreadable",
    "held_no_tariff",
]


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    command: Command
    session_id: int | None = None
    occupancy_delta: int = 0
    charge_id: int | None = None
    fee_fen: int | None = None


class LaneService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.duplicate_window = timedelta(seconds=settings.duplicate_read_window_s)
        self.command_ttl = timedelta(seconds=settings.command_ttl_s)

    async def decide(
        self, conn: asyncpg.Connection, gate: GateInfo, capture: Capture, now: datetime
    ) -> Decision:
        read = capture.camera_read
        plate = normalise(read.plate) if read else None
        if plate is None:
            # Issue #3 adds server-side OCR; until a plate is known a person decides.
            return self._hold(capture, now, "held_unreadable", ["未识别车牌", "请联系管理员"])
        color = read.color if read else None
        # Offline uploads happened earlier, when the gate decided alone; live ones happen now.
        at = capture.captured_at if capture.offline else now
        if capture.direction == "in":
            return await self._entry(conn, gate, capture, plate, color, at, now)
        return await self._exit(conn, gate, capture, plate, color, at, now)

    async def _entry(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        plate: str,
        color: str | None,
        at: datetime,
        now: datetime,
    ) -> Decision:
        inside = await repo.open_session_for_update(conn, gate.car_park_id, plate)
        outcome: Outcome = "entered"
        delta = 1
        if inside is not None:
            if at - inside.entered_at < self.duplicate_window:
                # The same car read twice at the barrier.
                return self._open(capture, now, "duplicate_read", [plate], inside.id)
            await repo.supersede_session(conn, inside.id, at)
            outcome, delta = "entered_superseding", 0
        session_id = await repo.open_session(
            conn,
            car_park_id=gate.car_park_id,
            plate=plate,
            plate_color=color,
            entered_at=at,
            entry_capture_id=capture.capture_id,
        )
        return self._open(capture, now, outcome, [plate, "欢迎光临"], session_id, delta)

    async def _exit(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        plate: str,
        color: str | None,
        at: datetime,
        now: datetime,
    ) -> Decision:
        session = await repo.open_session_for_update(conn, gate.car_park_id, plate)
        fee_override: int | None = None
        if session is None:
            recent = await repo.recent_exit(
                conn, gate.car_park_id, plate, at - self.duplicate_window
            )
            if recent is not None:
                return self._open(capture, now, "duplicate_read", [plate], recent)
            if gate.no_entry_policy != "fixed_fee":
                return self._hold(
                    capture, now, "held_no_entry", [plate, "无入场记录", "请联系管理员"]
                )
            session_id = await repo.open_session(
                conn,
                car_park_id=gate.car_park_id,
                plate=plate,
                plate_color=color,
                entered_at=at,
                entry_capture_id=None,
            )
            session = OpenSession(session_id, at)
            fee_override = gate.no_entry_fee_fen

        if fee_override is not None:
            fee = fee_override
        else:
            tariff = await repo.tariff_at(conn, gate.car_park_id, session.entered_at)
            if tariff is None:
                return self._hold(
                    capture, now, "held_no_tariff", [plate, "请联系管理员"], session.id
                )
            fee = tariff.fee(session.entered_at, at)

        if fee == 0:
            await self._close(conn, session, capture, at, 0, None, "free")
            return self._open(capture, now, "exited_free", [plate, "一路顺风"], session.id, -1, 0)

        pay_later = await repo.pay_later_for_plate(conn, plate)
        hold_reason = _hold_reason(pay_later, fee)
        if hold_reason is not None or pay_later is None or pay_later.agreement_id is None:
            return self._hold(
                capture,
                now,
                hold_reason or "held_unbound",
                [plate, f"应缴 {format_fen(fee)}", "请扫码缴费"],
                session.id,
                fee,
            )
        await self._close(conn, session, capture, at, fee, pay_later.account_id, "pay_later")
        charge_id = await charges.queue_charge(
            conn,
            session_id=session.id,
            account_id=pay_later.account_id,
            agreement_id=pay_later.agreement_id,
            car_park_id=gate.car_park_id,
            amount_fen=fee,
        )
        return Decision(
            "exited_pay_later",
            self._command(capture, now, "open", [plate, f"{format_fen(fee)} 离场后扣款"], fee),
            session.id,
            -1,
            charge_id,
            fee,
        )

    @staticmethod
    async def _close(
        conn: asyncpg.Connection,
        session: OpenSession,
        capture: Capture,
        at: datetime,
        fee: int,
        account_id: int | None,
        settlement: str,
    ) -> None:
        await repo.close_session(
            conn,
            session_id=session.id,
            exited_at=at,
            exit_capture_id=capture.capture_id,
            fee_fen=fee,
            account_id=account_id,
            settlement=settlement,
        )

    def _command(
        self,
        capture: Capture,
        now: datetime,
        action: Action,
        display: list[str],
        fee: int | None = None,
        qr: str | None = None,
    ) -> Command:
        return Command(
            capture_id=capture.capture_id,
            action=action,
            display=display,
            fee_fen=fee,
            payment_qr_url=qr,
            issued_at=now,
            expires_at=now + self.command_ttl,
        )

    def _open(
        self,
        capture: Capture,
        now: datetime,
        outcome: Outcome,
        display: list[str],
        session_id: int | None,
        delta: int = 0,
        fee: int | None = None,
    ) -> Decision:
        command = self._command(capture, now, "open", display, fee)
        return Decision(outcome, command, session_id, delta, None, fee)

    def _hold(
        self,
        capture: Capture,
        now: datetime,
        outcome: Outcome,
        display: list[str],
        session_id: int | None = None,
        fee: int | None = None,
    ) -> Decision:
        qr = (
            f"{self.settings.payment_qr_base_url}/{session_id}"
            if session_id is not None and fee
            else None
        )
        command = self._command(capture, now, "hold", display, fee, qr)
        return Decision(outcome, command, session_id, 0, None, fee)


def _hold_reason(pay_later: repo.PayLater | None, fee: int) -> Outcome | None:
    """Why a stay with a fee cannot leave on pay-later, or None when it can."""
    if pay_later is None:
        return "held_unbound"
    if pay_later.agreement_id is None or pay_later.per_session_limit_fen is None:
        return "held_no_agreement"
    if pay_later.blocked_for_arrears:
        return "held_arrears"
    if fee > pay_later.per_session_limit_fen:
        return "held_over_limit"
    return None

"""The exit (and entry) decision for one capture. See ../shared/DESIGN.md, "The exit decision".

`decide` runs inside the caller's transaction and returns what to tell the gate and what to do
after commit; it never publishes or touches Redis itself. Charging the wrong person is the
worst failure: a plate that is not certain is matched only uniquely and with a margin against
the cars parked in this car park, and anything less goes to an operator while the gate holds.
"""

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg

from billing import charges, fees
from billing.tariff import format_fen
from gate_controller.protocol import Action, Capture, Command
from parking.lanes import edges
from parking.lanes import edges_repository as edges_repo
from parking.lanes import repository as repo
from parking.lanes.reading import PlateReading
from parking.lanes.repository import GateInfo, OpenSession
from parking.lanes.rules import Outcome, exit_rule
from parking.settings import Settings
from plate_recognition.matching import MatchResult, match

_TARIFF_CACHE_S = 60.0
MatchStatus = Literal["exact", "fuzzy", "ambiguous", "no_match"]
ExceptionReason = Literal["unreadable", "ambiguous", "no_entry", "offline_exit"]


_EXCEPTION_HOLD: dict[ExceptionReason, tuple[Outcome, "MatchStatus | None", str]] = {
    "unreadable": ("held_unreadable", None, "车牌待确认"),
    "ambiguous": ("held_ambiguous", "ambiguous", "车牌待确认"),
    "no_entry": ("held_no_entry", "no_match", "无入场记录"),
}


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    command: Command
    plate: str | None = None
    session_id: int | None = None
    occupancy_delta: int = 0
    charge_id: int | None = None
    fee_fen: int | None = None
    match_status: MatchStatus | None = None


@dataclass(frozen=True, slots=True)
class _Exit:
    """The stay an exit read was resolved to, or why it could not be."""

    plate: str | None
    session: OpenSession | None
    match_status: MatchStatus | None
    duplicate_of: int | None = None
    ranked: tuple[tuple[str, float], ...] = ()


class LaneService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.duplicate_window = timedelta(seconds=settings.duplicate_read_window_s)
        self.command_ttl = timedelta(seconds=settings.command_ttl_s)
        self.clock_tolerance = timedelta(seconds=settings.gate_clock_tolerance_s)
        # Tariffs change rarely and are versioned by date: read once, dropped when the database
        # announces a change (LaneWorker listens), and read again after a minute at the latest.
        self._tariffs: dict[int, tuple[float, fees.TariffVersions]] = {}

    def cache_tariffs(self, versions: dict[int, fees.TariffVersions]) -> None:
        """Every car park's tariffs, read in one query when the lane starts."""
        loaded = time.monotonic()
        self._tariffs = {car_park_id: (loaded, v) for car_park_id, v in versions.items()}

    def forget_tariffs(self, car_park_id: int | None = None) -> None:
        """Drops one car park's cached tariffs (all of them with None): read again at its next
        exit."""
        if car_park_id is None:
            self._tariffs.clear()
        else:
            self._tariffs.pop(car_park_id, None)

    def tariffs_cached(self, car_park_id: int) -> bool:
        return car_park_id in self._tariffs

    async def _tariff_versions(
        self, conn: asyncpg.Connection, car_park_id: int
    ) -> fees.TariffVersions:
        cached = self._tariffs.get(car_park_id)
        if cached is None or time.monotonic() - cached[0] > _TARIFF_CACHE_S:
            cached = (time.monotonic(), await fees.tariff_versions(conn, car_park_id))
            self._tariffs[car_park_id] = cached
        return cached[1]

    async def decide(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        reading: PlateReading,
        now: datetime,
    ) -> Decision:
        # Offline uploads happened earlier, when the gate decided alone; live ones happen now.
        # Never later than now: a gate clock ahead proves nothing (see edges.bounded_gate_time).
        at = min(capture.captured_at, now) if capture.offline else now
        if capture.direction == "in":
            return await self._entry(conn, gate, capture, reading, at, now)
        return await self._exit(conn, gate, capture, reading, at, now)

    def _certain_read(self, reading: PlateReading) -> bool:
        """A plate a stay may be opened at the exit for: an operator's, or a confident camera
        read."""
        if reading.source == "operator":
            return True
        best = reading.best
        return (
            reading.source == "camera"
            and best is not None
            and best.score >= self.settings.camera_min_confidence
        )

    def _confident(self, reading: PlateReading) -> str | None:
        best = reading.best
        return best.plate if best and best.score >= self.settings.plate_min_confidence else None

    async def _entry(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        reading: PlateReading,
        at: datetime,
        now: datetime,
    ) -> Decision:
        plate = self._confident(reading)
        if plate is None:
            return await self._exception(conn, gate, capture, reading, now, "unreadable")
        if capture.offline:
            at = await self._gate_time(conn, gate, capture, now, None)
        color = capture.camera_read.color if capture.camera_read else None
        inside = await repo.open_session_for_update(conn, gate.car_park_id, plate)
        outcome: Outcome = "entered"
        delta = 1
        if inside is not None:
            if at - inside.entered_at < self.duplicate_window:
                # The same car read twice at the barrier.
                return self._open(capture, now, "duplicate_read", plate, inside.id)
            versions = await self._tariff_versions(conn, gate.car_park_id)
            await edges.end_missed_stay(conn, gate, inside, plate, at, versions)
            outcome, delta = "entered_superseding", 0
        stay = await repo.open_session(
            conn,
            car_park_id=gate.car_park_id,
            plate=plate,
            plate_color=color,
            entered_at=at,
            entry_capture_id=capture.capture_id,
        )
        debt = stay.pay_later.debt_fen if stay.pay_later else 0
        return self._open(capture, now, outcome, plate, stay.id, delta, welcome=True, debt=debt)

    async def _resolve_exit(
        self, conn: asyncpg.Connection, gate: GateInfo, reading: PlateReading, at: datetime
    ) -> _Exit:
        if not reading.candidates:
            return _Exit(None, None, None)
        plate = self._confident(reading)
        if plate is not None:
            session = await repo.open_session_for_update(conn, gate.car_park_id, plate)
            if session is not None:
                return _Exit(plate, session, "exact")
        # Cars that just left: a second read of one of them is the same car, never a stay of a
        # parked look-alike. Read once, for the exact check and for matching.
        left = await repo.recent_exits(conn, gate.car_park_id, at - self.duplicate_window)
        if plate is not None:
            if plate in left:
                return _Exit(plate, None, "exact", duplicate_of=left[plate])
            if reading.source in ("camera", "operator"):
                # A confident camera read is what the car shows, and an operator's plate is what
                # a person saw; never bend either onto a look-alike parked plate. No stay for
                # it: the no-entry policy decides.
                return _Exit(plate, None, "no_match")
        parked = await repo.open_plates(conn, gate.car_park_id)
        result: MatchResult = match(reading.candidates, [*parked, *left], raw=reading.raw)
        if result.plate in left:
            return _Exit(result.plate, None, result.status, duplicate_of=left[result.plate])
        if result.plate is not None:
            session = await repo.open_session_for_update(conn, gate.car_park_id, result.plate)
            if session is not None:
                return _Exit(result.plate, session, result.status, ranked=result.ranked)
        status: MatchStatus = "ambiguous" if result.status == "ambiguous" else "no_match"
        return _Exit(plate, None, status, ranked=result.ranked)

    async def _exit(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        reading: PlateReading,
        at: datetime,
        now: datetime,
    ) -> Decision:
        if capture.offline and (
            paid := await self._paid_at_booth(conn, gate, capture, reading, now)
        ):
            return paid
        resolved = await self._resolve_exit(conn, gate, reading, at)
        if resolved.duplicate_of is not None:
            return self._open(capture, now, "duplicate_read", resolved.plate, resolved.duplicate_of)
        if resolved.match_status == "ambiguous":
            return await self._exception(
                conn, gate, capture, reading, now, "ambiguous", resolved.ranked
            )
        plate, session = resolved.plate, resolved.session
        if plate is None:
            return await self._exception(
                conn, gate, capture, reading, now, "unreadable", resolved.ranked
            )

        occupancy_delta = -1
        if session is None:
            if gate.no_entry_policy != "fixed_fee" or not self._certain_read(reading):
                # Charging a fixed fee to whoever has this plate bound needs a read we are sure
                # of; anything less is for a person.
                return await self._exception(
                    conn, gate, capture, reading, now, "no_entry", resolved.ranked
                )
            session = await repo.open_session(
                conn,
                car_park_id=gate.car_park_id,
                plate=plate,
                plate_color=capture.camera_read.color if capture.camera_read else None,
                entered_at=at,
                entry_capture_id=None,
                fixed_fee_fen=gate.no_entry_fee_fen,
            )
            occupancy_delta = 0  # never counted in: it was opened at the exit

        if capture.offline:
            at = await self._gate_time(conn, gate, capture, now, session)
        rule = exit_rule(
            await self._tariff_versions(conn, gate.car_park_id),
            entered_at=session.entered_at,
            at=at,
            plate_color=session.plate_color,
            fixed_fee_fen=session.fixed_fee_fen,
            pay_later_state=session.pay_later,
        )
        if rule is None:
            return self._hold(capture, now, "held_no_tariff", plate, ["请联系管理员"], session.id)
        fee = rule.fee_fen
        matched = resolved.match_status
        debt = rule.debt_fen

        if rule.outcome == "exited_free":
            await self._close(conn, session, capture, at, 0, None, "free")
            return self._open(
                capture,
                now,
                "exited_free",
                plate,
                session.id,
                occupancy_delta,
                fee=0,
                match_status=matched,
                debt=debt,
            )

        if capture.offline and capture.offline_action == "hold":
            return await self._sent_to_booth(
                conn, gate, capture, session, plate, at, now, fee, rule.outcome, occupancy_delta
            )
        if rule.charge_to is None and capture.offline and capture.offline_action == "open":
            return await self._left_unpaid_offline(
                conn, gate, capture, session, plate, at, now, fee, rule.outcome, occupancy_delta
            )
        if rule.charge_to is None:
            # The debt is collected with the stay's fee through the same QR code.
            due = [f"应缴 {format_fen(rule.due_fen)}"]
            if debt:
                due.append(f"含欠费 {format_fen(debt)}")
            return self._hold(
                capture,
                now,
                rule.outcome,
                plate,
                [*due, "请扫码缴费"],
                session.id,
                rule.due_fen,
                matched,
            )
        account_id, agreement_id = rule.charge_to
        await self._close(conn, session, capture, at, fee, account_id, "pay_later")
        charge_id = await charges.queue_charge(
            conn,
            session_id=session.id,
            account_id=account_id,
            agreement_id=agreement_id,
            car_park_id=gate.car_park_id,
            amount_fen=fee,
        )
        command = self._command(capture, now, "open", [plate, f"{format_fen(fee)} 离场后扣款"], fee)
        return Decision(
            "exited_pay_later", command, plate, session.id, occupancy_delta, charge_id, fee, matched
        )

    async def _left_unpaid_offline(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        session: OpenSession,
        plate: str,
        at: datetime,
        now: datetime,
        fee: int,
        why: Outcome,
        occupancy_delta: int,
    ) -> Decision:
        """The gate let the car out while it could not reach us and there is no consent to
        charge it (not bound, no agreement, over the limit, in arrears): the stay ends as
        unpaid and a person collects the fee. Never a charge the driver did not agree to."""
        account_id = session.pay_later.account_id if session.pay_later else None
        await self._close(conn, session, capture, at, fee, account_id, "offline_unpaid")
        await repo.insert_exception(
            conn,
            capture_id=capture.capture_id,
            capture_captured_at=capture.captured_at,
            car_park_id=gate.car_park_id,
            gate_id=gate.gate_id,
            reason="offline_exit",
            candidates=[{"plate": plate, "kind": "read", "fee_fen": fee, "held_because": why}],
            image=None,
        )
        command = self._command(capture, now, "open", [plate, "一路顺风"], fee)
        return Decision(
            "exited_offline_unpaid", command, plate, session.id, occupancy_delta, None, fee, None
        )

    async def _gate_time(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        now: datetime,
        session: OpenSession | None,
    ) -> datetime:
        return await edges.gate_time(
            conn,
            gate,
            capture,
            now,
            session_id=session.id if session else None,
            entered_at=session.entered_at if session else None,
            tolerance=self.clock_tolerance,
        )

    async def _paid_at_booth(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        reading: PlateReading,
        now: datetime,
    ) -> Decision | None:
        """An offline upload of a car the booth already took the money for (the booth could
        reach us while the gate could not): it is that stay's exit, never a second fee."""
        plate = self._confident(reading)
        session_id = (
            await edges_repo.booth_paid_stay(conn, gate.car_park_id, plate, now) if plate else None
        )
        if plate is None or session_id is None:
            return None
        await edges_repo.attach_exit_capture(conn, session_id, capture.capture_id)
        return self._open(capture, now, "exited_paid_at_booth", plate, session_id)

    async def _sent_to_booth(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        session: OpenSession,
        plate: str,
        at: datetime,
        now: datetime,
        fee: int,
        why: Outcome,
        occupancy_delta: int,
    ) -> Decision:
        """The gate, offline, sent the car to the booth, where an attendant may have taken cash:
        never charged pay-later (that would take the fee twice). The stay ends awaiting a booth
        payment and an operator sees it until one is recorded."""
        account_id = session.pay_later.account_id if session.pay_later else None
        await self._close(conn, session, capture, at, fee, account_id, "offline_booth")
        await repo.insert_exception(
            conn,
            capture_id=capture.capture_id,
            capture_captured_at=capture.captured_at,
            car_park_id=gate.car_park_id,
            gate_id=gate.gate_id,
            reason="offline_booth",
            candidates=[
                {
                    "plate": plate,
                    "kind": "stay",
                    "session_id": session.id,
                    "fee_fen": fee,
                    "held_because": why,
                }
            ],
            image=None,
        )
        command = self._command(capture, now, "hold", [plate, "请到岗亭缴费"], fee)
        return Decision(
            "exited_offline_booth", command, plate, session.id, occupancy_delta, None, fee, None
        )

    async def _exception(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        reading: PlateReading,
        now: datetime,
        reason: ExceptionReason,
        ranked: tuple[tuple[str, float], ...] = (),
    ) -> Decision:
        """The gate holds and an operator decides; the capture's frame goes with it."""
        outcome, match_status, display = _EXCEPTION_HOLD[reason]
        if reading.source == "operator":
            # An operator re-deciding this capture's open exception: no second exception (the
            # operator service refuses a decision that would still need one).
            return self._hold(capture, now, outcome, self._confident(reading), [display])
        candidates: list[dict[str, Any]] = [
            {"plate": c.plate, "score": round(c.score, 4), "kind": "read"}
            for c in reading.candidates[:5]
        ] + [{"plate": p, "distance": round(d, 3), "kind": "parked"} for p, d in ranked[:5]]
        await repo.insert_exception(
            conn,
            capture_id=capture.capture_id,
            capture_captured_at=capture.captured_at,
            car_park_id=gate.car_park_id,
            gate_id=gate.gate_id,
            reason=reason,
            candidates=candidates,
            image=reading.image,
        )
        return self._hold(
            capture,
            now,
            outcome,
            self._confident(reading),
            [display, "请稍候 人工处理"],
            match_status=match_status,
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
        plate: str | None,
        session_id: int | None,
        delta: int = 0,
        *,
        fee: int | None = None,
        welcome: bool = False,
        match_status: MatchStatus | None = None,
        debt: int = 0,
    ) -> Decision:
        greeting = "欢迎光临" if welcome else "一路顺风"
        display = [plate, greeting] if plate else [greeting]
        if debt:
            # Arrears are shown at every visit; the app and the next paid exit collect them.
            display.append(f"欠费 {format_fen(debt)} 请在App缴纳")
        command = self._command(capture, now, "open", display, fee)
        return Decision(outcome, command, plate, session_id, delta, None, fee, match_status)

    def _hold(
        self,
        capture: Capture,
        now: datetime,
        outcome: Outcome,
        plate: str | None,
        display: list[str],
        session_id: int | None = None,
        fee: int | None = None,
        match_status: MatchStatus | None = None,
    ) -> Decision:
        # The capture id is the QR's secret: random, and valid only for this held exit.
        qr = (
            f"{self.settings.public_base_url}/api/v1/gate-payments/{capture.capture_id}"
            if session_id is not None and fee
            else None
        )
        command = self._command(
            capture, now, "hold", [plate, *display] if plate else display, fee, qr
        )
        return Decision(outcome, command, plate, session_id, 0, None, fee, match_status)

"""The exit (and entry) decision for one capture. See ../shared/DESIGN.md, "The exit decision".

`decide` runs inside the caller's transaction and returns what to tell the gate and what to do
after commit; it never publishes or touches Redis itself. Charging the wrong person is the
worst failure: a vehicle is its (plate, colour); only a certain read matches a parked one
exactly, any other read is matched only uniquely and with a margin against the cars parked in
this car park (`rules.resolve_plate`), and a pay-later charge rests on the reads alone only
when the stay's entry and exit were both certain; otherwise the car park's policy holds the
gate for an operator or opens it with the charge awaiting an operator's confirmation.
"""

import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg

from billing import audit, charges, entries, fees
from billing.rights import RightTerms
from billing.tariff import format_fen
from gate_controller.protocol import Action, Capture, Command
from parking.confirmations import repository as confirmations_repo
from parking.confirmations.service import Disowned, disown_stay
from parking.lanes import edges
from parking.lanes import edges_repository as edges_repo
from parking.lanes import repository as repo
from parking.lanes.reading import PlateReading
from parking.lanes.repository import GateInfo, Identity, OpenSession
from parking.lanes.rules import (
    Certainty,
    ExceptionReason,
    ExitRule,
    Outcome,
    Resolution,
    Verification,
    identity_color,
    is_certain,
    is_proven,
    plan_exit,
    resolve_plate,
    uncertain_policy,
)
from parking.logging import get_logger
from parking.merchants import service as merchants
from parking.payments.qr import gate_payment_page_url
from parking.rights import service as rights
from parking.settings import Settings

log = get_logger(__name__)

_TARIFF_CACHE_S = 60.0
# PostgreSQL's resolution: the last moment before another.
_INSTANT = timedelta(microseconds=1)
MatchStatus = Literal["exact", "fuzzy", "ambiguous", "no_match"]


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
    # What the attendant must see at once in the dashboard's lane feed (a blacklisted vehicle).
    alert: str | None = None


@dataclass(frozen=True, slots=True)
class _Exit:
    """The stay an exit read was resolved to, or why it could not be."""

    resolution: Resolution
    session: OpenSession | None = None
    duplicate_of: int | None = None
    # +1 when the stay was taken back from a refuted exit and counts in again.
    reopened: int = 0
    # When the stay was ended by its vehicle's re-entry: this offline exit happened before it,
    # proven by the gate's live captures (`time_proven`) or only by its clock.
    ends_by: datetime | None = None
    time_proven: bool = True

    @property
    def plate(self) -> str | None:
        identity = self.resolution.identity
        return identity[0] if identity else None

    @property
    def match_status(self) -> MatchStatus | None:
        status = self.resolution.status
        if status in ("exact", "fuzzy", "ambiguous"):
            return status
        return "no_match" if status == "no_entry" else None


class LaneService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.certainty = Certainty.from_settings(settings)
        self.verification = Verification.from_settings(settings)
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
        received_at: datetime | None = None,
    ) -> Decision:
        """`received_at`: when a capture decided again later (an operator's resolve) reached
        us; None for one decided as it arrives. An offline capture's gate time is bounded by
        that receipt, not by the decision: the car had left by then, and a stay is never priced
        up to the moment an operator got to it."""
        # Offline uploads happened earlier, when the gate decided alone; live ones happen now,
        # or happened when they reached us if decided again later. Never later than now: a
        # gate clock ahead proves nothing (see edges.bounded_gate_time).
        at = min(capture.captured_at, now) if capture.offline else (received_at or now)
        if capture.direction == "in":
            return await self._entry(conn, gate, capture, reading, at, now, received_at)
        return await self._exit(conn, gate, capture, reading, at, now, received_at or now)

    def certain(self, reading: PlateReading) -> bool:
        return is_certain(reading, self.certainty)

    def proven(self, reading: PlateReading) -> bool:
        return is_proven(reading, self.certainty)

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
        received_at: datetime | None = None,
    ) -> Decision:
        plate = self._confident(reading)
        if plate is None:
            return await self._exception(conn, gate, capture, reading, now, "unreadable")
        if capture.offline:
            at = (await self._gate_time(conn, gate, capture, received_at or now, None)).at
        # The vehicle is (plate, colour); a read without a colour (or with one the plate's
        # grammar rules out) is kept under the grammar's colour and is not certain.
        color = identity_color(plate, reading.color)
        if received_at is not None and (
            later := await repo.stay_entered_since(
                conn, gate.car_park_id, plate, color, at - self.duplicate_window
            )
        ):
            # Decided again later: the vehicle came in on another capture since (a re-read at
            # the barrier), whether it is still inside or has left.
            return self._open(capture, now, "duplicate_read", plate, later)
        inside = await repo.open_session_for_update(conn, gate.car_park_id, plate, color)
        outcome: Outcome = "entered"
        delta = 1
        if inside is not None and at - inside.entered_at < self.duplicate_window:
            # The same car read twice at the barrier.
            return self._open(capture, now, "duplicate_read", plate, inside.id)
        if not self.certain(reading) and (
            twin := await repo.stay_entered_since(
                conn, gate.car_park_id, plate, None, at - self.duplicate_window, open_only=True
            )
        ):
            # The same characters just came in, in another colour: a doubtful read of that car
            # again (its colour taken otherwise), not a second car counted in.
            return self._open(capture, now, "duplicate_read", plate, twin)
        standing = await rights.entry_standing(
            conn,
            operator_id=gate.operator_id,
            car_park_id=gate.car_park_id,
            plate=plate,
            color=color,
            at=at,
        )
        if standing.blacklisted is not None and not capture.offline:
            return await self._blacklisted(
                conn, gate, capture, reading, now, plate, standing.blacklisted
            )
        if inside is not None:
            versions = await self._tariff_versions(conn, gate.car_park_id)
            await edges.end_missed_stay(
                conn, gate, inside, plate, at, versions, self.proven(reading)
            )
            # The new stay takes the missed one's place; one opened at an exit for the fixed
            # fee never took one (`occupancy.takes_a_place`), so the car is counted in.
            outcome, delta = "entered_superseding", 0 if inside.fixed_fee_fen is None else 1
        # After the missed stay ended: it holds no place of a pass any more.
        place_of, pass_full = await rights.take_place(conn, standing.rights)
        stay = await repo.open_session(
            conn,
            car_park_id=gate.car_park_id,
            plate=plate,
            plate_color=color,
            entered_at=at,
            entry_capture_id=capture.capture_id,
            entry_certain=self.certain(reading),
            assigned_right_id=place_of,
            entry_proven=self.proven(reading),
        )
        if (
            self.settings.payment_provider == "wechat"
            and stay.pay_later is not None
            and stay.pay_later.agreement_id is not None
            and self.certain(reading)
        ):
            # The parking rails want each pay-later stay registered at its entry (after commit).
            # Only a vehicle surely read: WeChat tells the plate's user their car came in, and a
            # doubtful read (a guessed colour, a look-alike) may be another driver's car. Such a
            # stay is registered by its deduction, if it comes to one.
            await entries.queue(conn, stay.id)
        # Shown only to a vehicle surely read (`rules.exit_rule`: never a stranger's display).
        debt = stay.pay_later.debt_fen if stay.pay_later and self.certain(reading) else 0
        return self._open(
            capture,
            now,
            outcome,
            plate,
            stay.id,
            delta,
            welcome=True,
            debt=debt,
            # Every place of the vehicle's pass is taken: this stay is a visitor's.
            note="月租车位已满 按临时车计费" if pass_full else None,
        )

    async def _resolve_exit(
        self, conn: asyncpg.Connection, gate: GateInfo, reading: PlateReading, at: datetime
    ) -> _Exit:
        """Which stay the exit read is (rules.resolve_plate), reading only what that needs: for
        a certain read its own vehicle's stay (and, when there is none, the cars that just
        left); for any other read every car here and just gone, in one query."""
        best = reading.best
        if best is None:
            return _Exit(resolve_plate(reading, {}, (), self.certainty))
        since = at - self.duplicate_window
        if self.certain(reading):
            assert reading.color is not None
            own = (best.plate, reading.color)
            session = await repo.open_session_for_update(conn, gate.car_park_id, *own)
            reopened = 0
            if session is None:
                left = await repo.recent_exits(conn, gate.car_park_id, since)
                if own not in left:
                    taken = await self._take_back(conn, gate, own)
                    reopened = taken.occupancy_delta if taken else 0
                    # Read again after the take-back's wait for the charge's lock: a decision
                    # of this vehicle committed meanwhile (its exit, a reject reopening its
                    # stay) is seen, not the state from before it.
                    session = await repo.open_session_for_update(conn, gate.car_park_id, *own)
                    if session is None:
                        left = await repo.recent_exits(conn, gate.car_park_id, since)
            if session is not None:
                parked = {own: session.entry_certain}
                resolution = resolve_plate(reading, parked, (), self.certainty)
                return _Exit(resolution, session, reopened=reopened)
            resolution = resolve_plate(reading, {}, left, self.certainty)
        else:
            parked, left = await repo.cars_here(conn, gate.car_park_id, since, at)
            resolution = resolve_plate(reading, parked, left, self.certainty)
        identity = resolution.identity
        if identity is None or resolution.status not in ("exact", "fuzzy"):
            return _Exit(resolution)
        if resolution.left:
            return _Exit(resolution, duplicate_of=left[identity])
        session = await repo.open_session_for_update(conn, gate.car_park_id, *identity)
        if session is None:
            # Gone since it was read (a concurrent exit closed it): nothing to close here.
            return _Exit(Resolution("no_entry", identity, resolution.certain))
        return _Exit(resolution, session)

    async def _take_back(
        self, conn: asyncpg.Connection, gate: GateInfo, identity: Identity
    ) -> Disowned | None:
        """A certain exit read of a vehicle with no open stay here, whose last stay was closed
        by an exit whose frames showed another vehicle (its charge awaiting an operator): that
        exit was the other car's, and this one leaves now. The charge is discarded and the stay
        disowned as an operator's reject does, so this exit ends it, once; before, the car was
        "no entry record" and paid again at a fixed-fee car park while the queue still held its
        stay's charge. An exit nobody refuted is left to the operator: the car may have left
        then and come back in unseen. None when there is no such stay."""
        charge = await confirmations_repo.refuted_exit_of_vehicle(conn, gate.car_park_id, *identity)
        # A statement of its own, after the lock: a "not my car" opened while we waited for it
        # decides that charge instead.
        if charge is None or await confirmations_repo.disputed(conn, charge.charge_id):
            return None
        await charges.discard_unconfirmed(conn, charge.charge_id)
        disowned = await disown_stay(conn, charge)
        await audit.record(
            conn,
            "system:lane",
            "charge.disowned_by_exit",
            f"charge:{charge.charge_id}",
            {
                "session_id": charge.session_id,
                "account_id": charge.account_id,
                "amount_fen": charge.amount_fen,
                "exception_id": disowned.exception_id,
            },
        )
        log.info(
            "lane.exit_took_back_stay", charge_id=charge.charge_id, car_park_id=gate.car_park_id
        )
        return disowned

    async def _exit(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        reading: PlateReading,
        at: datetime,
        now: datetime,
        received: datetime,
    ) -> Decision:
        if capture.offline and (
            paid := await self._paid_at_booth(conn, gate, capture, reading, now)
        ):
            return paid
        resolved = await self._resolve_exit(conn, gate, reading, at)
        if capture.offline:
            resolved = await self._before_reentry(conn, gate, capture, resolved)
        decision = await self._exit_resolved(
            conn, gate, capture, reading, at, now, received, resolved
        )
        if resolved.reopened:
            # Counted out at the refuted exit; this exit's own change follows.
            return replace(decision, occupancy_delta=decision.occupancy_delta + resolved.reopened)
        return decision

    async def _before_reentry(
        self, conn: asyncpg.Connection, gate: GateInfo, capture: Capture, resolved: _Exit
    ) -> _Exit:
        """An offline exit the gate's clock puts within a stay of its vehicle whose exit was
        missed (a later entry found it still open): the gate could not reach us when the car
        left, and the car came back in before the upload. The exit is that stay's, not the
        stay the car is parked on now, nor a second read of an exit it made since. Before, the
        upload ended the new stay (the clock flagged as behind) and the car's real exit from it
        later was "no entry record"; or the earlier stay was never charged.

        A gate's clock proves nothing alone: the exit is not that stay's when the gate answered
        a live capture after the re-entry and before this one (a lower seq), and its charge
        waits for an operator unless a live capture after this one (a higher seq) came before
        the re-entry. A stay already owed at the re-entry (its fee made a debt) only gets its
        exit capture. A second read of a crossing decided so is a duplicate of it."""
        resolution, stay = resolved.resolution, resolved.session
        identity = resolution.identity
        if identity is None or (stay is None and not resolution.left):
            return resolved
        missed_at = capture.captured_at
        if stay is not None and capture.captured_at >= stay.entered_at:
            if capture.captured_at >= stay.entered_at + self.clock_tolerance:
                # Well after the stay the car is parked on began (every missed stay ended by
                # then): the common offline exit, which needs no more reading.
                return resolved
            # Just after that stay began, by a clock that may be ahead within the tolerance:
            # the car may have left the stay it missed moments before it came back in (before,
            # that exit ended the new stay and the missed one was never charged). Only the
            # gate's live captures tell which, and without them an operator does.
            missed_at = stay.entered_at - _INSTANT
        missed = await repo.stay_missed_at_for_update(conn, gate.car_park_id, *identity, missed_at)
        before, after = await edges_repo.live_neighbours(conn, gate.gate_id, capture.seq)
        if missed is None:
            if stay is None or (before is not None and before >= stay.entered_at):
                return resolved
            # Before the stay the car is parked on, by a clock nothing disproves: a second
            # read of the offline crossing that ended the missed stay, when there was one.
            left = await repo.offline_crossing_near(
                conn,
                gate.car_park_id,
                *identity,
                gate.gate_id,
                capture.captured_at,
                self.duplicate_window,
            )
            return resolved if left is None else _Exit(replace(resolution, left=True), None, left)
        if before is not None and before >= missed.reentered_at:
            return resolved
        if missed.owed:
            await edges_repo.attach_exit_capture(conn, missed.stay.id, capture.capture_id)
            return _Exit(replace(resolution, left=True), None, missed.stay.id)
        return _Exit(
            replace(resolution, left=False, entry_certain=missed.stay.entry_certain),
            missed.stay,
            ends_by=missed.reentered_at,
            time_proven=after is not None and after <= missed.reentered_at,
        )

    async def _exit_resolved(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        reading: PlateReading,
        at: datetime,
        now: datetime,
        received: datetime,
        resolved: _Exit,
    ) -> Decision:
        resolution = resolved.resolution
        ranked = resolution.ranked
        if resolved.session and resolved.session.entered_at > received:
            # Decided again after the vehicle came back in: never the stay that began since
            # this capture reached us (an offline one too: the car had left by its upload).
            # The one open when this capture reached us ended since (on another capture, or
            # at that entry): this is a duplicate of that crossing.
            identity = resolution.identity
            assert identity is not None  # a stay was found for it
            earlier = await repo.stay_ended_since(conn, gate.car_park_id, *identity, received)
            if earlier is not None:
                return self._open(capture, now, "duplicate_read", identity[0], earlier)
            return await self._exception(conn, gate, capture, reading, now, "no_entry", ranked)
        earliest_at = None
        if capture.offline:
            # A gate's clock is not trusted blindly: bounded by what the server can prove.
            taken = await self._gate_time(
                conn, gate, capture, received, resolved.session, resolved.ends_by
            )
            at, earliest_at = taken.at, taken.earliest
            if not resolved.time_proven and earliest_at is None and resolved.session:
                # Only the gate's clock says the car left on this stay and not the one it is
                # parked on: an operator confirms the charge (`rules.exit_rule`).
                earliest_at = resolved.session.entered_at
        offline_open = capture.offline and capture.offline_action == "open"
        # Which way the exit goes is one pure function (rules.plan_exit), shared with the
        # misread simulation (parking_dev.misreads); this carries it out.
        plan = plan_exit(
            resolution,
            resolved.session,
            await self._tariff_versions(conn, gate.car_park_id),
            at=at,
            no_entry_fee_fen=(
                gate.no_entry_fee_fen if gate.no_entry_policy == "fixed_fee" else None
            ),
            uncertain_policy=uncertain_policy(
                gate.uncertain_exit_policy,
                operator_read=reading.source == "operator",
                offline_open=offline_open,
            ),
            offline_open=offline_open,
            # The frames the server's reader can read again before the charge is sent.
            verifiable=bool(capture.frames()),
            earliest_at=earliest_at,
        )
        if plan.outcome == "duplicate_read":
            return self._open(capture, now, "duplicate_read", resolved.plate, resolved.duplicate_of)
        if plan.exception in ("ambiguous", "unreadable", "no_entry"):
            return await self._exception(conn, gate, capture, reading, now, plan.exception, ranked)
        plate, session = resolved.plate, resolved.session
        if plan.exception == "blacklisted":
            assert plate is not None and session is not None and session.blacklisted is not None
            fee = plan.rule.fee_fen if plan.rule else None
            return await self._blacklisted(
                conn, gate, capture, reading, now, plate, session.blacklisted, session.id, fee
            )

        # A superseded stay's place went to the stay its vehicle's re-entry opened; a stay
        # opened at an exit for the fixed fee never took one (`occupancy.takes_a_place`).
        occupancy_delta = (
            0
            if session is not None
            and (session.status == "superseded" or session.fixed_fee_fen is not None)
            else -1
        )
        if plan.fixed_fee_stay is not None:
            session = await repo.open_session(
                conn,
                car_park_id=gate.car_park_id,
                plate=plan.fixed_fee_stay[0],
                plate_color=plan.fixed_fee_stay[1],
                entered_at=at,
                entry_capture_id=None,
                entry_certain=False,  # no entry read: never charged pay-later (rules.exit_rule)
                fixed_fee_fen=gate.no_entry_fee_fen,
            )
            occupancy_delta = 0  # never counted in: it was opened at the exit
        assert plate is not None and session is not None

        rule = plan.rule
        if rule is None:
            return self._hold(capture, now, "held_no_tariff", plate, ["请联系管理员"], session.id)
        fee = rule.fee_fen
        matched = resolved.match_status
        debt = rule.debt_fen

        right = rule.right.right if rule.right else None
        if plan.outcome == "exited_free":
            await self._close(conn, session, capture, at, rule, None, "free", right)
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
                note=right.name if right else None,
            )

        if capture.offline and capture.offline_action == "hold":
            # The gate sent the car to the booth: it awaits the booth, never a pay-later charge.
            return await self._sent_to_booth(
                conn, gate, capture, session, plate, at, now, rule, occupancy_delta
            )
        if plan.outcome == "exited_offline_unpaid":
            return await self._left_unpaid_offline(
                conn, gate, capture, session, plate, at, now, rule, occupancy_delta
            )
        if plan.exception == "uncertain":
            # Bound and able to pay later, but the reads are not both certain: an operator
            # decides with the frames (and the driver may pay at the gate meanwhile).
            await self._insert_exception(
                conn, gate, capture, reading, "uncertain", ranked, stay_plate=plate
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
        await self._close(conn, session, capture, at, rule, account_id, "pay_later", right)
        awaiting = rule.outcome == "exited_awaiting_confirmation"
        charge_id = await charges.queue_charge(
            conn,
            session_id=session.id,
            account_id=account_id,
            agreement_id=agreement_id,
            car_park_id=gate.car_park_id,
            amount_fen=fee,
            awaiting_confirmation=awaiting,
            awaiting_verification=rule.verify,
        )
        # Awaiting: charged only once an operator has compared the entry and exit frames.
        line = f"{format_fen(fee)} 核实后扣款" if awaiting else f"{format_fen(fee)} 离场后扣款"
        command = self._command(capture, now, "open", [plate, line], fee)
        return Decision(
            rule.outcome, command, plate, session.id, occupancy_delta, charge_id, fee, matched
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
        rule: ExitRule,
        occupancy_delta: int,
    ) -> Decision:
        """The gate let the car out while it could not reach us and there is no consent to
        charge it (not bound, no agreement, over the limit, in arrears): the stay ends as
        unpaid and a person collects the fee. Never a charge the driver did not agree to."""
        fee, why = rule.fee_fen, rule.outcome
        account_id = session.pay_later.account_id if session.pay_later else None
        await self._close(conn, session, capture, at, rule, account_id, "offline_unpaid")
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
        ends_by: datetime | None = None,
    ) -> edges.GateTime:
        return await edges.gate_time(
            conn,
            gate,
            capture,
            now,
            session_id=session.id if session else None,
            entered_at=session.entered_at if session else None,
            ends_by=ends_by,
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
            await edges_repo.booth_paid_stay(
                conn,
                gate.car_park_id,
                plate,
                identity_color(plate, reading.color),
                now,
                # A re-entry moments before a gate time that may be ahead (within the
                # tolerance) does not make the exit the later stay's: the car paid and left.
                capture.captured_at - self.clock_tolerance,
            )
            if plate
            else None
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
        rule: ExitRule,
        occupancy_delta: int,
    ) -> Decision:
        """The gate, offline, sent the car to the booth, where an attendant may have taken cash:
        never charged pay-later (that would take the fee twice). The stay ends awaiting a booth
        payment and an operator sees it until one is recorded."""
        fee, why = rule.fee_fen, rule.outcome
        account_id = session.pay_later.account_id if session.pay_later else None
        await self._close(conn, session, capture, at, rule, account_id, "offline_booth")
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
        await self._insert_exception(conn, gate, capture, reading, reason, ranked)
        return self._hold(
            capture,
            now,
            outcome,
            self._confident(reading),
            [display, "请稍候 人工处理"],
            match_status=match_status,
        )

    @staticmethod
    async def _insert_exception(
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        reading: PlateReading,
        reason: ExceptionReason,
        ranked: tuple[tuple[str, float], ...] = (),
        *,
        stay_plate: str | None = None,
    ) -> None:
        candidates: list[dict[str, Any]] = (
            ([{"plate": stay_plate, "kind": "stay"}] if stay_plate else [])
            + [
                {"plate": c.plate, "score": round(c.score, 4), "kind": "read"}
                for c in reading.candidates[:5]
            ]
            + [{"plate": p, "distance": round(d, 3), "kind": "parked"} for p, d in ranked[:5]]
        )
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

    @staticmethod
    async def _close(
        conn: asyncpg.Connection,
        session: OpenSession,
        capture: Capture,
        at: datetime,
        rule: ExitRule,
        account_id: int | None,
        settlement: str,
        right: RightTerms | None = None,
    ) -> None:
        """Ends the stay at the rule's fee; its validation's cost beyond what it took off goes
        back to the merchant (in this transaction, as the fee is fixed)."""
        await repo.close_session(
            conn,
            session_id=session.id,
            exited_at=at,
            exit_capture_id=capture.capture_id,
            fee_fen=rule.fee_fen,
            account_id=account_id,
            settlement=settlement,
            applied_right_id=right.id if right else None,
            status=session.status,
        )
        # Whether or not the stay was read with one: a validation committed while this exit
        # waited for the stay's lock is not in that read, took nothing off, and goes back whole.
        await merchants.settle(conn, session.id, rule.validation_fen, "system:lane")

    async def _blacklisted(
        self,
        conn: asyncpg.Connection,
        gate: GateInfo,
        capture: Capture,
        reading: PlateReading,
        now: datetime,
        plate: str,
        reason: str,
        session_id: int | None = None,
        fee: int | None = None,
    ) -> Decision:
        """A vehicle on the company's blacklist: held at the barrier, and the attendant sees why
        (an exception in the queue, the decision in the dashboard's feed). The stay, if any,
        stays open."""
        if reading.source == "operator":
            # An operator re-deciding a held capture: its exception exists (they are told).
            return Decision("held_blacklisted", self._command(capture, now, "hold", [plate]), plate)
        candidates: list[dict[str, Any]] = [
            {"plate": plate, "kind": "blacklisted", "reason": reason, "fee_fen": fee}
        ]
        if session_id is not None:
            candidates[0]["session_id"] = session_id
        await repo.insert_exception(
            conn,
            capture_id=capture.capture_id,
            capture_captured_at=capture.captured_at,
            car_park_id=gate.car_park_id,
            gate_id=gate.gate_id,
            reason="blacklisted",
            candidates=candidates,
            image=reading.image,
        )
        command = self._command(capture, now, "hold", [plate, "请稍候 人工处理"])
        return Decision(
            "held_blacklisted", command, plate, session_id, 0, None, fee, alert=f"黑名单：{reason}"
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
        note: str | None = None,
    ) -> Decision:
        greeting = "欢迎光临" if welcome else "一路顺风"
        display = [plate, greeting] if plate else [greeting]
        if note:
            # The right the car left under (a pass, a whitelist), or why it entered as a visitor.
            display.insert(len(display) - 1, note)
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
        qr = (
            gate_payment_page_url(self.settings.public_base_url, capture.capture_id)
            if session_id is not None and fee
            else None
        )
        command = self._command(
            capture, now, "hold", [plate, *display] if plate else display, fee, qr
        )
        return Decision(outcome, command, plate, session_id, 0, None, fee, match_status)

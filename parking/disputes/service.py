""" "Not my car": the driver disputes a charge in one step (receipt page or app), an operator
decides with both frames in front of them.

- Opened on a charge not yet sent, the charge is held: the outbox worker does not send it
  (`billing.charges.begin_sending` takes the charge's lock, as opening a dispute does). A
  charge still awaiting the server's verification or an operator's confirmation is held too:
  verified, it waits for the dispute; an operator decides it in the dispute, not the
  confirmation queue.
- Opened on a charge already collected (or sent), nothing moves until the decision: a refund
  on one tap would let anyone undo their fee without a person looking at the frames.
- A failed charge is a debt that blocks pay-later: disputed while it is owed, the debt is on
  hold (no block, no reminder, not asked for at a gate) until the decision: `driver_right`
  waives it (the accrual reversed), `charge_stands` makes it owed again. So is a missed
  stay's debt (a held stay whose car left without paying: no charge behind it), disputed
  from the app's stay.
- `driver_right`: a held charge is cancelled (its accrual reversed, if it was accrued; one
  that was awaiting is deleted and disowns its stay as the confirmation queue's reject does),
  a collected one refunded in full through `billing.refunds`; the dispute stays listed
  (`status=driver_right`) for the real car to be found. `charge_stands`: a held charge is
  released to the provider, once (one still awaiting is confirmed: accrued and queued).
- Each dispute is one per charge or missed stay's debt (disputing twice is the same
  dispute), audit-logged, and the driver is told both the opening and the outcome.
"""

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from billing import audit, charges, debts, notifications, refunds
from billing.tariff import format_fen
from parking.auth.principal import Principal
from parking.confirmations import repository as confirmations_repo
from parking.confirmations.schemas import CameraReadSummary
from parking.confirmations.service import disown_stay
from parking.disputes import repository as repo
from parking.disputes.schemas import (
    ChargeSummary,
    Decision,
    DisputeKind,
    DisputeView,
    Evidence,
    OperatorDispute,
    Read,
)
from parking.errors import AppError, NotFound
from parking.logging import get_logger

log = get_logger(__name__)

# A charge not yet booked: the server's reader or an operator has still to vouch for it.
_AWAITING = ("awaiting_verification", "awaiting_confirmation")


async def frames_withheld(conn: asyncpg.Connection, stay_id: int) -> bool:
    """Whether the driver's side no longer shows the stay's frames: an operator found its car
    was not the driver's (`driver_right`), so they show another person's car. The driver's
    receipt and app answer as if none were kept; operators keep them to find the real car."""
    dispute = await repo.dispute_of_stay(conn, stay_id)
    return dispute is not None and dispute["status"] == "driver_right"


async def frame_for_driver(
    conn: asyncpg.Connection, stay_id: int, capture_id: UUID | None
) -> bytes:
    """A frame of the stay as its driver sees it (receipt or app): 404 when none is kept or
    it is withheld (`frames_withheld`)."""
    if capture_id is None or await frames_withheld(conn, stay_id):
        raise NotFound("frame")
    image = await repo.frame(conn, capture_id)
    if image is None:
        raise NotFound("frame")
    return image


def view(row: asyncpg.Record) -> DisputeView:
    return DisputeView(
        id=row["id"],
        status=row["status"],
        held=row["held"],
        opened_at=row["opened_at"],
        decided_at=row["decided_at"],
        refund_id=row["refund_id"],
    )


async def open_dispute(
    conn: asyncpg.Connection,
    *,
    charge_id: int,
    account_id: int,
    via: str,
    style: notifications.MessageStyle,
) -> DisputeView:
    """The driver's "not my car" on one of their charges; the same dispute when it exists.
    Runs in the caller's transaction."""
    charge = await repo.lock_charge(conn, charge_id)
    if charge is None or charge["account_id"] != account_id:
        raise NotFound("charge")
    existing = await repo.dispute_of_charge(conn, charge_id)
    if existing is not None:
        return view(existing)
    if charge["status"] == "cancelled":
        raise AppError(409, "charge_not_disputable", "this charge was cancelled: nothing is owed")
    if charge["status"] == "failed":
        debt = await debts.of_stay(conn, account_id, charge["session_id"])
        if debt is None or not debt["owed"]:
            raise _PAID_AS_DEBT
    # Held while no money can move for it: never sent, or refused by the provider for the car
    # park's own reason (an operator's retry of that refusal sends it no more).
    held = charge["status"] in (*_AWAITING, "failed") or (
        charge["status"] == "pending" and charge["unsent"]
    )
    return await _opened(
        conn,
        stay_id=charge["session_id"],
        charge_id=charge_id,
        debt_id=None,
        account_id=account_id,
        car_park_id=charge["car_park_id"],
        car_park=charge["car_park"],
        amount_fen=charge["amount_fen"],
        exit_capture_id=charge["exit_capture_id"],
        exited_at=charge["exited_at"],
        via=via,
        held=held,
        on_debt=charge["status"] == "failed",
        style=style,
    )


# A debt paid already is settled: a refund of it is the car park's to decide.
_PAID_AS_DEBT = AppError(
    409, "charge_not_disputable", "this fee was paid as a debt: contact the car park"
)


async def _dispute_missed_stay(
    conn: asyncpg.Connection, account_id: int, stay_id: int, style: notifications.MessageStyle
) -> DisputeView:
    """ "Not my car" on a held stay left without paying, owed as a debt with no charge: the
    debt is on hold until an operator decides, as a failed charge's is."""
    stay = await repo.missed_stay(conn, account_id, stay_id)
    if stay is None:
        raise NotFound("stay")
    debt = await debts.of_stay(conn, account_id, stay_id)  # the account's lock first
    if debt is None:
        raise NotFound("stay")
    existing = await repo.dispute_of_debt(conn, debt["id"])
    if existing is not None:
        return view(existing)
    if not debt["owed"]:
        raise _PAID_AS_DEBT
    return await _opened(
        conn,
        stay_id=stay_id,
        charge_id=None,
        debt_id=debt["id"],
        account_id=account_id,
        car_park_id=stay["car_park_id"],
        car_park=stay["car_park"],
        amount_fen=debt["amount_fen"],
        exit_capture_id=stay["exit_capture_id"],
        exited_at=stay["exited_at"],
        via="app",
        held=True,
        on_debt=True,
        style=style,
    )


async def _opened(
    conn: asyncpg.Connection,
    *,
    stay_id: int,
    charge_id: int | None,
    debt_id: int | None,
    account_id: int,
    car_park_id: int,
    car_park: str,
    amount_fen: int,
    exit_capture_id: UUID | None,
    exited_at: datetime | None,
    via: str,
    held: bool,
    on_debt: bool,
    style: notifications.MessageStyle,
) -> DisputeView:
    """Records the dispute of the stay's charge or missed stay's debt, audited, and tells the
    driver."""
    row = await repo.insert_dispute(
        conn,
        stay_id=stay_id,
        charge_id=charge_id,
        debt_id=debt_id,
        amount_fen=amount_fen,
        exit_capture_id=exit_capture_id,
        exited_at=exited_at,
        account_id=account_id,
        car_park_id=car_park_id,
        via=via,
        held=held,
    )
    if on_debt:
        # Its debt is on hold: pay-later comes back unless another debt is open.
        await debts.refresh_arrears(conn, account_id)
    await audit.record(
        conn,
        actor=f"account:{account_id}",
        action="charge_dispute.opened",
        subject=f"charge_dispute:{row['id']}",
        detail={
            "charge_id": charge_id,
            "debt_id": debt_id,
            "stay_id": stay_id,
            "held": held,
            "via": via,
        },
    )
    await notifications.enqueue(
        conn,
        account_id=account_id,
        kind="dispute_opened",
        source_key=f"charge_dispute:{row['id']}:opened",
        body=notifications.render(
            "dispute_opened",
            style.language,
            car_park=car_park,
            amount=format_fen(amount_fen),
        ),
    )
    log.info("disputes.opened", dispute_id=row["id"], charge_id=charge_id, held=held)
    return view(row)


async def dispute_stay(
    conn: asyncpg.Connection, account_id: int, stay_id: int, style: notifications.MessageStyle
) -> DisputeView:
    """The driver app's "not my car" on a stay charged to the account, or owed by it as a
    missed stay's debt."""
    charge_id = await repo.charge_of_stay(conn, account_id, stay_id)
    if charge_id is None:
        return await _dispute_missed_stay(conn, account_id, stay_id, style)
    return await open_dispute(
        conn, charge_id=charge_id, account_id=account_id, via="app", style=style
    )


def _operator_id(principal: Principal) -> int:
    if principal.operator_id is None:  # OperatorDep only lets staff tokens through
        raise AppError(403, "forbidden", "not a member of an operator company")
    return principal.operator_id


def _kind(row: asyncpg.Record) -> DisputeKind:
    """What the dispute is of: neither a charge nor a debt is one of a charge that was
    awaiting, deleted when the driver was right."""
    if row["charge_id"] is not None:
        return "charge"
    return "missed_stay_debt" if row["debt_id"] is not None else "charge_discarded"


def frame_url(dispute_id: int, which: str) -> str:
    return f"/api/v1/operator/disputes/{dispute_id}/frames/{which}"


def _evidence(dispute_id: int, which: str, capture: asyncpg.Record | None) -> Evidence | None:
    if capture is None:
        return None
    return Evidence(
        capture_id=str(capture["capture_id"]),
        gate=capture["gate"],
        captured_at=capture["captured_at"],
        read=Read(
            plate=capture["plate"],
            confidence=capture["read_confidence"],
            source=capture["plate_source"],
            match_status=capture["match_status"],
            candidates=capture["candidates"] or [],
            camera=CameraReadSummary.of(
                capture["camera_plate"], capture["camera_color"], capture["camera_confidence"]
            ),
        ),
        frame_url=frame_url(dispute_id, which) if capture["has_frame"] else None,
    )


async def _operator_views(
    conn: asyncpg.Connection, rows: list[asyncpg.Record]
) -> list[OperatorDispute]:
    ids: list[UUID] = [
        c for r in rows for c in (r["entry_capture_id"], r["exit_capture_id"]) if c is not None
    ]
    captures = {c["capture_id"]: c for c in await repo.captures(conn, ids)} if ids else {}
    return [
        OperatorDispute(
            id=r["id"],
            status=r["status"],
            held=r["held"],
            via=r["via"],
            opened_at=r["opened_at"],
            decided_at=r["decided_at"],
            decided_by=r["decided_by"],
            note=r["note"],
            refund_id=r["refund_id"],
            car_park=r["car_park_code"],
            stay_id=r["stay_id"],
            plate=r["plate"],
            entered_at=r["entered_at"],
            exited_at=r["exited_at"],
            kind=_kind(r),
            amount_fen=r["amount_fen"],
            charge=ChargeSummary(
                id=r["charge_id"], amount_fen=r["amount_fen"], status=r["charge_status"]
            )
            if r["charge_id"] is not None
            else None,
            entry=_evidence(r["id"], "entry", captures.get(r["entry_capture_id"])),
            exit=_evidence(r["id"], "exit", captures.get(r["exit_capture_id"])),
        )
        for r in rows
    ]


async def list_disputes(
    conn: asyncpg.Connection,
    principal: Principal,
    *,
    status: str | None,
    car_park: str | None,
    limit: int,
) -> list[OperatorDispute]:
    rows = await repo.list_disputes(
        conn, _operator_id(principal), status=status, car_park=car_park, limit=limit
    )
    return await _operator_views(conn, rows)


async def get_dispute(
    conn: asyncpg.Connection, principal: Principal, dispute_id: int
) -> OperatorDispute:
    row = await repo.dispute(conn, _operator_id(principal), dispute_id)
    if row is None:
        raise NotFound("dispute")
    return (await _operator_views(conn, [row]))[0]


async def frame(
    conn: asyncpg.Connection, principal: Principal, dispute_id: int, which: str
) -> bytes:
    row = await repo.dispute(conn, _operator_id(principal), dispute_id)
    if row is None:
        raise NotFound("dispute")
    capture_id = row["entry_capture_id"] if which == "entry" else row["exit_capture_id"]
    image = await repo.frame(conn, capture_id) if capture_id is not None else None
    if image is None:
        raise NotFound("frame")
    return image


@dataclass(frozen=True, slots=True)
class Decided:
    dispute: OperatorDispute
    car_park_id: int
    # +1 after commit when the disowned stay of a charge that was awaiting was reopened and
    # its car counts as inside again (`confirmations.service.disown_stay`).
    occupancy_delta: int = 0


async def _refund_the_stay(
    conn: asyncpg.Connection, charge_id: int, stay_id: int, dispute_id: int, actor: str
) -> int | None:
    """Gives back what the driver paid for the stay: what is left of its collected charge, and
    the payment that settled its debt when the charge was collected late after all (the
    charge's own money then went back as an overpayment, the payment's stayed). The first
    refund's id (None when nothing was left to refund)."""
    reason = f"not the driver's car (dispute {dispute_id})"
    refund_ids = []
    try:
        left = await repo.refundable_fen(conn, charge_id)
        if left > 0:
            refund = await refunds.request_for_charge(
                conn, charge_id=charge_id, amount_fen=left, reason=reason, actor=actor
            )
            refund_ids.append(refund.id)
        if paid := await repo.debt_payment_left(conn, stay_id):
            payment_id, amount_fen = paid
            # Out of this stay's car park's revenue, whatever else the payment paid for.
            refund = await refunds.request_for_payment(
                conn,
                payment_id=payment_id,
                amount_fen=amount_fen,
                reason=reason,
                actor=actor,
                stay_id=stay_id,
            )
            refund_ids.append(refund.id)
    except refunds.RefundNotAllowed as exc:  # the locks rule this out
        raise AppError(409, "refund_not_allowed", str(exc)) from exc
    return refund_ids[0] if refund_ids else None


async def decide(
    conn: asyncpg.Connection,
    principal: Principal,
    dispute_id: int,
    decision: Decision,
    style: notifications.MessageStyle,
) -> Decided:
    """An admin's decision, once; audit-logged; the driver is told. Runs in the caller's
    transaction (the refund's provider call and the released charge follow from the outbox)."""
    row = await repo.dispute(conn, _operator_id(principal), dispute_id, lock=True)
    if row is None:
        raise NotFound("dispute")
    if row["status"] != "open":
        raise AppError(409, "already_decided", "this dispute has already been decided")
    # None for a missed stay's debt: what is disputed is the debt alone.
    charge = (
        await repo.lock_charge(conn, row["charge_id"]) if row["charge_id"] is not None else None
    )
    on_debt = charge is None or charge["status"] == "failed"
    refund_id: int | None = None
    effect = "none"
    occupancy_delta = 0
    disowned = False  # an awaiting charge the driver was right about: deleted once decided
    if decision.outcome == "driver_right" and on_debt:
        if not await debts.waive(conn, row["account_id"], row["session_id"]):
            raise AppError(409, "charge_not_disputable", "the debt is settled: nothing to undo")
        await charges.cancel_accrual(
            conn,
            row["account_id"],
            row["car_park_id"],
            row["amount_fen"],
            session_id=row["session_id"],
            charge_id=row["charge_id"],
        )
        effect = "cancelled"
    # A debt that stands needs nothing more here: it is owed again below.
    elif charge is not None and decision.outcome == "driver_right":
        if charge["status"] == "succeeded":
            refund_id = await _refund_the_stay(
                conn, charge["id"], row["session_id"], dispute_id, principal.actor
            )
            effect = "refunded"
        elif charge["status"] == "pending":
            if await charges.cancel_unsent(conn, charge["id"], principal.actor) is None:
                raise AppError(
                    409,
                    "charge_in_flight",
                    "the provider has the charge and has not answered yet: decide once it has",
                )
            effect = "cancelled"
        elif charge["status"] in _AWAITING:
            awaiting = await confirmations_repo.charge_for_update(
                conn, _operator_id(principal), charge["id"]
            )
            assert awaiting is not None  # locked above, of this company's car park
            # As the confirmation queue's reject: the doubtful exit read may have been
            # another car's, and this vehicle still inside. The charge is deleted below, so
            # that the reopened stay can be charged at its real exit.
            occupancy_delta = (await disown_stay(conn, awaiting)).occupancy_delta
            disowned = True
            effect = "cancelled"
        else:
            raise AppError(
                409, "charge_not_disputable", f"the charge is {charge['status']}: nothing to undo"
            )
    elif charge is not None and charge["status"] in _AWAITING:
        # The operator saw both frames: the charge is confirmed, once.
        await charges.confirm(conn, charge["id"], awaiting=charge["status"])
        effect = "confirmed"
    elif charge is not None and charge["status"] == "pending" and (row["held"] or charge["unsent"]):
        # Its job was skipped while the dispute held it (`charges.begin_sending`), including a
        # retry an operator asked for after the provider's refusal: due again, once.
        await charges.release_held(conn, charge["id"])
        effect = "released"
    decided = await repo.mark_decided(
        conn,
        dispute_id,
        status=decision.outcome,
        actor=principal.actor,
        note=decision.note,
        refund_id=refund_id,
        detach_charge=disowned,
    )
    if decided is None:  # the row lock above rules this out
        raise AppError(409, "already_decided", "this dispute has already been decided")
    if disowned:
        assert charge is not None
        await charges.discard_unconfirmed(conn, charge["id"])
    if on_debt:
        # A debt that stands is owed again (blocking pay-later); a waived one is not.
        await debts.refresh_arrears(conn, row["account_id"])
    await audit.record(
        conn,
        actor=principal.actor,
        action="charge_dispute.decided",
        subject=f"charge_dispute:{dispute_id}",
        detail={
            "outcome": decision.outcome,
            "effect": effect,
            "charge_id": row["charge_id"],
            "stay_id": row["session_id"],
            "refund_id": refund_id,
            "note": decision.note,
        },
    )
    amount = format_fen(row["amount_fen"])
    if decision.outcome == "driver_right":
        body = notifications.render(
            "dispute_driver_right",
            style.language,
            car_park=row["car_park"],
            amount=amount,
            outcome=notifications.dispute_outcome(
                style.language, "refunded" if effect == "refunded" else "cancelled"
            ),
        )
    else:
        # A missed stay's debt has no receipt: the app shows the stay and its frames.
        link = (
            await notifications.receipt_link(conn, charge["id"], style)
            if charge is not None
            else None
        )
        body = notifications.render(
            "dispute_charge_stands",
            style.language,
            car_park=row["car_park"],
            amount=amount,
            receipt=notifications.receipt_sentence(style.language, link),
        )
    await notifications.enqueue(
        conn,
        account_id=row["account_id"],
        kind=f"dispute_{decision.outcome}",
        source_key=f"charge_dispute:{dispute_id}:decided",
        body=body,
    )
    log.info("disputes.decided", dispute_id=dispute_id, outcome=decision.outcome, effect=effect)
    return Decided(
        await get_dispute(conn, principal, dispute_id), row["car_park_id"], occupancy_delta
    )

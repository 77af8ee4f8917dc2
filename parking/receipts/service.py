"""The receipt behind a message's link: what the driver was charged for, with the entry and
exit frames behind signed URLs that expire, and "not my car" in one step.

The token is the only credential: random, stored as its hash, naming one charge. Whoever
holds the link sees the masked plate, the car park, the times, the fee and the frames, and
may dispute the charge on the account's behalf (as the driver could in the app)."""

import time
from datetime import UTC, datetime

import asyncpg

from billing import fees, notifications
from parking.disputes import repository as disputes_repo
from parking.disputes import service as disputes
from parking.disputes.schemas import DisputeView
from parking.errors import AppError, NotFound
from parking.lanes import repository as lanes_repo
from parking.logging import mask_plate
from parking.receipts import repository as repo
from parking.receipts.schemas import ChargeState, Fee, Frames, ReceiptView, Segment
from parking.receipts.signing import FrameSigner, Which


async def _row(conn: asyncpg.Connection, token: str) -> asyncpg.Record:
    row = await repo.by_token_hash(conn, notifications.receipt_token_hash(token))
    if row is None:
        raise NotFound("receipt")
    return row


async def _fee(conn: asyncpg.Connection, row: asyncpg.Record) -> Fee:
    """The tariff's segments when they add up to what was charged (a fixed fee has none)."""
    total = row["amount_fen"]
    exited = row["exited_at"] or datetime.now(UTC)
    terms = await lanes_repo.stay_terms(conn, row["stay_id"])
    priced = fees.stay_fee(
        await fees.tariff_versions(conn, row["car_park_id"]),
        entered_at=row["entered_at"],
        at=exited,
        plate_color=row["plate_color"],
        fixed_fee_fen=row["fixed_fee_fen"],
        rights=terms.rights,
        validation=terms.validation,
    )
    if priced is None or priced.quote is None or priced.fee_fen != total:
        return Fee(total_fen=total, gross_fen=None, discount_fen=0, segments=[])
    quote = priced.quote
    return Fee(
        total_fen=total,
        gross_fen=quote.gross_fen,
        discount_fen=quote.discount_fen,
        right=priced.right.right.name if priced.right else None,
        right_reduction_fen=priced.right.reduction_fen if priced.right else 0,
        validation_fen=priced.validation_fen,
        segments=[
            Segment(start=s.start, end=s.end, band=s.band, day_type=s.day_type, fen=s.fen)
            for s in quote.segments
        ],
    )


async def receipt(conn: asyncpg.Connection, token: str, signer: FrameSigner | None) -> ReceiptView:
    row = await _row(conn, token)
    captures = {
        c["capture_id"]: c["has_frame"]
        for c in await disputes_repo.captures(
            conn, [c for c in (row["entry_capture_id"], row["exit_capture_id"]) if c]
        )
    }

    withheld = await disputes.frames_withheld(conn, row["stay_id"])

    def url(which: Which, capture_id: object) -> str | None:
        if signer is None or withheld or not captures.get(capture_id):
            return None
        return signer.url(token, which)

    dispute = await disputes_repo.dispute_of_charge(conn, row["charge_id"])
    until = row["exited_at"] or datetime.now(UTC)
    return ReceiptView(
        car_park=row["car_park"],
        plate=mask_plate(row["plate"]),
        stay_id=row["stay_id"],
        entered_at=row["entered_at"],
        exited_at=row["exited_at"],
        duration_minutes=max(0, int((until - row["entered_at"]).total_seconds()) // 60),
        fee=await _fee(conn, row),
        charge=ChargeState(amount_fen=row["amount_fen"], status=row["charge_status"]),
        refunded_fen=row["refunded_fen"],
        frames=Frames(
            entry=url("entry", row["entry_capture_id"]), exit=url("exit", row["exit_capture_id"])
        ),
        dispute=disputes.view(dispute) if dispute else None,
    )


async def frame(
    conn: asyncpg.Connection,
    token: str,
    which: Which,
    exp: int,
    sig: str,
    signer: FrameSigner | None,
) -> bytes:
    """The frame behind a signed URL: 403 when the signature is not ours (or names another
    frame, time or receipt), 410 once it expired, 404 for an unknown receipt or an erased
    frame. Nothing is read before the signature is checked."""
    if signer is None:
        raise AppError(503, "receipt_frames_unavailable", "receipt frames need PARKING_RECEIPT_KEY")
    if not signer.valid(token, which, exp, sig):
        raise AppError(403, "bad_signature", "this frame link is not valid")
    if exp < time.time():
        raise AppError(410, "link_expired", "this frame link has expired: open the receipt again")
    row = await _row(conn, token)
    capture_id = row["entry_capture_id"] if which == "entry" else row["exit_capture_id"]
    return await disputes.frame_for_driver(conn, row["stay_id"], capture_id)


async def dispute(
    conn: asyncpg.Connection, token: str, style: notifications.MessageStyle
) -> DisputeView:
    """ "Not my car" from the receipt: the charge's own account disputes it."""
    row = await _row(conn, token)
    return await disputes.open_dispute(
        conn, charge_id=row["charge_id"], account_id=row["account_id"], via="receipt", style=style
    )

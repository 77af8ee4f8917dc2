"""Charges: queued in the transaction that closes a stay, executed after the car has left.

`queue_charge` runs inside the caller's transaction (the lane's exit decision) and writes the
charge, the fee accrual in the ledger and the outbox job together; the charge worker picks the
job up after commit. One charge per session is enforced by the unique session_id.
"""

import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from billing import audit, debts, entries, ledger
from billing.providers import DESCRIPTION_MAX_CHARS, ParkingDeduction


@dataclass(frozen=True, slots=True)
class ChargeJob:
    charge_id: int
    session_id: int
    account_id: int
    car_park_id: int
    amount_fen: int
    idempotency_key: str
    status: str
    attempts: int
    agreement_no: str
    provider: str
    plate: str
    car_park_name: str
    entered_at: datetime
    exited_at: datetime
    plate_color: str = "blue"
    # The provider's id of the stay, when it was registered at its entry.
    provider_parking_id: str | None = None
    entry_capture_id: uuid.UUID | None = None

    def deduction(self) -> ParkingDeduction:
        """The stay as the parking rails describe a deduction (billing.providers)."""
        return ParkingDeduction(
            plate=self.plate,
            color=self.plate_color,
            entered_at=self.entered_at,
            exited_at=self.exited_at,
            car_park_name=self.car_park_name,
            parking_id=self.provider_parking_id,
            # Registered at the exit when the entry's registration never happened.
            out_parking_no=entries.out_parking_no(
                self.session_id, self.entry_capture_id, self.entered_at
            ),
        )


# A zero-width joiner or variation selector means nothing without what followed it.
_ZWJ = "\u200d"
_DANGLING = _ZWJ + "\ufe0e\ufe0f"


def description(car_park_name: str, *, limit: int = DESCRIPTION_MAX_CHARS) -> str:
    """The charge's description as the provider shows it to the driver: never longer than the
    provider takes (a longer one is refused, which must not happen for a name an admin chose).
    Control and format characters (but the joiner of joined emoji) become spaces; a cut falls
    between whole characters (never between a letter and its combining accent, nor inside a
    joined emoji) and ends in "…"."""
    name = "".join(
        " " if ch != _ZWJ and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") else ch
        for ch in car_park_name
    )
    text = " ".join(f"parking {name}".split())
    if len(text) <= limit:
        return text
    # Cut where the next character does not belong to the previous one: not before a
    # combining mark, a variation selector or a joiner, nor just after a joiner.
    end = limit - 1
    while end > 0 and (
        unicodedata.combining(text[end]) or text[end] in _DANGLING or text[end - 1] in _DANGLING
    ):
        end -= 1
    cut = text[:end].rstrip()
    return cut + "…"


def new_idempotency_key(session_id: int) -> str:
    """Drawn once when the charge is queued and stored with it, so every retry reuses it; random
    so that keys stay unique at the provider across databases and deployments sharing one
    merchant account (a bare session id would collide). At most 32 characters: WeChat Pay's
    out_trade_no takes no more."""
    return f"s{session_id}-{uuid.uuid4().hex}"[:32]


async def queue_charge(
    conn: asyncpg.Connection,
    *,
    session_id: int,
    account_id: int,
    agreement_id: int,
    car_park_id: int,
    amount_fen: int,
    awaiting_confirmation: bool = False,
    awaiting_verification: bool = False,
) -> int:
    """The exit's charge. `awaiting_confirmation`: the stay's reads were not both certain, so
    the charge is only recorded (no ledger line, no job, nothing sent) until an operator
    confirms it (`confirm`) or rejects it (`discard_unconfirmed`). `awaiting_verification`:
    recorded the same way, with a 'verify_charge' job: a second reader checks the stay's
    frames first (`verified`, or `refer_to_operator`)."""
    if awaiting_confirmation or awaiting_verification:
        awaiting_id: int = await conn.fetchval(
            """WITH charge AS (
                   INSERT INTO charges
                       (session_id, account_id, agreement_id, amount_fen, idempotency_key,
                        status)
                   VALUES ($1, $2, $3, $4, $5, $6) RETURNING id),
               job AS (
                   INSERT INTO outbox (kind, ref_id)
                   SELECT 'verify_charge', id FROM charge WHERE $6 = 'awaiting_verification')
               SELECT id FROM charge""",
            session_id,
            account_id,
            agreement_id,
            amount_fen,
            new_idempotency_key(session_id),
            "awaiting_verification" if awaiting_verification else "awaiting_confirmation",
        )
        return awaiting_id
    charge_id: int = await conn.fetchval(
        """WITH charge AS (
               INSERT INTO charges
                   (session_id, account_id, agreement_id, amount_fen, idempotency_key)
               VALUES ($1, $2, $3, $4, $5) RETURNING id)
           INSERT INTO outbox (kind, ref_id) SELECT 'charge', id FROM charge RETURNING ref_id""",
        session_id,
        account_id,
        agreement_id,
        amount_fen,
        new_idempotency_key(session_id),
    )
    await ledger.post(
        conn,
        "fee_accrued",
        accrual_lines(account_id, car_park_id, amount_fen),
        session_id=session_id,
        charge_id=charge_id,
    )
    return charge_id


@dataclass(frozen=True, slots=True)
class UnconfirmedCharge:
    charge_id: int
    session_id: int
    account_id: int
    car_park_id: int
    amount_fen: int


async def confirm(
    conn: asyncpg.Connection, charge_id: int, *, awaiting: str = "awaiting_confirmation"
) -> UnconfirmedCharge | None:
    """An operator confirmed a charge awaiting confirmation (or the second reader verified one
    `awaiting` 'awaiting_verification': `verified`): it becomes pending, its fee is accrued and
    its job queued, in the caller's transaction, once (conditional on its status: None when it
    was not awaiting so)."""
    row = await conn.fetchrow(
        """WITH c AS (
               UPDATE charges SET status = 'pending'
               WHERE id = $1 AND status = $2
               RETURNING id, session_id, account_id, amount_fen),
           job AS (INSERT INTO outbox (kind, ref_id) SELECT 'charge', id FROM c)
           SELECT c.id AS charge_id, c.session_id, c.account_id, s.car_park_id, c.amount_fen
           FROM c JOIN sessions s ON s.id = c.session_id""",
        charge_id,
        awaiting,
    )
    if row is None:
        return None
    charge = UnconfirmedCharge(**dict(row))
    await ledger.post(
        conn,
        "fee_accrued",
        accrual_lines(charge.account_id, charge.car_park_id, charge.amount_fen),
        session_id=charge.session_id,
        charge_id=charge.charge_id,
    )
    return charge


async def verified(
    conn: asyncpg.Connection, charge_id: int, verification: dict[str, Any]
) -> UnconfirmedCharge | None:
    """The second reader agreed with the stay's frames: the charge goes on as if confirmed
    (pending, accrued, queued, once). None when it was not awaiting verification."""
    charge = await confirm(conn, charge_id, awaiting="awaiting_verification")
    if charge is not None:
        await _record_verification(conn, charge_id, verification)
    return charge


async def refer_to_operator(
    conn: asyncpg.Connection, charge_id: int, verification: dict[str, Any]
) -> bool:
    """The second reader did not agree (or had no frame to read): the charge waits for an
    operator's confirmation with both frames, as any charge on doubtful reads. False when it
    was not awaiting verification."""
    status = await conn.fetchval(
        """UPDATE charges SET status = 'awaiting_confirmation', verification = $2
           WHERE id = $1 AND status = 'awaiting_verification' RETURNING status""",
        charge_id,
        verification,
    )
    return status is not None


async def _record_verification(
    conn: asyncpg.Connection, charge_id: int, verification: dict[str, Any]
) -> None:
    await conn.execute(
        "UPDATE charges SET verification = $2 WHERE id = $1", charge_id, verification
    )


async def discard_unconfirmed(conn: asyncpg.Connection, charge_id: int) -> UnconfirmedCharge | None:
    """A charge still awaiting confirmation (or verification) that is not owed after all (an
    operator rejected it, or agreed with the driver's "not my car"): it is deleted, as it was
    never booked nor sent to the provider, so that its stay, opened again, can be charged at
    its real exit. None when it no longer awaits."""
    row = await conn.fetchrow(
        """WITH c AS (
               DELETE FROM charges
               WHERE id = $1 AND status IN ('awaiting_confirmation', 'awaiting_verification')
               RETURNING id, session_id, account_id, amount_fen)
           SELECT c.id AS charge_id, c.session_id, c.account_id, s.car_park_id, c.amount_fen
           FROM c JOIN sessions s ON s.id = c.session_id""",
        charge_id,
    )
    return UnconfirmedCharge(**dict(row)) if row else None


def accrual_lines(account_id: int, car_park_id: int, amount_fen: int) -> list[tuple[str, int]]:
    """The fee accrued at a pay-later exit: the driver owes it, the car park earned it."""
    return [(ledger.receivable(account_id), amount_fen), (ledger.revenue(car_park_id), -amount_fen)]


def settlement_lines(provider: str, account_id: int, amount_fen: int) -> list[tuple[str, int]]:
    """A charge the provider collected: the driver's receivable moves to the provider's clearing."""
    return [(ledger.clearing(provider), amount_fen), (ledger.receivable(account_id), -amount_fen)]


async def load_job(conn: asyncpg.Connection, charge_id: int) -> ChargeJob | None:
    return await _load(conn, "c.id = $1", charge_id)


async def load_by_key(conn: asyncpg.Connection, idempotency_key: str) -> ChargeJob | None:
    """The charge a provider order belongs to, locked until the transaction ends."""
    return await _load(conn, "c.idempotency_key = $1", idempotency_key, lock=True)


async def _load(
    conn: asyncpg.Connection, where: str, value: object, *, lock: bool = False
) -> ChargeJob | None:
    lock_clause = "FOR UPDATE OF c" if lock else ""
    row = await conn.fetchrow(
        f"""SELECT c.id AS charge_id, c.session_id, c.account_id, s.car_park_id, c.amount_fen,
                  c.idempotency_key, c.status, c.attempts, a.agreement_no, a.provider,
                  s.plate, cp.name AS car_park_name, s.entered_at, s.exited_at,
                  s.plate_color, s.provider_parking_id, s.entry_capture_id
           FROM charges c
           JOIN pay_later_agreements a ON a.id = c.agreement_id
           JOIN sessions s ON s.id = c.session_id
           JOIN car_parks cp ON cp.id = s.car_park_id
           WHERE {where} {lock_clause}""",
        value,
    )
    return ChargeJob(**dict(row)) if row else None


async def mark_submitted(conn: asyncpg.Connection, charge_id: int, provider_ref: str) -> None:
    """The provider accepted the charge and will answer by notification (or order query)."""
    await conn.execute(
        """UPDATE charges SET submitted_at = COALESCE(submitted_at, now()), provider_ref = $2,
                  attempts = attempts + 1, last_error = NULL
           WHERE id = $1 AND status = 'pending'""",
        charge_id,
        provider_ref,
    )


async def mark_succeeded(
    conn: asyncpg.Connection,
    job: ChargeJob,
    provider_ref: str,
    provider_name: str,
    finished_at: datetime | None,
    *,
    advanced: bool = False,
) -> bool:
    """Records the provider's success once; False when it was already recorded. `advanced`:
    the provider paid in the driver's stead (垫资); booked alike (the car park is paid, the
    driver's receivable is cleared), and marked so."""
    updated = await conn.fetchval(
        """UPDATE charges SET status = 'succeeded', provider_ref = $2, settled_at = now(),
                  provider_finished_at = COALESCE($3, now()), last_error = NULL,
                  advanced_by_provider = $4
           WHERE id = $1 AND status = 'pending' RETURNING id""",
        job.charge_id,
        provider_ref,
        finished_at,
        advanced,
    )
    if updated is None:
        return False
    await ledger.post(
        conn,
        "charge_settled",
        settlement_lines(provider_name, job.account_id, job.amount_fen),
        session_id=job.session_id,
        charge_id=job.charge_id,
    )
    return True


async def mark_succeeded_late(
    conn: asyncpg.Connection,
    job: ChargeJob,
    provider_ref: str,
    provider_name: str,
    finished_at: datetime | None,
    *,
    advanced: bool = False,
) -> int | None:
    """The provider's success arrived after the charge was marked failed: the charge is
    booked as collected once (conditional on 'failed'), its debt is settled by it and the
    account's pay-later comes back when nothing else is open. Returns the fen collected twice
    (the debt had already been paid at a gate or in the app: owed back to the driver, on the
    overpaid account), 0 when the debt was still open, None when this news was booked before."""
    updated = await conn.fetchval(
        """UPDATE charges SET status = 'succeeded', provider_ref = $2, settled_at = now(),
                  provider_finished_at = COALESCE($3, now()), advanced_by_provider = $4
           WHERE id = $1 AND status = 'failed' RETURNING id""",
        job.charge_id,
        provider_ref,
        finished_at,
        advanced,
    )
    if updated is None:
        return None
    debt_was_open = await debts.settle_by_charge(conn, job.account_id, job.charge_id)
    credited = (
        ledger.receivable(job.account_id) if debt_was_open else ledger.overpaid(job.account_id)
    )
    await ledger.post(
        conn,
        "charge_settled",
        [(ledger.clearing(provider_name), job.amount_fen), (credited, -job.amount_fen)],
        session_id=job.session_id,
        charge_id=job.charge_id,
    )
    return 0 if debt_was_open else job.amount_fen


async def mark_collected_after_cancel(
    conn: asyncpg.Connection,
    job: ChargeJob,
    provider_ref: str,
    provider_name: str,
    finished_at: datetime | None,
) -> bool:
    """The provider collected a charge we had cancelled (its fee is not owed: its accrual was
    reversed): the money is booked once (conditional on 'cancelled' and not yet collected),
    owed back to the driver on their overpaid account; the charge stays cancelled and the
    caller asks for the refund. False when this news was booked before."""
    updated = await conn.fetchval(
        """UPDATE charges SET provider_ref = $2, settled_at = now(),
                  provider_finished_at = COALESCE($3, now())
           WHERE id = $1 AND status = 'cancelled' AND settled_at IS NULL RETURNING id""",
        job.charge_id,
        provider_ref,
        finished_at,
    )
    if updated is None:
        return False
    await ledger.post(
        conn,
        "charge_settled",
        [
            (ledger.clearing(provider_name), job.amount_fen),
            (ledger.overpaid(job.account_id), -job.amount_fen),
        ],
        session_id=job.session_id,
        charge_id=job.charge_id,
    )
    return True


async def mark_failed(conn: asyncpg.Connection, job: ChargeJob, reason: str) -> bool:
    """The charge finally failed: the fee becomes a debt (its receivable stays open in the
    ledger) and the account loses pay-later until the debt is settled."""
    updated = await conn.fetchval(
        """UPDATE charges SET status = 'failed', last_error = $2
           WHERE id = $1 AND status = 'pending' RETURNING id""",
        job.charge_id,
        reason,
    )
    if updated is None:
        return False
    await debts.open_debt(conn, job.account_id, job.charge_id, job.amount_fen)
    return True


async def record_attempt_error(conn: asyncpg.Connection, charge_id: int, error: str) -> None:
    await conn.execute(
        "UPDATE charges SET attempts = attempts + 1, last_error = $2 WHERE id = $1",
        charge_id,
        error,
    )


async def hold_for_operator(
    conn: asyncpg.Connection,
    job: ChargeJob,
    *,
    provider: str,
    code: str,
    http_status: int | None,
    reason: str,
) -> None:
    """The provider refused the charge for the car park's own reason (a bad request, its
    credentials, an unknown agreement or order, a conflicting key): the charge stays pending,
    no debt, the driver keeps pay-later; one open charge exception per charge waits for an
    operator to retry it (`retry_held`)."""
    await conn.execute(
        """UPDATE charges SET attempts = attempts + 1, last_error = $2, refused_at = now()
           WHERE id = $1 AND status = 'pending'""",
        job.charge_id,
        reason[:1000],
    )
    await conn.execute(
        """INSERT INTO charge_exceptions
               (charge_id, car_park_id, provider, http_status, code, reason)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (charge_id) WHERE status = 'open' DO NOTHING""",
        job.charge_id,
        job.car_park_id,
        provider,
        http_status,
        code[:100],
        reason[:1000],
    )


async def retry_held(conn: asyncpg.Connection, exception_id: int, actor: str) -> str | None:
    """An operator fixed what the provider refused: the exception is closed and, when the
    charge is still pending, sent again by the outbox worker (asking the provider first).
    Returns the exception's new status ('retried', or 'resolved' when the charge was settled
    meanwhile); None when it was not open. Runs in the caller's transaction; audit-logged."""
    row = await conn.fetchrow(
        """SELECT e.id, e.charge_id, c.status AS charge_status FROM charge_exceptions e
           JOIN charges c ON c.id = e.charge_id
           WHERE e.id = $1 AND e.status = 'open' FOR UPDATE OF e, c""",
        exception_id,
    )
    if row is None:
        return None
    status = "retried" if row["charge_status"] == "pending" else "resolved"
    await conn.execute(
        """UPDATE charge_exceptions SET status = $2, resolved_at = now(), resolved_by = $3
           WHERE id = $1""",
        exception_id,
        status,
        actor,
    )
    if status == "retried":
        # One outbox job per charge (unique): the finished (or dead) one is made due again,
        # with its attempt limit counted afresh (billing/queue.py).
        await conn.execute(
            """INSERT INTO outbox (kind, ref_id) VALUES ('charge', $1)
               ON CONFLICT (kind, ref_id) DO UPDATE
               SET done_at = NULL, dead_at = NULL, available_at = now(), locked_until = NULL,
                   last_error = NULL, attempts_at_retry = outbox.attempts""",
            row["charge_id"],
        )
    await audit.record(
        conn,
        actor,
        "charge_exception.retried" if status == "retried" else "charge_exception.resolved",
        f"charge:{row['charge_id']}",
        {"charge_exception_id": exception_id},
    )
    return status


# A pending charge no money can move for: never sent, or refused by the provider for the car
# park's own reason (`hold_for_operator`) and not sent since; never accepted. `{c}`: the
# charges row's alias.
NOT_WITH_PROVIDER = """({c}.submitted_at IS NULL
    AND ({c}.sent_at IS NULL OR {c}.refused_at IS NOT NULL))"""


async def begin_sending(conn: asyncpg.Connection, charge_id: int) -> bool:
    """Before the worker hands a charge to the provider: under the charge's row lock, False
    when it is no longer pending or a driver's open dispute holds it (one opened while the
    charge was not with the provider, whatever an operator's retry asked since); else records
    that it is being sent (`sent_at`). A dispute takes the same lock, so it either holds the
    charge before it is sent or finds it sent. Runs in the caller's transaction."""
    status = await conn.fetchval("SELECT status FROM charges WHERE id = $1 FOR UPDATE", charge_id)
    if status != "pending":
        return False
    # A statement of its own, after the lock: it sees a dispute committed while it waited.
    if await conn.fetchval(
        f"""SELECT 1 FROM charge_disputes d JOIN charges c ON c.id = d.charge_id
            WHERE d.charge_id = $1 AND d.status = 'open'
              AND (d.held OR {NOT_WITH_PROVIDER.format(c="c")})""",
        charge_id,
    ):
        return False
    await conn.execute(
        "UPDATE charges SET sent_at = now(), refused_at = NULL WHERE id = $1", charge_id
    )
    return True


async def send_again(conn: asyncpg.Connection, charge_id: int, in_flight: timedelta) -> bool:
    """`begin_sending` for a charge the provider was asked about and has no order of. When its
    last request was sent longer than `in_flight` ago, none can still take effect (a request
    our client gave up on may reach the provider late, for a while): the charge is with the
    provider no more, and a driver's dispute opened since holds it as it would have before the
    first send. Sooner, it is sent again under its key as before (one order whichever request
    lands). Runs in the caller's transaction."""
    await conn.execute(
        """UPDATE charges SET sent_at = NULL WHERE id = $1 AND status = 'pending'
             AND submitted_at IS NULL AND sent_at < now() - $2::interval""",
        charge_id,
        in_flight,
    )
    return await begin_sending(conn, charge_id)


async def release_held(conn: asyncpg.Connection, charge_id: int) -> None:
    """A held charge the operator let stand: its outbox job is due again (one per charge)."""
    await conn.execute(
        """INSERT INTO outbox (kind, ref_id) VALUES ('charge', $1)
           ON CONFLICT (kind, ref_id) DO UPDATE
           SET done_at = NULL, dead_at = NULL, available_at = now(), locked_until = NULL,
               last_error = NULL, attempts_at_retry = outbox.attempts""",
        charge_id,
    )


async def cancel_unsent(conn: asyncpg.Connection, charge_id: int, actor: str) -> ChargeJob | None:
    """A charge no money can move for (`NOT_WITH_PROVIDER`) is not owed after all (an operator
    agreed it was not the driver's car): cancelled once, its fee accrual reversed, and the
    provider's refusal waiting for an operator closed. None when the provider has it or may
    have it, or it is no longer pending. Runs in the caller's transaction."""
    cancelled = await conn.fetchval(
        f"""UPDATE charges c SET status = 'cancelled', last_error = NULL
            WHERE id = $1 AND status = 'pending' AND {NOT_WITH_PROVIDER.format(c="c")}
            RETURNING id""",
        charge_id,
    )
    if cancelled is None:
        return None
    await conn.execute(
        """UPDATE charge_exceptions SET status = 'resolved', resolved_at = now(), resolved_by = $2
           WHERE charge_id = $1 AND status = 'open'""",
        charge_id,
        actor,
    )
    return await reverse_accrual(conn, charge_id)


async def reverse_accrual(conn: asyncpg.Connection, charge_id: int) -> ChargeJob:
    """The charge's fee is not owed after all (cancelled before it was sent, or its debt
    waived): the accrual is reversed by a `fee_cancelled` transaction."""
    job = await load_job(conn, charge_id)
    assert job is not None
    await cancel_accrual(
        conn,
        job.account_id,
        job.car_park_id,
        job.amount_fen,
        session_id=job.session_id,
        charge_id=job.charge_id,
    )
    return job


async def cancel_accrual(
    conn: asyncpg.Connection,
    account_id: int,
    car_park_id: int,
    amount_fen: int,
    *,
    session_id: int,
    charge_id: int | None = None,
) -> None:
    """A fee accrued by `accrual_lines` is not owed after all: a `fee_cancelled` transaction
    reverses it (a charge's, or a missed stay's debt that has no charge)."""
    await ledger.post(
        conn,
        "fee_cancelled",
        [(line, -fen) for line, fen in accrual_lines(account_id, car_park_id, amount_fen)],
        session_id=session_id,
        charge_id=charge_id,
    )

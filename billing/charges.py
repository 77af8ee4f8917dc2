"""Charges: queued in the transaction that closes a stay, executed after the car has left.

`queue_charge` runs inside the caller's transaction (the lane's exit decision) and writes the
charge, the fee accrual in the ledger and the outbox job together; the charge worker picks the
job up after commit. One charge per session is enforced by the unique session_id.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from billing import debts, ledger


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


def new_idempotency_key(session_id: int) -> str:
    """Drawn once when the charge is queued and stored with it, so every retry reuses it; random
    so that keys stay unique at the provider across databases and deployments sharing one
    merchant account (a bare session id would collide)."""
    return f"s{session_id}-{uuid.uuid4().hex}"


async def queue_charge(
    conn: asyncpg.Connection,
    *,
    session_id: int,
    account_id: int,
    agreement_id: int,
    car_park_id: int,
    amount_fen: int,
) -> int:
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
                  s.plate, cp.name AS car_park_name, s.entered_at, s.exited_at
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
) -> bool:
    """Records the provider's success once; False when it was already recorded."""
    updated = await conn.fetchval(
        """UPDATE charges SET status = 'succeeded', provider_ref = $2, settled_at = now(),
                  provider_finished_at = COALESCE($3, now()), last_error = NULL
           WHERE id = $1 AND status = 'pending' RETURNING id""",
        job.charge_id,
        provider_ref,
        finished_at,
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

"""Merchant validations: a shop in a car park (a merchant, with a budget its car park company
gave it) validates a visitor's stay before the exit, with free minutes or an amount.

- Once per stay: a second validation of a stay by the same merchant with the same terms answers
  the first (idempotent, nothing spent again); any other is refused (409 `already_validated`).
- It costs the budget exactly what it takes off the fee, priced when it is given the way the
  exit prices the stay (billing.fees.stay_fee: the tariff's free period, its rounding and caps,
  the vehicle's rights): the stay's fee now less its fee now with the validation (free minutes:
  as if it had begun that much later; an amount: off the fee, never below 0). From then on it
  takes off that cost and never more (nor more than the fee), wherever the stay is priced (the
  exit, the QR code, the booth, the quote, the receipt): the budget pays once, when it is
  given, for what the driver gets; when the stay's fee is fixed lower than that (a right added
  since, a held stay ended at its hold price), what it did not take off goes back (`settle`).
  A validation that takes nothing off now (a fee of 0, a pass) is refused (409
  `not_validatable`): it would be a free one. One the budget cannot pay for is refused (409
  `budget_exhausted`) and changes nothing.
"""

from datetime import UTC, datetime

import asyncpg

from billing import audit, fees
from billing.rights import Validation as Terms
from parking.auth.principal import Principal
from parking.errors import AppError, NotFound
from parking.lanes import repository as lanes_repo
from parking.merchants import repository as repo
from parking.merchants.schemas import (
    Merchant,
    MerchantReport,
    NewMerchant,
    NewValidation,
    Validation,
)
from parking.rights.service import car_park_scope, company_of


def _merchant_of(principal: Principal) -> tuple[int, int]:
    if principal.merchant_id is None:  # MerchantDep lets only merchants' staff through
        raise AppError(403, "forbidden", "not a merchant's staff")
    return company_of(principal), principal.merchant_id


async def create(
    conn: asyncpg.Connection, principal: Principal, request: NewMerchant, password_hash: str
) -> Merchant:
    operator_id = company_of(principal)
    ids = await car_park_scope(conn, operator_id, request.car_parks)
    merchant_id = await repo.insert_merchant(
        conn,
        operator_id=operator_id,
        name=request.name,
        car_park_ids=ids,
        budget_fen=request.budget_fen,
        created_by=principal.actor,
    )
    if merchant_id is None:
        raise AppError(409, "merchant_exists", "the company has a merchant of that name")
    try:
        async with conn.transaction():
            user_id = await conn.fetchval(
                """INSERT INTO operator_users
                       (operator_id, email, name, role, password_hash, merchant_id)
                   VALUES ($1, $2, $3, 'merchant', $4, $5) RETURNING id""",
                operator_id,
                request.user.email.lower(),
                request.user.name,
                password_hash,
                merchant_id,
            )
    except asyncpg.UniqueViolationError as exc:
        raise AppError(409, "email_taken", "a user with that e-mail exists") from exc
    await audit.record(
        conn,
        principal.actor,
        "merchant.created",
        f"merchant:{merchant_id}",
        {"budget_fen": request.budget_fen, "user": f"operator_user:{user_id}"},
    )
    return await _merchant(conn, operator_id, merchant_id)


async def _merchant(conn: asyncpg.Connection, operator_id: int, merchant_id: int) -> Merchant:
    row = await repo.merchant(conn, operator_id, merchant_id)
    if row is None:
        raise NotFound("merchant")
    return Merchant(**dict(row))


async def list_merchants(conn: asyncpg.Connection, principal: Principal) -> list[Merchant]:
    return [Merchant(**dict(r)) for r in await repo.merchants(conn, company_of(principal))]


async def top_up(
    conn: asyncpg.Connection, principal: Principal, merchant_id: int, add_fen: int
) -> Merchant:
    operator_id = company_of(principal)
    if not await repo.top_up(conn, operator_id, merchant_id, add_fen):
        raise NotFound("merchant")
    await audit.record(
        conn, principal.actor, "merchant.budget_added", f"merchant:{merchant_id}", {"fen": add_fen}
    )
    return await _merchant(conn, operator_id, merchant_id)


async def me(conn: asyncpg.Connection, principal: Principal) -> Merchant:
    operator_id, merchant_id = _merchant_of(principal)
    return await _merchant(conn, operator_id, merchant_id)


async def _cost(conn: asyncpg.Connection, stay: asyncpg.Record, request: NewValidation) -> int:
    """What the validation takes off the stay's fee now, priced as the exit prices it (under
    the vehicle's rights as the exit reads them): its cost to the merchant's budget."""
    terms = await lanes_repo.stay_terms(conn, stay["id"])
    priced = fees.stay_fee(
        await fees.tariff_versions(conn, stay["car_park_id"]),
        entered_at=stay["entered_at"],
        at=max(datetime.now(UTC), stay["entered_at"]),
        plate_color=stay["plate_color"],
        fixed_fee_fen=None,
        rights=terms.rights,
        validation=Terms(0, request.free_minutes, request.amount_fen),
    )
    return priced.validation_fen if priced else 0


async def validate(
    conn: asyncpg.Connection, principal: Principal, request: NewValidation
) -> tuple[Validation, bool]:
    """The validation, and whether it was given now (False: it had been, identically)."""
    operator_id, merchant_id = _merchant_of(principal)
    stay = await repo.open_stay(
        conn,
        operator_id=operator_id,
        merchant_id=merchant_id,
        car_park_code=request.car_park,
        plate=request.plate,
        color=request.color,
    )
    if stay is None:
        raise NotFound("stay")
    if stay["fixed_fee_fen"] is not None:
        raise AppError(409, "not_validatable", "a stay without an entry record has a fixed fee")
    if stay["being_paid"]:
        # Its payment was priced without this validation: the driver would pay it all and the
        # budget pay again.
        raise AppError(409, "not_validatable", "the stay's fee is being paid at the gate")
    cost = await _cost(conn, stay, request)
    created = await repo.insert_validation(
        conn,
        merchant_id=merchant_id,
        session_id=stay["id"],
        car_park_id=stay["car_park_id"],
        free_minutes=request.free_minutes,
        amount_fen=request.amount_fen,
        cost_fen=cost,
        created_by=principal.actor,
    )
    found = await repo.validation(conn, session_id=stay["id"])
    assert found is not None
    if created is None:
        same = (
            found["merchant_id"] == merchant_id
            and found["free_minutes"] == request.free_minutes
            and found["amount_fen"] == request.amount_fen
        )
        if not same:
            raise AppError(409, "already_validated", "this stay has been validated already")
        return _validation(found), False
    # Both refusals raise after the insert: the request's transaction rolls it back.
    if cost == 0:
        raise AppError(
            409,
            "not_validatable",
            "the validation takes nothing off the stay's fee now",
            details={"cost_fen": 0},
        )
    if not await repo.spend(conn, merchant_id, cost):
        raise AppError(
            409,
            "budget_exhausted",
            "the merchant's budget cannot pay for this validation",
            details={"cost_fen": cost},
        )
    await audit.record(
        conn,
        principal.actor,
        "validation.given",
        f"validation:{created}",
        {"merchant_id": merchant_id, "session_id": stay["id"], "cost_fen": cost},
    )
    return _validation(found), True


async def settle(conn: asyncpg.Connection, session_id: int, taken_fen: int, actor: str) -> None:
    """The stay's fee is fixed, and its validation, if it has one, took `taken_fen` off it
    (billing.fees.StayFee.validation_fen): what it cost beyond that goes back to the merchant's
    budget. From then on it is worth what it took off, so the same close read again gives
    nothing back twice, and a stay reopened and closed again takes off no more than that."""
    found = await repo.validation_for_update(conn, session_id)
    if found is None or found["worth_fen"] <= taken_fen:
        return
    fen = found["worth_fen"] - taken_fen
    await repo.give_back(conn, found["id"], found["merchant_id"], fen)
    await audit.record(
        conn,
        actor,
        "validation.returned",
        f"validation:{found['id']}",
        {
            "merchant_id": found["merchant_id"],
            "session_id": session_id,
            "fen": fen,
            "taken_fen": taken_fen,
        },
    )


def _validation(row: asyncpg.Record) -> Validation:
    return Validation(**{k: v for k, v in row.items() if k != "merchant_id"})


async def list_validations(
    conn: asyncpg.Connection, principal: Principal, *, limit: int
) -> list[Validation]:
    _, merchant_id = _merchant_of(principal)
    return [_validation(r) for r in await repo.validations(conn, merchant_id, limit=limit)]


async def report(
    conn: asyncpg.Connection, principal: Principal, since: datetime, until: datetime
) -> list[MerchantReport]:
    rows = await repo.report(conn, company_of(principal), since, until)
    return [MerchantReport(**dict(r)) for r in rows]

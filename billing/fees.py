"""What a stay costs now: the tariff in force when it began, read from the database."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from billing.rights import Applied, RightTerms, Validation, best
from billing.tariff import Quote, Tariff

TariffVersions = list[tuple[datetime, Tariff]]


async def tariff_versions(conn: asyncpg.Connection, car_park_id: int) -> TariffVersions:
    """A car park's tariffs by effective date, newest first."""
    rows = await conn.fetch(
        """SELECT effective_from, rules FROM tariffs WHERE car_park_id = $1
           ORDER BY effective_from DESC""",
        car_park_id,
    )
    return [(r["effective_from"], Tariff.from_json(r["rules"])) for r in rows]


def tariff_at(versions: TariffVersions, at: datetime) -> Tariff | None:
    return next((tariff for since, tariff in versions if since <= at), None)


@dataclass(frozen=True, slots=True)
class StayFee:
    fee_fen: int
    # None for a fixed fee (a stay opened at the exit under the no-entry policy).
    quote: Quote | None
    # The right the fee was reduced by (billing/rights.py), with the tariff's fee without it.
    right: Applied | None = None
    # What a merchant's validation took off (after the right).
    validation_fen: int = 0


def stay_fee(
    versions: TariffVersions,
    *,
    entered_at: datetime,
    at: datetime,
    plate_color: str | None,
    fixed_fee_fen: int | None,
    rights: Sequence[RightTerms] = (),
    validation: Validation | None = None,
) -> StayFee | None:
    """None when the car park has no tariff for the stay (the gate holds for a person).

    `rights`: the vehicle's rights here; the one most favourable to the driver applies
    (billing.rights.best). `validation`: a merchant's, applied after the right. Being priced
    (no `cost_fen` yet): free minutes price the stay as if it had begun that much later (under
    the same right), an amount comes off the fee (never below 0); what that takes off is its
    cost to the merchant's budget. Once given it takes off what it cost, never more, and never
    more than the fee: a merchant's validation is worth to the driver exactly what the
    merchant's budget paid for it (the fee under the rights only grows with the stay). A fixed
    fee (no entry record) is never reduced."""
    if fixed_fee_fen is not None:
        return StayFee(fixed_fee_fen, None)
    tariff = tariff_at(versions, entered_at)
    if tariff is None:
        return None
    quote = tariff.quote(entered_at, at, plate_color)

    def interval_fee(start: datetime, end: datetime) -> int:
        return tariff.quote(start, end, plate_color).total_fen

    def under_rights(start: datetime, total: int) -> tuple[int, Applied | None]:
        if not rights or total == 0:
            return total, None
        applied = best(rights, interval_fee, start, at, total)
        return (applied.fee_fen if applied else total), applied

    fee, applied = under_rights(entered_at, quote.total_fen)
    if validation is None or fee == 0:
        return StayFee(fee, quote, applied)
    if validation.cost_fen is not None:
        taken = min(validation.cost_fen, fee)
        return StayFee(fee - taken, quote, applied, taken)
    validated = fee
    if validation.free_minutes is not None:
        begins = entered_at + timedelta(minutes=validation.free_minutes)
        validated = under_rights(begins, interval_fee(begins, at))[0] if at > begins else 0
    if validation.amount_fen is not None:
        validated = max(0, validated - validation.amount_fen)
    validated = min(validated, fee)
    return StayFee(validated, quote, applied, fee - validated)

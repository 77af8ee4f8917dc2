"""What a stay costs now: the tariff in force when it began, read from the database."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from billing.rights import Applied, RightTerms, best
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


def stay_fee(
    versions: TariffVersions,
    *,
    entered_at: datetime,
    at: datetime,
    plate_color: str | None,
    fixed_fee_fen: int | None,
    rights: Sequence[RightTerms] = (),
) -> StayFee | None:
    """None when the car park has no tariff for the stay (the gate holds for a person).
    `rights`: the vehicle's rights here; the one most favourable to the driver applies
    (billing.rights.best). A fixed fee (no entry record) is never reduced by a right."""
    if fixed_fee_fen is not None:
        return StayFee(fixed_fee_fen, None)
    tariff = tariff_at(versions, entered_at)
    if tariff is None:
        return None
    quote = tariff.quote(entered_at, at, plate_color)
    if not rights or quote.total_fen == 0:
        return StayFee(quote.total_fen, quote)
    applied = best(
        rights,
        lambda start, end: tariff.quote(start, end, plate_color).total_fen,
        entered_at,
        at,
        quote.total_fen,
    )
    return StayFee(applied.fee_fen if applied else quote.total_fen, quote, applied)

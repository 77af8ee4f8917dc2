"""The lane prices an exit by the tariff version the fee quote shows at that instant: a version
added while the lane holds the car park's tariffs in its cache is announced by the database and
the cache is dropped, instead of pricing by a version up to a minute stale."""

from datetime import UTC, datetime, timedelta

import httpx

from billing.tariff import Tariff
from parking.admin import repository as admin
from parking.runtime import Runtime
from tests.conftest import Lot, backdate_entry, eventually, make_driver, unique_plate
from tests.gates import GateProbe


async def test_a_new_tariff_version_prices_the_next_exit_as_the_quote_shows(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> None:
    # A first car leaves: the lane now holds this car park's tariffs (¥6 per started hour).
    first = await make_driver(runtime, unique_plate(), pay_later=False)
    await gate.decide(lot.code, "in1", gate.capture("in", first.plate))
    await backdate_entry(runtime, lot, first.plate, timedelta(minutes=30))
    held = await gate.decide(lot.code, "out1", gate.capture("out", first.plate))
    assert held["fee_fen"] == 600
    assert runtime.lanes.service.tariffs_cached(lot.id)

    # In force from an hour ago: the second car's 30-minute stay is priced by it.
    async with runtime.pool.acquire() as conn:
        await admin.create_tariff(
            conn,
            lot.id,
            effective_from=datetime.now(UTC) - timedelta(hours=1),
            tariff=Tariff.hourly(free_minutes=0, hourly_fen=1000, daily_cap_fen=5000),
        )

    async def dropped() -> bool:
        return not runtime.lanes.service.tariffs_cached(lot.id)

    await eventually(dropped)

    second = await make_driver(runtime, unique_plate(), pay_later=False)
    await gate.decide(lot.code, "in1", gate.capture("in", second.plate))
    await backdate_entry(runtime, lot, second.plate, timedelta(minutes=30))
    quote = await api.get(f"/api/v1/car-parks/{lot.code}/quote", params={"plate": second.plate})
    assert quote.status_code == 200, quote.text
    assert quote.json()["fee_fen"] == 1000
    command = await gate.decide(lot.code, "out1", gate.capture("out", second.plate))
    assert command["action"] == "hold"
    assert command["fee_fen"] == quote.json()["fee_fen"]

"""One contract for every payment provider adapter (billing.providers.PaymentProvider): the
sandbox and WeChat Pay Score parking (on its emulator) answer the same calls the same way."""

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from billing.providers import (
    InvalidNotification,
    OrderResult,
    ParkingDeduction,
    PaymentProvider,
    SandboxProvider,
)
from parking_dev import sandbox
from tests.conftest import eventually, unique_plate
from tests.test_wechat import _faults, rails


@contextlib.asynccontextmanager
async def adapter(kind: str) -> AsyncIterator[PaymentProvider]:
    if kind == "sandbox":
        secret = uuid.uuid4().hex
        faults = sandbox.FaultConfig(processing_delay_s=0.01)
        async with sandbox.running(faults, secret=secret) as (url, _):
            provider = SandboxProvider(url, secret=secret, notify_url=None)
            try:
                yield provider
            finally:
                await provider.aclose()
    else:
        async with rails(_faults()) as r:
            yield r.provider


@pytest.fixture(params=["sandbox", "wechat"])
async def provider(request: pytest.FixtureRequest) -> AsyncIterator[PaymentProvider]:
    async with adapter(request.param) as p:
        yield p


def _key(prefix: str = "s") -> str:
    return f"{prefix}{uuid.uuid4().hex[:20]}"


async def test_a_plate_with_the_service_open_is_usable(provider: PaymentProvider) -> None:
    plate = unique_plate()
    state = await provider.service_state(agreement_no=f"o-{plate}", plate=plate, color="blue")
    assert (state.plate, state.color, state.state, state.usable) == (plate, "blue", "normal", True)


async def test_an_entry_is_registered_once_per_number(provider: PaymentProvider) -> None:
    plate, number = unique_plate(), _key("e")
    entries = [
        await provider.register_entry(
            out_parking_no=number,
            plate=plate,
            color="blue",
            entered_at=datetime.now(UTC),
            car_park_name="城中街停车场",
            free_duration_s=0,
            agreement_no=f"o-{plate}",
        )
        for _ in range(2)
    ]
    assert entries[0] == entries[1] and entries[0].state == "normal"
    assert entries[0].out_parking_no == number


async def test_a_deduction_is_one_order_per_key_and_settles(provider: PaymentProvider) -> None:
    plate, key = unique_plate(), _key()
    exited = datetime.now(UTC)
    entry = await provider.register_entry(
        out_parking_no=_key("e"),
        plate=plate,
        color="blue",
        entered_at=exited - timedelta(hours=1),
        car_park_name="城中街停车场",
        free_duration_s=0,
        agreement_no=f"o-{plate}",
    )
    stay = ParkingDeduction(
        plate, "blue", exited - timedelta(hours=1), exited, "城中街停车场", entry.parking_id
    )

    async def deduct() -> OrderResult:
        return await provider.create_charge(
            out_trade_no=key,
            agreement_no=f"o-{plate}",
            amount_fen=600,
            description="parking 城中街停车场",
            parking=stay,
        )

    first, again = await deduct(), await deduct()
    assert (first.kind, first.out_trade_no, first.amount_fen) == ("charge", key, 600)
    assert again.provider_ref == first.provider_ref, "a retry with the key is the same order"

    async def settled() -> OrderResult | None:
        order = await provider.query(out_trade_no=key)
        return order if order is not None and order.final else None

    order = await eventually(settled)
    assert (order.status, order.amount_fen, order.advanced) == ("succeeded", 600, False)
    assert await provider.query(out_trade_no=_key()) is None

    refund = await provider.refund(
        out_refund_no=_key("r"), out_trade_no=key, amount_fen=200, reason="不是我的车"
    )
    assert (refund.kind, refund.amount_fen) == ("refund", 200)
    assert refund.status in ("processing", "succeeded")

    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    lines = {
        (line.kind, line.out_trade_no, line.amount_fen) for line in await provider.statement(today)
    }
    assert ("charge", key, 600) in lines


async def test_an_unsigned_notification_is_refused(provider: PaymentProvider) -> None:
    with pytest.raises(InvalidNotification):
        provider.parse_notification(b'{"type": "charge"}', {}, now=int(time.time()))


async def test_a_stand_in_says_so(provider: PaymentProvider) -> None:
    # The sandbox and an adapter pointed at an emulator are never the real rails.
    assert provider.is_stand_in is True

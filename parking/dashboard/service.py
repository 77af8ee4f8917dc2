"""The operator dashboard's data: today's summary of the operator's own car parks, and the live
feed of their occupancy and lane decisions (Redis pub/sub, filtered to the operator)."""

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import anyio
import asyncpg
import orjson
from pydantic import BaseModel, ValidationError

from billing import reports
from parking.dashboard import repository
from parking.dashboard.schemas import (
    CarParkLive,
    CarParkToday,
    DashboardSummary,
    HourlyTraffic,
    LaneDecided,
    OccupancyChanged,
    Snapshot,
)
from parking.lanes.worker import lane_events_channel
from parking.logging import get_logger
from parking.runtime import Runtime

log = get_logger(__name__)

# A comment line this often keeps proxies and browsers from closing an idle stream.
KEEPALIVE_S = 15.0
# How long closing the feed's Redis connection may take once the client has gone.
_CLOSE_TIMEOUT_S = 2.0


def _live(row: asyncpg.Record, occupied: int) -> CarParkLive:
    capacity: int = row["capacity"]
    return CarParkLive(
        code=row["code"],
        name=row["name"],
        capacity=capacity,
        occupied=occupied,
        free=max(0, capacity - occupied),
    )


async def summary(conn: asyncpg.Connection, runtime: Runtime, operator_id: int) -> DashboardSummary:
    timezone = runtime.settings.timezone
    today = datetime.now(ZoneInfo(timezone)).date()
    start = datetime.combine(today, time(), ZoneInfo(timezone))
    end = datetime.combine(today + timedelta(days=1), time(), ZoneInfo(timezone))
    rows = await repository.own_car_parks(conn, operator_id)
    ids = [r["id"] for r in rows]
    counts = await runtime.occupancy.get_many(ids)
    revenue = {
        r["car_park"]: r["net_fen"]
        for r in await reports.revenue(
            conn, start=today, end=today, timezone=timezone, car_park_ids=ids
        )
    }
    traffic = {
        r["hour"]: r for r in await repository.hourly_traffic(conn, ids, start, end, timezone)
    }
    return DashboardSummary(
        day=today,
        timezone=timezone,
        car_parks=[
            CarParkToday(
                **_live(r, counts[r["id"]]).model_dump(), revenue_fen=revenue.get(r["code"], 0)
            )
            for r in rows
        ],
        revenue_fen=sum(revenue.values()),
        hourly=[
            HourlyTraffic(
                hour=hour,
                entries=traffic[hour]["entries"] if hour in traffic else 0,
                exits=traffic[hour]["exits"] if hour in traffic else 0,
            )
            for hour in range(24)
        ],
        open_exceptions=await repository.open_exception_count(conn, ids),
    )


def _event(name: str, data: BaseModel) -> str:
    return f"event: {name}\ndata: {data.model_dump_json()}\n\n"


def _forward(
    runtime: Runtime, channel: str, data: str, own: Mapping[int, asyncpg.Record]
) -> str | None:
    """The feed event for a published message, or None when it is not the operator's."""
    if channel == runtime.occupancy.channel:
        raw_id, _, raw_occupied = data.partition(":")
        car_park = own.get(int(raw_id))
        if car_park is None:
            return None
        live = _live(car_park, int(raw_occupied))
        return _event(
            "occupancy",
            OccupancyChanged(
                car_park=live.code, occupied=live.occupied, free=live.free, capacity=live.capacity
            ),
        )
    decision = orjson.loads(data)
    car_park_id = decision.get("car_park_id") if isinstance(decision, dict) else None
    car_park = own.get(car_park_id) if isinstance(car_park_id, int) else None
    if car_park is None:
        return None
    return _event("lane", LaneDecided.model_validate({**decision, "car_park": car_park["code"]}))


async def live_events(
    runtime: Runtime, operator_id: int, keepalive_s: float = KEEPALIVE_S
) -> AsyncIterator[str]:
    """Server-sent events: a snapshot of the counts, then every occupancy change and lane
    decision of the operator's own car parks, and a keep-alive comment when idle.

    Car parks are the operator's as of the start of the stream. When the client goes, the
    response is cancelled and the pub/sub connection closed, which ends its subscriptions.
    """
    async with runtime.pool.acquire() as conn:
        own = {r["id"]: r for r in await repository.own_car_parks(conn, operator_id)}
    pubsub = runtime.redis.pubsub()
    try:
        await pubsub.subscribe(runtime.occupancy.channel, lane_events_channel(runtime.settings))
        # Counted after subscribing: a change in between arrives as an event as well.
        counts = await runtime.occupancy.get_many(list(own))
        yield _event("snapshot", Snapshot(car_parks=[_live(own[i], counts[i]) for i in own]))
        loop = asyncio.get_running_loop()
        keepalive_at = loop.time() + keepalive_s
        while True:
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=max(0.0, keepalive_at - loop.time())
            )
            if message is not None:
                try:
                    event = _forward(runtime, message["channel"], message["data"], own)
                except (ValueError, ValidationError):  # orjson's decode error is a ValueError
                    log.warning("dashboard.bad_feed_message", channel=message["channel"])
                    event = None
                if event is not None:
                    yield event
            # Checked after every message: other operators' traffic must not starve it.
            if loop.time() >= keepalive_at:
                yield ": keep-alive\n\n"
                keepalive_at = loop.time() + keepalive_s
    finally:
        # The response task is being cancelled: only a shielded await can still run.
        with anyio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
            await pubsub.aclose()

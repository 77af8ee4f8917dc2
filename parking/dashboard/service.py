"""The operator dashboard's data: today's summary of the operator's own car parks, and the live
feed of their occupancy and lane decisions (Redis pub/sub, filtered to the operator)."""

import asyncio
import math
import time as clock
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import orjson
from pydantic import BaseModel, ValidationError

from billing import reports
from parking.dashboard import repository
from parking.dashboard.feed import Feed
from parking.dashboard.schemas import (
    CarParkLive,
    CarParkToday,
    DashboardSummary,
    HourlyTraffic,
    LaneDecided,
    OccupancyChanged,
    Snapshot,
)
from parking.errors import AppError
from parking.logging import get_logger
from parking.runtime import Runtime

log = get_logger(__name__)

# A comment line this often keeps proxies and browsers from closing an idle stream.
KEEPALIVE_S = 15.0


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


def _end(reason: str) -> str:
    return f"event: end\ndata: {orjson.dumps({'reason': reason}).decode()}\n\n"


async def live_events(
    runtime: Runtime,
    feed: Feed,
    operator_id: int,
    *,
    keepalive_s: float = KEEPALIVE_S,
    expires_at: float | None = None,
    recheck_s: float | None = None,
    still_allowed: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[str]:
    """Server-sent events: a snapshot of the counts, then every occupancy change and lane
    decision of the operator's own car parks, and a keep-alive comment when idle.

    The stream ends, with an `end` event saying why, when the token expires (epoch seconds
    `expires_at`: `token_expired`), when `still_allowed` (asked every `recheck_s`) says the
    caller lost the right (`access_revoked`), or when it cannot keep up with the feed
    (`too_slow`, `feed_lost`). The page then reconnects with its current token.
    Car parks are the operator's as of the start of the stream.
    """
    async with runtime.pool.acquire() as conn:
        own = {r["id"]: r for r in await repository.own_car_parks(conn, operator_id)}
    async with feed.listen() as listener:
        # Counted after subscribing: a change in between arrives as an event as well.
        counts = await runtime.occupancy.get_many(list(own))
        yield _event("snapshot", Snapshot(car_parks=[_live(own[i], counts[i]) for i in own]))
        loop = asyncio.get_running_loop()
        keepalive_at = loop.time() + keepalive_s
        expires = loop.time() + (expires_at - clock.time()) if expires_at is not None else math.inf
        recheck_at = loop.time() + recheck_s if recheck_s is not None else math.inf
        while True:
            await listener.wait(min(keepalive_at, expires, recheck_at) - loop.time())
            if listener.ended is not None:
                yield _end(listener.ended)
                return
            while listener.messages:
                channel, data = listener.messages.popleft()
                try:
                    event = _forward(runtime, channel, data, own)
                except (ValueError, ValidationError):  # orjson's decode error is a ValueError
                    log.warning("dashboard.bad_feed_message", channel=channel)
                    event = None
                if event is not None:
                    yield event
            now = loop.time()
            if now >= expires:
                yield _end("token_expired")
                return
            if now >= recheck_at and still_allowed is not None:
                if not await still_allowed():
                    yield _end("access_revoked")
                    return
                recheck_at = loop.time() + (recheck_s or math.inf)
            # Checked after every message: other operators' traffic must not starve it.
            if loop.time() >= keepalive_at:
                yield ": keep-alive\n\n"
                keepalive_at = loop.time() + keepalive_s


# Claims one of a staff member's stream places, unless they hold `limit` live ones already.
# A place is live while its stream renews it (every recheck); a crashed process's places lapse.
# KEYS: the member's places; ARGV: now, lapse_s, limit, this stream's id.
_CLAIM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])))
return 1
"""


class TooManyStreams(AppError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            429,
            "too_many_streams",
            "this user has as many live dashboards open as allowed; close one",
            headers={"Retry-After": str(retry_after_s)},
        )


class StreamPlace:
    """One of a staff member's few concurrent streams, counted across every API process."""

    def __init__(self, runtime: Runtime, operator_user_id: int) -> None:
        settings = runtime.settings
        self.redis = runtime.redis
        self.key = f"{settings.redis_key_prefix}dashboard:streams:{operator_user_id}"
        self.id = uuid.uuid4().hex
        self.limit = settings.dashboard_streams_per_user
        self.lapse_s = 3 * max(settings.dashboard_recheck_s, KEEPALIVE_S)

    async def claim(self) -> None:
        claimed = await self.redis.register_script(_CLAIM)(
            keys=[self.key], args=[clock.time(), self.lapse_s, self.limit, self.id]
        )
        if not int(claimed):
            raise TooManyStreams(int(KEEPALIVE_S))

    async def renew(self) -> None:
        await self.redis.zadd(self.key, {self.id: clock.time()}, xx=True)
        await self.redis.expire(self.key, math.ceil(self.lapse_s))

    async def release(self) -> None:
        await self.redis.zrem(self.key, self.id)

"""Push feeds: APDS webhook subscriptions and the city platform's feed, delivered by the outbox
worker (`billing.queue`: retries with backoff, dead after PARKING_JOB_MAX_ATTEMPTS_FEED_DELIVERY).

- Stays starting and ending are queued by the database itself (migration 0030's trigger on
  `sessions`), in the transaction that changed the stay, for every live subscriber.
- Occupancy changes come from the occupancy counters' Redis channel (`OccupancyWatcher`): a car
  park's change queues one pending delivery per subscriber, due PARKING_FEED_OCCUPANCY_INTERVAL_S
  after the last one sent, and the count is read when it is sent (the latest). Changes while
  one is pending fold into it; a change that lands while one is being sent queues the next.
  A change missed while no worker listened is sent with the next change; a city platform
  also gets every car park's free spaces every PARKING_FEED_CITY_HEARTBEAT_S (a heartbeat),
  changed or not.
- Each delivery is one POST of JSON, signed like the provider's notifications
  (`billing.signing`: `X-Parking-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t." + body>`),
  with `X-Parking-Event-Id` (the delivery's id: the same on every retry, so a receiver drops
  repeats) and `X-Parking-Topic`. A 2xx answer is success; anything else is retried.
- An APDS subscription is paused after PARKING_FEED_PAUSE_AFTER_FAILURES failed attempts in a
  row: its deliveries are skipped until an admin resumes it (what it missed can be read with
  `modified_since`). The city platform's feed is never paused: its deliveries wait, and a dead
  one is listed with the company's dead jobs for an admin to retry.
"""

import asyncio
import contextlib
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from billing import audit, signing
from billing.queue import Job, RetryLater
from parking.apds.shapes import PLATE_COLOURS, occupancy_reference, session_view, time_of
from parking.auth.principal import Principal
from parking.errors import NotFound
from parking.feeds import repository as repo
from parking.feeds.schemas import (
    CityPlatform,
    CityPlatformChange,
    CreatedSubscription,
    EventSubscription,
    Subscription,
)
from parking.occupancy.service import Occupancy
from parking.settings import Settings

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Parking-Signature"
EVENT_ID_HEADER = "X-Parking-Event-Id"
TOPIC_HEADER = "X-Parking-Topic"

# Our topics under their APDS names (`EventTypeEnum`; OccupancyUpdated is ours: APDS v4 has no
# occupancy event) and under the city platform's.
APDS_TOPICS = {
    "SessionCreated": "session_started",
    "SessionUpdated": "session_ended",
    "OccupancyUpdated": "occupancy",
}
APDS_EVENT_TYPES = {topic: name for name, topic in APDS_TOPICS.items()}
CITY_EVENT_TYPES = {"session_started": "entry", "session_ended": "exit", "occupancy": "spaces"}
CITY_TOPICS = list(CITY_EVENT_TYPES)


class FeedSender:
    """The outbox handler of `feed_delivery` jobs."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        occupancy: Occupancy,
        settings: Settings,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.pool = pool
        self.occupancy = occupancy
        self.settings = settings
        self.zone = ZoneInfo(settings.timezone)
        self.client = client or httpx.AsyncClient(
            timeout=settings.feed_timeout_s, follow_redirects=False
        )
        self.sent = 0

    async def aclose(self) -> None:
        await self.client.aclose()

    async def deliver(self, job: Job) -> None:
        async with self.pool.acquire() as conn:
            delivery = await repo.delivery(conn, job.ref_id)
            if delivery is None or delivery["status"] in ("sent", "skipped"):
                return
            if delivery["deleted_at"] is not None or (
                delivery["paused_at"] is not None and delivery["format"] == "apds"
            ):
                await repo.skip(conn, delivery["id"])
                return
        occupied = (
            await self.occupancy.get(delivery["car_park_id"])
            if delivery["topic"] == "occupancy"
            else None
        )
        body = orjson.dumps(self._payload(delivery, occupied))
        error = await self._post(delivery, body)
        async with self.pool.acquire() as conn:
            if error is not None:
                paused = await repo.failed(
                    conn,
                    delivery["subscription_id"],
                    self.settings.feed_pause_after_failures
                    if delivery["format"] == "apds"
                    else None,
                )
            else:
                await repo.sent(conn, delivery["id"], delivery["subscription_id"], occupied)
        if error is not None:
            log.warning(
                "feed.delivery_failed",
                delivery_id=delivery["id"],
                subscription_id=delivery["subscription_id"],
                attempt=job.attempts,
                paused=paused is not None,
                error=error,
            )
            raise RetryLater(error, self.settings.feed_retry_base_s)
        self.sent += 1
        if occupied is not None and await self.occupancy.get(delivery["car_park_id"]) != occupied:
            # Changed while this one was on its way: the next one, after the interval.
            async with self.pool.acquire() as conn:
                await repo.queue_occupancy(
                    conn,
                    [delivery["car_park_id"]],
                    self.settings.feed_occupancy_interval_s,
                    delivery["subscription_id"],
                )

    async def dead(self, job: Job, error: str) -> None:
        async with self.pool.acquire() as conn:
            await repo.mark_dead(conn, job.ref_id)

    async def _post(self, delivery: asyncpg.Record, body: bytes) -> str | None:
        """None when the subscriber took it, else why not."""
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signing.sign(delivery["secret"], body, int(time.time())),
            EVENT_ID_HEADER: str(delivery["id"]),
            TOPIC_HEADER: delivery["topic"],
        }
        try:
            answer = await self.client.post(delivery["endpoint"], content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        if 200 <= answer.status_code < 300:
            return None
        return f"HTTP {answer.status_code}"

    def _payload(self, delivery: asyncpg.Record, occupied: int | None) -> dict[str, Any]:
        if delivery["format"] == "apds":
            return self._apds(delivery, occupied)
        return self._city(delivery, occupied)

    def _apds(self, delivery: asyncpg.Record, occupied: int | None) -> dict[str, Any]:
        now = datetime.now(UTC)
        if occupied is not None:
            data = occupancy_reference(delivery, occupied, now)
        else:
            stay = {
                "id": delivery["session_id"],
                "plate": delivery["plate"],
                "plate_color": delivery["plate_color"],
                "entered_at": delivery["entered_at"],
                # As the event says: an end has its exit, a start none (even when the stay
                # has ended since it was queued).
                "exited_at": delivery["exited_at"]
                if delivery["topic"] == "session_ended"
                else None,
                "car_park": delivery["code"],
                "car_park_version": delivery["version"],
            }
            data = session_view(stay, delivery["operator_id"])
        return {
            "id": str(delivery["id"]),
            "timestamp": time_of(now),
            "type": APDS_EVENT_TYPES[delivery["topic"]],
            "data": data,
        }

    def _local(self, value: datetime) -> str:
        return value.astimezone(self.zone).strftime("%Y-%m-%d %H:%M:%S")

    def _city(self, delivery: asyncpg.Record, occupied: int | None) -> dict[str, Any]:
        """The shape city parking platforms take: one flat event, local times."""
        closed = delivery["closed_at"] is not None
        payload: dict[str, Any] = {
            "eventId": str(delivery["id"]),
            "eventType": CITY_EVENT_TYPES[delivery["topic"]],
            "parkCode": delivery["code"],
            "parkName": delivery["name"],
            "eventTime": self._local(
                delivery["event_at"] if occupied is None else datetime.now(UTC)
            ),
            "totalSpaces": delivery["capacity"],
            "closed": closed,
        }
        if occupied is not None:
            payload["occupiedSpaces"] = occupied
            payload["freeSpaces"] = 0 if closed else max(0, delivery["capacity"] - occupied)
            return payload
        payload["plateNo"] = delivery["plate"]
        payload["plateColor"] = PLATE_COLOURS.get(delivery["plate_color"], delivery["plate_color"])
        payload["entryTime"] = self._local(delivery["entered_at"])
        if delivery["topic"] == "session_ended" and delivery["exited_at"] is not None:
            payload["exitTime"] = self._local(delivery["exited_at"])
            payload["feeFen"] = delivery["fee_fen"]
        return payload


class OccupancyWatcher:
    """Queues occupancy deliveries for the car parks whose counters changed (the counters'
    Redis channel), every `flush_s` at most, in one statement."""

    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool,
        channel: str,
        settings: Settings,
        flush_s: float = 0.2,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.channel = channel
        self.settings = settings
        self.flush_s = flush_s
        # Set while subscribed (tests wait for it).
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self.ready.set()
                await self._watch(pubsub)
            except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.exception("feed.occupancy_watch_failed")
                self.ready.clear()
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _watch(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        changed: set[int] = set()
        flush_at = loop.time() + self.flush_s
        # The first beat one interval after the start (not a burst at every restart).
        last_beat = loop.time()
        while True:
            beat = self.settings.feed_city_heartbeat_s
            if beat > 0 and loop.time() >= last_beat + beat:
                # Every car park's free spaces to each city platform, changed or not.
                last_beat = loop.time()
                async with self.pool.acquire() as conn:
                    await repo.queue_occupancy(
                        conn, None, self.settings.feed_occupancy_interval_s, format="city"
                    )
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.flush_s)
            if message is not None:
                car_park, _, _ = str(message["data"]).partition(":")
                if car_park.isdigit():
                    changed.add(int(car_park))
            if changed and loop.time() >= flush_at:
                async with self.pool.acquire() as conn:
                    await repo.queue_occupancy(
                        conn, sorted(changed), self.settings.feed_occupancy_interval_s
                    )
                changed.clear()
            if loop.time() >= flush_at:
                flush_at = loop.time() + self.flush_s


# ===== Subscriptions (the routes) =====


def _view(row: asyncpg.Record) -> Subscription:
    return Subscription(
        id=row["public_id"],
        endpoint=row["endpoint"],
        topics=[APDS_EVENT_TYPES[t] for t in row["topics"]],
        places=row["car_parks"],
        paused=row["paused_at"] is not None,
        paused_at=row["paused_at"],
        consecutive_failures=row["consecutive_failures"],
        created_at=row["created_at"],
    )


def _operator_id(principal: Principal) -> int:
    assert principal.operator_id is not None
    return principal.operator_id


async def subscribe(
    conn: asyncpg.Connection, principal: Principal, wanted: EventSubscription
) -> CreatedSubscription:
    operator_id = _operator_id(principal)
    car_park_ids: list[int] | None = None
    if wanted.places is not None:
        own = await repo.own_car_park_ids(conn, operator_id, wanted.places)
        unknown = sorted(set(wanted.places) - set(own))
        if unknown:
            # Another company's car park is as unknown as one that does not exist.
            raise NotFound("place")
        car_park_ids = sorted(set(own.values()))
    secret = "whsec_" + secrets.token_urlsafe(32)
    row = await repo.create(
        conn,
        operator_id=operator_id,
        format="apds",
        endpoint=str(wanted.endpoint),
        secret=secret,
        topics=sorted({APDS_TOPICS[t] for t in wanted.topics}),
        car_park_ids=car_park_ids,
    )
    await audit.record(
        conn,
        principal.actor,
        "feed.subscribed",
        f"feed_subscription:{row['id']}",
        {"endpoint": row["endpoint"], "topics": list(row["topics"]), "places": wanted.places},
    )
    return CreatedSubscription(message="subscription created", id=row["public_id"], secret=secret)


async def subscriptions(conn: asyncpg.Connection, principal: Principal) -> list[Subscription]:
    return [_view(r) for r in await repo.subscriptions(conn, _operator_id(principal), "apds")]


async def unsubscribe(
    conn: asyncpg.Connection, principal: Principal, subscription_id: uuid.UUID
) -> None:
    row = await repo.delete(conn, _operator_id(principal), "apds", subscription_id)
    if row is None:
        raise NotFound("subscription")
    await audit.record(
        conn, principal.actor, "feed.unsubscribed", f"feed_subscription:{row['id']}", {}
    )


async def resume(
    conn: asyncpg.Connection, principal: Principal, subscription_id: uuid.UUID
) -> Subscription:
    row = await repo.resume(conn, _operator_id(principal), subscription_id)
    if row is None:
        raise NotFound("subscription")
    await audit.record(conn, principal.actor, "feed.resumed", f"feed_subscription:{row['id']}", {})
    return _view(row)


def _city_view(row: asyncpg.Record) -> CityPlatform:
    return CityPlatform(
        endpoint=row["endpoint"],
        topics=[CITY_EVENT_TYPES[t] for t in row["topics"]],
        consecutive_failures=row["consecutive_failures"],
        created_at=row["created_at"],
    )


async def city_platform(conn: asyncpg.Connection, principal: Principal) -> CityPlatform | None:
    rows = await repo.subscriptions(conn, _operator_id(principal), "city")
    return _city_view(rows[0]) if rows else None


async def set_city_platform(
    conn: asyncpg.Connection, principal: Principal, change: CityPlatformChange
) -> CityPlatform:
    """Replaces the company's city platform (deliveries queued for the old one still go to
    it)."""
    operator_id = _operator_id(principal)
    await repo.delete(conn, operator_id, "city")
    row = await repo.create(
        conn,
        operator_id=operator_id,
        format="city",
        endpoint=str(change.endpoint),
        secret=change.key.get_secret_value(),
        topics=CITY_TOPICS,
        car_park_ids=None,
    )
    await audit.record(
        conn,
        principal.actor,
        "feed.city_platform_set",
        f"feed_subscription:{row['id']}",
        {"endpoint": row["endpoint"]},
    )
    return _city_view(row)


async def remove_city_platform(conn: asyncpg.Connection, principal: Principal) -> None:
    """Idempotent: removing none is not an error."""
    row = await repo.delete(conn, _operator_id(principal), "city")
    if row is None:
        return
    await audit.record(
        conn, principal.actor, "feed.city_platform_removed", f"feed_subscription:{row['id']}", {}
    )

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
- The feeds' outbox worker hands the sender a batch of deliveries at once: read in one
  statement, sent with up to PARKING_FEED_CONCURRENCY POSTs in flight over kept-alive
  connections, written back in one. A subscriber gets a stay's start before its end: the end
  waits (is tried again at the start's next try) while the start is pending, in the batch or
  out of it, and waiting is no attempt of its own (`billing.queue.Waiting`): the end goes
  dead only with its start, and an admin's retry of either retries both. Different stays go
  side by side. APDS v4 defines no batch of events per POST, so there is
  none: one event, one POST.
- Endpoints must be public addresses (`parking.feeds.addresses`): checked when set, and at
  every delivery by the resolver the connections are made with.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from billing import audit, signing
from billing.queue import Job, RetryLater, Waiting
from parking.apds.shapes import PLATE_COLOURS, occupancy_reference, session_view, time_of
from parking.auth.principal import Principal
from parking.errors import NotFound
from parking.feeds import repository as repo
from parking.feeds.addresses import CheckedResolver, EndpointRefused, check_endpoint, check_literal
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
WAITS_FOR_START = "waits for the stay's start to be delivered"


# A delivery's place in its subscriber's order: a stay's start and end go one after the other;
# different stays (and car parks' counts) go side by side.
OrderKey = tuple[int, str, int]


@dataclass(slots=True)
class _Outcome:
    """What a batch's sending came to, written back in a few statements."""

    job_ids: list[int] = field(default_factory=list)
    sent: list[tuple[int, int | None]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    took: list[int] = field(default_factory=list)
    # Failed attempts per subscription (counted towards its pause), and which of them are
    # APDS subscriptions (paused after failures in a row; the city platform never is).
    failures: dict[int, int] = field(default_factory=dict)
    pausable: set[int] = field(default_factory=set)
    retry: dict[int, RetryLater] = field(default_factory=dict)
    # Occupancy deliveries sent: (subscription, car park, the count sent).
    counts: list[tuple[int, int, int]] = field(default_factory=list)


class FeedSender:
    """The outbox's batch handler of `feed_delivery` jobs: a batch is read in one statement,
    sent with up to PARKING_FEED_CONCURRENCY POSTs in flight over kept-alive connections (a
    stay's start before its end, per subscriber), and written back in one."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        occupancy: Occupancy,
        settings: Settings,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.pool = pool
        self.occupancy = occupancy
        self.settings = settings
        self.zone = ZoneInfo(settings.timezone)
        # Made in the running loop when first needed (aiohttp binds it to the loop).
        self._session = session
        self._in_flight = asyncio.Semaphore(settings.feed_concurrency)
        self.sent = 0

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=CheckedResolver(self.settings),
                limit=self.settings.feed_concurrency,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.settings.feed_timeout_s),
                # Answers are read only for their status.
                auto_decompress=False,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def deliver_batch(self, jobs: list[Job]) -> dict[int, RetryLater]:
        """Sends the jobs' deliveries; returns the jobs to try again later (by job id); the
        others are done."""
        async with self.pool.acquire() as conn:
            rows = await repo.deliveries(conn, [job.ref_id for job in jobs])
        found = {row["id"]: row for row in rows}
        outcome = _Outcome()
        orders: dict[OrderKey, list[tuple[Job, asyncpg.Record]]] = {}
        for job in sorted(jobs, key=lambda j: j.ref_id):
            delivery = found.get(job.ref_id)
            if delivery is None or delivery["status"] in ("sent", "skipped"):
                outcome.job_ids.append(job.id)
            elif delivery["deleted_at"] is not None or (
                delivery["paused_at"] is not None and delivery["format"] == "apds"
            ):
                outcome.job_ids.append(job.id)
                outcome.skipped.append(delivery["id"])
            elif delivery["start_pending"]:
                # Not an attempt: the end waits as long as its start is tried, and goes dead
                # with it (`dead`).
                outcome.retry[job.id] = Waiting(
                    WAITS_FOR_START, self.settings.feed_retry_base_s, delivery["start_due_at"]
                )
            else:
                key: OrderKey = (
                    (delivery["subscription_id"], "stay", delivery["session_id"])
                    if delivery["session_id"] is not None
                    else (delivery["subscription_id"], "count", delivery["car_park_id"])
                )
                orders.setdefault(key, []).append((job, delivery))
        # The latest counts, read once for the batch (the occupancy counters' Redis).
        counted = sorted(
            {
                d["car_park_id"]
                for order in orders.values()
                for _, d in order
                if d["topic"] == "occupancy"
            }
        )
        counts = await self.occupancy.get_many(counted)
        await asyncio.gather(
            *(self._send_in_order(order, counts, outcome) for order in orders.values())
        )
        async with self.pool.acquire() as conn:
            await repo.finish(conn, outcome.job_ids, outcome.sent, outcome.skipped, outcome.took)
            for subscription_id, attempts in outcome.failures.items():
                pause_after = (
                    self.settings.feed_pause_after_failures
                    if subscription_id in outcome.pausable
                    else None
                )
                await repo.failed(conn, subscription_id, attempts, pause_after)
        await self._count_changed_since(outcome.counts)
        return outcome.retry

    async def _send_in_order(
        self, order: list[tuple[Job, asyncpg.Record]], counts: dict[int, int], outcome: _Outcome
    ) -> None:
        """One subscriber's deliveries of one stay (or one car park's count), in order: once
        one fails, the rest wait for it."""
        failed: str | None = None
        for job, delivery in order:
            if failed is not None:
                outcome.retry[job.id] = Waiting(WAITS_FOR_START, self.settings.feed_retry_base_s)
                continue
            occupied = counts[delivery["car_park_id"]] if delivery["topic"] == "occupancy" else None
            body = orjson.dumps(self._payload(delivery, occupied))
            async with self._in_flight:
                failed = await self._post(delivery, body)
            subscription_id = delivery["subscription_id"]
            if failed is None:
                self.sent += 1
                outcome.job_ids.append(job.id)
                outcome.sent.append((delivery["id"], occupied))
                outcome.took.append(subscription_id)
                if occupied is not None:
                    outcome.counts.append((subscription_id, delivery["car_park_id"], occupied))
                continue
            outcome.failures[subscription_id] = outcome.failures.get(subscription_id, 0) + 1
            if delivery["format"] == "apds":
                outcome.pausable.add(subscription_id)
            outcome.retry[job.id] = RetryLater(failed, self.settings.feed_retry_base_s)
            log.warning(
                "feed.delivery_failed",
                delivery_id=delivery["id"],
                subscription_id=subscription_id,
                attempt=job.attempts,
                error=failed,
            )

    async def _count_changed_since(self, counts: list[tuple[int, int, int]]) -> None:
        """A count that changed while it was on its way: the next one, after the interval."""
        now = await self.occupancy.get_many(sorted({car_park_id for _, car_park_id, _ in counts}))
        for subscription_id, car_park_id, occupied in counts:
            if now[car_park_id] != occupied:
                async with self.pool.acquire() as conn:
                    await repo.queue_occupancy(
                        conn,
                        [car_park_id],
                        self.settings.feed_occupancy_interval_s,
                        subscription_id,
                    )

    async def dead(self, job: Job, error: str) -> None:
        """The delivery dead; a stay's start takes the ends waiting for it with it (an admin's
        retry of either retries both: `retried`)."""
        async with self.pool.acquire() as conn:
            ends = await repo.mark_dead(conn, job.ref_id, f"its stay's start is dead: {error}")
        if ends:
            log.warning("feed.ends_dead_with_start", delivery_id=job.ref_id, ends=ends)

    async def _post(self, delivery: asyncpg.Record, body: bytes) -> str | None:
        """None when the subscriber took it, else why not."""
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signing.sign(delivery["secret"], body, int(time.time())),
            EVENT_ID_HEADER: str(delivery["id"]),
            TOPIC_HEADER: delivery["topic"],
        }
        try:
            check_literal(delivery["endpoint"], self.settings.feed_allow_loopback)
            async with self._client().post(
                delivery["endpoint"], data=body, headers=headers, allow_redirects=False
            ) as answer:
                status = answer.status
                # Read (a little of) the answer, so that its connection is kept for the next.
                await answer.content.read(65536)
        except EndpointRefused as exc:
            return exc.message
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"

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
                "assigned_right_id": delivery["assigned_right_id"],
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
    conn: asyncpg.Connection,
    principal: Principal,
    wanted: EventSubscription,
    settings: Settings,
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
    await check_endpoint(str(wanted.endpoint), settings.feed_allow_loopback)
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
    conn: asyncpg.Connection,
    principal: Principal,
    change: CityPlatformChange,
    settings: Settings,
) -> CityPlatform:
    """Replaces the company's city platform (deliveries queued for the old one still go to
    it)."""
    operator_id = _operator_id(principal)
    await check_endpoint(str(change.endpoint), settings.feed_allow_loopback)
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

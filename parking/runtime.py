"""Wires the running system together: pools and clients, the lane worker, the outbox worker.

Used by `parking serve`, `parking demo` and the tests, so all three run the same code paths.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from billing.notifications import DevNotifier
from billing.providers import PaymentProvider, SandboxProvider
from billing.worker import OutboxWorker
from gate_controller.mqtt import MqttClient
from parking.db import create_pool
from parking.infra import Endpoints
from parking.lanes.worker import LaneWorker
from parking.migrate import migrate
from parking.occupancy.service import Occupancy
from parking.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    endpoints: Endpoints
    pool: asyncpg.Pool
    redis: Redis
    mqtt: MqttClient
    occupancy: Occupancy
    lanes: LaneWorker
    outbox: OutboxWorker
    notifier: DevNotifier


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    endpoints: Endpoints,
    provider_url: str,
    *,
    provider: PaymentProvider | None = None,
    lanes: bool = True,
    outbox_worker: bool = True,
) -> AsyncIterator[Runtime]:
    """Starts the system against `endpoints`: the lane service and the charge/notification
    worker, or either alone (`parking worker` runs the outbox worker in its own process)."""
    pool = await create_pool(endpoints.database_url, min_size=2, max_size=20, stateless=True)
    # The outbox worker has its own connections so that charging never delays a gate.
    worker_pool = await create_pool(endpoints.database_url, min_size=1, max_size=4)
    redis = Redis.from_url(endpoints.redis_url, decode_responses=True)
    mqtt = MqttClient(
        endpoints.mqtt_url, settings.mqtt_client_id, ack_timeout_s=settings.mqtt_ack_timeout_s
    )
    provider = provider or SandboxProvider(provider_url)
    notifier = DevNotifier()
    tasks: list[asyncio.Task[None]] = []
    lane_worker: LaneWorker | None = None
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        occupancy = Occupancy(redis, pool, settings.redis_key_prefix)
        if lanes:
            await mqtt.start()
        lane_worker = LaneWorker(settings, pool, mqtt, occupancy)
        outbox = OutboxWorker(
            worker_pool,
            provider,
            notifier,
            timezone=settings.timezone,
            max_attempts=settings.charge_max_attempts,
            retry_base_s=settings.charge_retry_base_s,
            poll_interval_s=settings.worker_poll_interval_s,
        )
        if lanes:
            await occupancy.rebuild_all()
            await lane_worker.start()
        if outbox_worker:
            tasks.append(asyncio.create_task(outbox.run()))
        yield Runtime(
            settings, endpoints, pool, redis, mqtt, occupancy, lane_worker, outbox, notifier
        )
    finally:
        if lane_worker is not None:
            await lane_worker.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await mqtt.stop()
        await provider.aclose()
        await redis.aclose()
        await worker_pool.close()
        await pool.close()

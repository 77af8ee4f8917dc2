"""Wires the running system together: pools and clients, the lane worker, the outbox worker.

Used by `parking serve`, `parking-dev demo` and the tests, so all three run the same code paths.
"""

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import asyncpg
from redis.asyncio import Redis

from billing.notifications import DevNotifier, Notifier
from billing.providers import PaymentProvider, SandboxProvider
from billing.wechat import WeChatCredentials, WeChatParkingProvider
from billing.worker import OutboxWorker
from gate_controller.mqtt import MqttClient
from parking.auth.apikeys import ApiKeyCache
from parking.auth.sms import DevSms, SmsSender
from parking.booth import ghosts
from parking.db import create_pool
from parking.feeds.service import FeedSender, OccupancyWatcher
from parking.gates import config as gate_configs
from parking.gates.events import GateEventRecorder
from parking.infra import Endpoints
from parking.lanes.verify import ChargeVerifier
from parking.lanes.worker import LaneWorker
from parking.migrate import migrate
from parking.occupancy.service import Occupancy
from parking.partitions import service as partitions
from parking.payments.service import release_gate
from parking.production import ConfigurationError
from parking.retention import service as retention
from parking.settings import Settings
from parking.sms import service as sms_service

if TYPE_CHECKING:
    from parking_dev import sandbox

NOTIFY_PATH = "/api/v1/payments/notifications/{provider}"


@dataclass(frozen=True, slots=True)
class ProviderEndpoint:
    url: str
    secret: str
    # "wechat": WeChat Pay v3 at `url` with these keys (`secret` unused).
    kind: Literal["sandbox", "wechat"] = "sandbox"
    credentials: WeChatCredentials | None = None


@contextlib.asynccontextmanager
async def payment_provider(
    settings: Settings, faults: "sandbox.FaultConfig | None" = None
) -> AsyncIterator[ProviderEndpoint]:
    """The configured provider, or a sandbox (or WeChat Pay emulator) served in-process (a
    laptop run, the demo) when the development tools are installed."""
    if settings.payment_provider == "wechat":
        async with _wechat(settings, faults) as endpoint:
            yield endpoint
        return
    if settings.payment_provider_url:
        if settings.payment_provider_secret is None:
            raise ConfigurationError(
                "PARKING_PAYMENT_PROVIDER_SECRET is required with PARKING_PAYMENT_PROVIDER_URL"
            )
        secret = settings.payment_provider_secret.get_secret_value()
        yield ProviderEndpoint(settings.payment_provider_url, secret)
        return
    if settings.env == "production":
        raise ConfigurationError(
            "PARKING_PAYMENT_PROVIDER_URL is not set: production never takes money through "
            "the in-process sandbox provider"
        )
    try:
        from parking_dev import sandbox
    except ImportError:
        raise ConfigurationError(
            "PARKING_PAYMENT_PROVIDER_URL is not set and the sandbox provider is not installed "
            "(it comes with the development tools: pip install ./devtools)"
        ) from None
    secret = secrets.token_hex(16)
    # Its orders live beside the embedded database, so they outlast a restart like a real
    # provider's books do (and reconcile against ours).
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    orders = str(settings.data_dir / "sandbox-provider.sqlite3")
    async with sandbox.running(faults, secret=secret, db_path=orders) as (url, _):
        yield ProviderEndpoint(url, secret)


@contextlib.asynccontextmanager
async def _wechat(
    settings: Settings, faults: "sandbox.FaultConfig | None"
) -> AsyncIterator[ProviderEndpoint]:
    missing = settings.wechat_missing()
    if settings.wechat_configured():
        if missing:
            raise ConfigurationError("WeChat Pay needs " + ", ".join(missing))
        yield ProviderEndpoint(
            settings.wechat_api_url, "", kind="wechat", credentials=wechat_credentials(settings)
        )
        return
    if settings.env == "production":
        raise ConfigurationError(
            "WeChat Pay needs " + ", ".join(missing) + ": production never takes money "
            "through the WeChat Pay emulator"
        )
    try:
        from parking_dev import wechat as emulator
    except ImportError:
        raise ConfigurationError(
            "WeChat Pay needs " + ", ".join(missing) + " (the emulator that stands in for it on "
            "a laptop comes with the development tools: pip install ./devtools)"
        ) from None
    config = emulator.EmulatorConfig(faults=faults) if faults else None
    async with emulator.running(config) as (url, running_emulator):
        yield ProviderEndpoint(url, "", kind="wechat", credentials=running_emulator.credentials())


def wechat_credentials(settings: Settings) -> WeChatCredentials:
    """The merchant's WeChat Pay keys from the settings (read from their files)."""
    assert settings.wechat_private_key_path is not None and settings.wechat_apiv3_key is not None
    public_key = settings.wechat_platform_public_key_path
    return WeChatCredentials(
        mchid=settings.wechat_mchid or "",
        appid=settings.wechat_appid or "",
        cert_serial_no=settings.wechat_cert_serial_no or "",
        private_key_pem=settings.wechat_private_key_path.read_text(),
        apiv3_key=settings.wechat_apiv3_key.get_secret_value(),
        platform_public_key_pem=public_key.read_text() if public_key else None,
        platform_public_key_id=settings.wechat_platform_public_key_id,
        platform_cert_dir=(
            str(settings.wechat_platform_cert_dir) if settings.wechat_platform_cert_dir else None
        ),
        app_secret=(
            settings.wechat_app_secret.get_secret_value() if settings.wechat_app_secret else ""
        ),
        login_url=settings.wechat_login_url,
    )


def make_provider(settings: Settings, endpoint: ProviderEndpoint) -> PaymentProvider:
    if endpoint.kind == "wechat":
        assert endpoint.credentials is not None
        return WeChatParkingProvider(
            endpoint.credentials,
            notify_url=settings.public_base_url.rstrip("/") + NOTIFY_PATH.format(provider="wechat"),
            base_url=endpoint.url,
            timeout_s=settings.payment_provider_timeout_s,
            timezone=settings.timezone,
        )
    notify_url = settings.public_base_url.rstrip("/") + NOTIFY_PATH.format(provider="sandbox")
    return SandboxProvider(
        endpoint.url,
        secret=endpoint.secret,
        notify_url=notify_url,
        timeout_s=settings.payment_provider_timeout_s,
    )


@dataclass
class Runtime:
    settings: Settings
    endpoints: Endpoints
    pool: asyncpg.Pool
    # PARKING_DATABASE_READ_URL's replica, or `pool` itself when none is configured.
    read_pool: asyncpg.Pool
    redis: Redis
    mqtt: MqttClient
    occupancy: Occupancy
    lanes: LaneWorker
    outbox: OutboxWorker
    # Drivers' notifications and sign-in codes: the SMS service when PARKING_SMS_PROVIDER is
    # set, else in-memory stand-ins (DevNotifier, DevSms) that the demo and tests read.
    notifier: Notifier
    provider: PaymentProvider
    sms: SmsSender
    # The API keys this process has looked up (parking.auth.apikeys).
    api_keys: ApiKeyCache
    # Push feeds (parking.feeds): the outbox's handler of their deliveries, and, where the
    # outbox worker runs, the watcher queueing occupancy deliveries.
    feeds: FeedSender | None = None
    occupancy_watcher: OccupancyWatcher | None = None
    # The outbox worker of the feeds' deliveries alone (a slow subscriber never delays a charge).
    feed_outbox: OutboxWorker | None = None


# The outbox kinds of the feeds' own worker, and how many of its jobs it has in hand at once.
FEED_KINDS = ("feed_delivery",)
FEED_BATCH = 200


def job_limits(settings: Settings) -> dict[str, int]:
    """Attempts per kind of outbox job, from the settings (billing does not read them)."""
    return {
        "charge": settings.job_max_attempts_charge,
        "refund": settings.job_max_attempts_refund,
        "notification": settings.job_max_attempts_notification,
        "gate_command": settings.job_max_attempts_gate_command,
        "feed_delivery": settings.job_max_attempts_feed_delivery,
        "verify_charge": settings.job_max_attempts_verify_charge,
    }


async def _hourly(job: Callable[[], Awaitable[object]]) -> None:
    """A maintenance job now and every hour; when the database is away, it waits for the next."""
    while True:
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await job()
        await asyncio.sleep(3600)


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    endpoints: Endpoints,
    provider_endpoint: ProviderEndpoint,
    *,
    lanes: bool = True,
    outbox_worker: bool = True,
) -> AsyncIterator[Runtime]:
    """Starts the system against `endpoints`: the lane service and the outbox worker, or
    either alone (`parking lanes`, `parking worker`), or neither (the API alone: `parking
    serve --no-lanes --no-worker`)."""
    # Half-configured SMS stops the start before anything is opened.
    sms_setup = sms_service.client_from(settings)
    # The API's and the maintenance jobs' connections. The lane has its own (below): requests
    # holding connections, however many, never make a gate wait for one (issue #17).
    pool = await create_pool(endpoints.database_url, min_size=2, max_size=20, stateless=True)
    # A lane service opens a connection per decision queue before the first car: opening them
    # under load made the first seconds' p99 three times the steady state's.
    lane_pool = (
        await create_pool(
            endpoints.database_url,
            min_size=settings.lane_concurrency + 2,
            max_size=settings.lane_concurrency + 4,
            stateless=True,
        )
        if lanes
        else pool
    )
    # The outbox worker has its own connections so that charging never delays a gate.
    worker_pool = await create_pool(endpoints.database_url, min_size=1, max_size=4)
    # And the feeds' deliveries theirs, so that neither waits for the other's connections.
    # Their bookkeeping (sent, due, dead) is not money and is done again if lost: a crash may
    # lose the last moments' marks, and those deliveries go out again (at least once; the
    # event id lets a receiver drop repeats). So their commits never wait for the WAL's flush,
    # which the lanes' commits share.
    feed_pool = await create_pool(endpoints.database_url, min_size=1, max_size=4, durable=False)
    # No idle connections: a process that serves no API (lanes, worker) never opens one, and a
    # replica that is down fails only the reads that use it, not the process's start.
    read_pool = (
        await create_pool(settings.database_read_url, min_size=0, max_size=10, stateless=True)
        if settings.database_read_url
        else pool
    )
    redis = Redis.from_url(endpoints.redis_url, decode_responses=True)
    # Likewise the lane's own Redis connections (occupancy counters, the dashboard feed).
    lane_redis = Redis.from_url(endpoints.redis_url, decode_responses=True) if lanes else redis
    mqtt = MqttClient(
        endpoints.mqtt_url, settings.mqtt_client_id, ack_timeout_s=settings.mqtt_ack_timeout_s
    )
    provider = make_provider(settings, provider_endpoint)
    notifier: Notifier
    sms: SmsSender
    if sms_setup is None:
        notifier, sms = DevNotifier(), DevSms()
    else:
        sms_client, templates = sms_setup
        notifier = sms_service.SmsNotifier(worker_pool, sms_client, templates)
        sms = sms_service.AliyunCodeSender(sms_client, templates.login_code)
    api_keys = ApiKeyCache(redis, settings.redis_key_prefix, settings.api_key_cache_seconds)
    tasks: list[asyncio.Task[None]] = []
    maintenance: list[asyncio.Task[None]] = []
    lane_worker: LaneWorker | None = None
    feeds: FeedSender | None = None
    verifier: ChargeVerifier | None = None
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        occupancy = Occupancy(redis, pool, settings.redis_key_prefix)
        # Every role publishes to the gates: the API too (a manual open, a resolved exception).
        await mqtt.start()
        lane_worker = LaneWorker(
            settings,
            lane_pool,
            mqtt,
            Occupancy(lane_redis, lane_pool, settings.redis_key_prefix) if lanes else occupancy,
        )
        runtime: Runtime | None = None

        async def gate_commands(payment_id: int) -> None:
            assert runtime is not None
            await release_gate(runtime, payment_id)

        feeds = FeedSender(feed_pool, occupancy, settings)
        verifier = ChargeVerifier(settings, worker_pool)
        outbox = OutboxWorker(
            worker_pool,
            provider,
            notifier,
            gate_commands=gate_commands,
            charge_verifier=verifier,
            timezone=settings.timezone,
            language=settings.message_language,
            receipt_base_url=settings.public_base_url,
            retry_base_s=settings.charge_retry_base_s,
            query_after_s=settings.charge_query_after_s,
            request_in_flight_s=settings.payment_request_in_flight_s,
            poll_interval_s=settings.worker_poll_interval_s,
            sweep_interval_s=settings.worker_sweep_interval_s,
            plate_state_max_age_s=settings.plate_state_max_age_s,
            plate_state_batch=settings.plate_state_batch,
            lease_s=settings.worker_lease_s,
            reminder_every=timedelta(days=settings.debt_reminder_every_days),
            pass_reminder_before=timedelta(days=settings.pass_reminder_days),
            max_attempts=job_limits(settings),
            backoff_cap_s=settings.job_backoff_cap_s,
        )
        feed_outbox = OutboxWorker(
            feed_pool,
            provider,
            notifier,
            poll_interval_s=settings.worker_poll_interval_s,
            lease_s=settings.worker_lease_s,
            max_attempts=job_limits(settings),
            backoff_cap_s=settings.job_backoff_cap_s,
            # Deliveries wait on subscribers' endpoints: many in hand at once.
            batch=FEED_BATCH,
            batch_handlers={"feed_delivery": feeds.deliver_batch},
            on_dead={"feed_delivery": feeds.dead},
            kinds=FEED_KINDS,
            sweeps=False,
        )
        watcher: OccupancyWatcher | None = None
        if lanes:
            await occupancy.rebuild_all()
            await lane_worker.start()
            # The gates' manual openings, for operators (parking.gates.events).
            await GateEventRecorder(settings, pool, mqtt).start()
        if lanes and settings.gate_config_key is not None:
            maintenance.append(
                asyncio.create_task(
                    gate_configs.publish_periodically(
                        pool,
                        mqtt,
                        settings,
                        gate_configs.load_private_key(settings.gate_config_key.get_secret_value()),
                        interval_s=settings.gate_config_interval_s,
                    )
                )
            )
        if outbox_worker:
            kept = retention.Retention.from_settings(settings)
            tasks.append(asyncio.create_task(outbox.run()))
            tasks.append(asyncio.create_task(feed_outbox.run()))
            watcher = OccupancyWatcher(redis, feed_pool, occupancy.channel, settings)
            maintenance.append(asyncio.create_task(watcher.run()))
            maintenance.append(
                asyncio.create_task(
                    _hourly(
                        lambda: retention.expire_images(
                            worker_pool, settings.image_retention_days, datetime.now(UTC)
                        )
                    )
                )
            )
            maintenance.append(
                asyncio.create_task(
                    _hourly(lambda: retention.prune(worker_pool, kept, datetime.now(UTC)))
                )
            )
            maintenance.append(
                asyncio.create_task(
                    _hourly(lambda: ghosts.sweep_ghost_stays(worker_pool, datetime.now(UTC)))
                )
            )
            maintenance.append(
                asyncio.create_task(
                    _hourly(
                        lambda: partitions.ensure_partitions(
                            worker_pool, settings.partition_months_ahead, datetime.now(UTC).date()
                        )
                    )
                )
            )
        runtime = Runtime(
            settings,
            endpoints,
            pool,
            read_pool,
            redis,
            mqtt,
            occupancy,
            lane_worker,
            outbox,
            notifier,
            provider,
            sms,
            api_keys,
            feeds,
            watcher,
            feed_outbox,
        )
        yield runtime
    finally:
        if lane_worker is not None:
            await lane_worker.stop()
        if tasks:
            outbox.stop()
            feed_outbox.stop()
            # Jobs in hand finish (a provider call is bounded by its timeout); cancel after that.
            await asyncio.wait(tasks, timeout=settings.payment_provider_timeout_s + 2)
        if verifier is not None:
            verifier.close()
        for task in tasks + maintenance:
            task.cancel()
        await asyncio.gather(*tasks, *maintenance, return_exceptions=True)
        await api_keys.close()
        with contextlib.suppress(Exception):
            await mqtt.stop()
        await provider.aclose()
        if sms_setup is not None:
            await sms_setup[0].aclose()
        if feeds is not None:
            await feeds.aclose()
        await redis.aclose()
        if lane_redis is not redis:
            await lane_redis.aclose()
        await worker_pool.close()
        await feed_pool.close()
        if lane_pool is not pool:
            await lane_pool.close()
        if read_pool is not pool:
            await read_pool.close()
        await pool.close()

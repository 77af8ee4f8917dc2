"""PARKING_DATABASE_READ_URL on a real streaming replica.

The test starts its own PostgreSQL 15 primary and a hot standby of it (`pg_basebackup -R`, WAL
streamed over loopback), both killed at the end; the machine's PostgreSQL is not involved.
Pausing the standby's WAL replay makes it visibly stale, so an answer shows which server it
came from: public availability, the stays search and the reports come from the standby, while
exit decisions, charges, sign-in checks and health stay on the primary. Stopping the standby
fails only the reads it serves; a multi-host read URL with `target_session_attrs=prefer-standby`
falls back to the primary.
"""

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from parking.app import create_app
from parking.migrate import migrate
from parking.runtime import ProviderEndpoint, Runtime
from parking.settings import Settings
from tests.conftest import (
    MQTT_URL,
    bearer,
    charges_of,
    create_lot,
    eventually,
    exit_after,
    make_driver,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe
from tests.test_fault_infra import PG_BIN, OwnPostgres, system

pytestmark = pytest.mark.slow

DATABASE = "parking_replicated"
READ_APP = "parking-read"  # the read pool's application_name, as pg_stat_activity shows it


class Standby(OwnPostgres):
    """A hot standby of `primary`: a base backup with `-R` (standby.signal and the
    primary_conninfo to stream from), on a port and in a folder of its own."""

    def __init__(self, primary: OwnPostgres) -> None:
        super().__init__()
        self.primary = primary

    async def init(self) -> None:
        await self._pg(
            str(PG_BIN / "pg_basebackup"),
            *("-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres"),
            *("-D", str(self.data), "-R", "-X", "stream", "-c", "fast"),
        )


@dataclass
class Replicated:
    primary: OwnPostgres
    standby: Standby

    def url(self, server: OwnPostgres) -> str:
        return f"postgresql://postgres@127.0.0.1:{server.port}/{DATABASE}"

    @property
    def read_url(self) -> str:
        return f"{self.url(self.standby)}?application_name={READ_APP}"

    @property
    def read_url_with_fallback(self) -> str:
        """Both servers; asyncpg connects to a standby while one answers, else to the primary."""
        hosts = f"127.0.0.1:{self.standby.port},127.0.0.1:{self.primary.port}"
        return (
            f"postgresql://postgres@{hosts}/{DATABASE}"
            f"?target_session_attrs=prefer-standby&application_name={READ_APP}"
        )

    async def fetchval(self, server: OwnPostgres, query: str) -> Any:
        conn = await asyncpg.connect(self.url(server))
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    async def read_backends(self, server: OwnPostgres) -> int:
        count: int = await self.fetchval(
            server,
            f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{READ_APP}'",
        )
        return count

    @contextlib.asynccontextmanager
    async def replay_paused(self) -> AsyncIterator[None]:
        """The standby receives WAL but applies none of it: it shows the data as it was."""
        await self.fetchval(self.standby, "SELECT pg_wal_replay_pause()")

        async def paused() -> bool:
            state = await self.fetchval(self.standby, "SELECT pg_get_wal_replay_pause_state()")
            return bool(state == "paused")

        await eventually(paused)
        try:
            yield
        finally:
            await self.fetchval(self.standby, "SELECT pg_wal_replay_resume()")


@pytest.fixture(scope="module")
async def replicated() -> AsyncIterator[Replicated]:
    primary = OwnPostgres()
    standby: Standby | None = None
    try:
        await primary.init()
        with (primary.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("wal_level = replica\nmax_wal_senders = 4\n")
        with (primary.data / "pg_hba.conf").open("a", encoding="utf-8") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")
        await primary.start()
        conn = await asyncpg.connect(primary.url)
        try:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
        cluster = Replicated(primary, Standby(primary))
        conn = await asyncpg.connect(cluster.url(primary))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        standby = cluster.standby
        await standby.init()
        await standby.start()
        assert await cluster.fetchval(standby, "SELECT pg_is_in_recovery()") is True
        yield cluster
    finally:
        if standby is not None:
            await standby.destroy()
        await primary.destroy()


@contextlib.asynccontextmanager
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    # A failing read must come back as the API's 500 answer, not as the exception.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as http:
        yield http


async def public_codes(api: httpx.AsyncClient) -> set[str]:
    response = await api.get("/api/v1/public/car-parks")
    assert response.status_code == 200, response.text
    return {car_park["code"] for car_park in response.json()}


async def test_reads_that_may_lag_come_from_the_replica_decisions_and_money_from_the_primary(
    replicated: Replicated, settings: Settings, provider: ProviderEndpoint, gate: GateProbe
) -> None:
    settings.database_read_url = replicated.read_url
    primary_url = replicated.url(replicated.primary)
    async with system(settings, primary_url, MQTT_URL, provider) as runtime:
        assert runtime.read_pool is not runtime.pool
        app = create_app(runtime)
        # No idle read connections: a process that serves no read opens none.
        assert await replicated.read_backends(replicated.standby) == 0
        lot = await create_lot(runtime)
        staff = await make_staff(runtime, lot.operator_id)
        token = bearer(staff_token(app, staff))
        async with client(app) as api:
            await eventually(lambda: _has(api, lot.code))
            assert await replicated.read_backends(replicated.standby) >= 1
            assert await replicated.read_backends(replicated.primary) == 0

            async with replicated.replay_paused():
                later_lot = await create_lot(runtime)
                driver = await make_driver(runtime, unique_plate())
                command = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
                assert command["action"] == "open", command
                charges = await eventually(lambda: _succeeded_charges(runtime, lot))
                assert [c["amount_fen"] for c in charges] == [600]

                # Served by the standby, which has not applied any of that yet.
                assert lot.code in await public_codes(api)
                assert later_lot.code not in await public_codes(api)
                stays = await api.get(
                    "/api/v1/operator/stays", params={"car_park": lot.code}, headers=token
                )
                assert stays.status_code == 200 and stays.json() == [], stays.text
                revenue = await api.get("/api/v1/operator/reports/revenue", headers=token)
                assert revenue.status_code == 200 and revenue.json() == [], revenue.text
                # Staff rights and health are checked on the primary, where the staff member
                # created after the replica stopped applying WAL does exist.
                late_staff = await make_staff(runtime, later_lot.operator_id)
                own = await api.get(
                    "/api/v1/operator/car-parks", headers=bearer(staff_token(app, late_staff))
                )
                assert [c["code"] for c in own.json()] == [later_lot.code], own.text
                assert (await api.get("/health")).status_code == 200

            await eventually(lambda: _has(api, later_lot.code))

            async def stay_visible() -> list[dict[str, Any]]:
                response = await api.get(
                    "/api/v1/operator/stays", params={"car_park": lot.code}, headers=token
                )
                return list(response.json())

            [stay] = await eventually(stay_visible)
            assert stay["status"] == "closed"

            async def revenue_visible() -> list[int]:
                response = await api.get("/api/v1/operator/reports/revenue", headers=token)
                return [line["pay_later_fen"] for line in response.json()]

            assert await eventually(revenue_visible) == [600]
            assert await replicated.read_backends(replicated.primary) == 0


async def test_a_replica_that_is_down_fails_only_its_reads_and_a_fallback_url_uses_the_primary(
    replicated: Replicated, settings: Settings, provider: ProviderEndpoint, gate: GateProbe
) -> None:
    primary_url = replicated.url(replicated.primary)
    settings.database_read_url = replicated.read_url
    # An API-only process (`parking serve --no-lanes --no-worker`) with the fallback URL.
    api_only = settings.model_copy(
        update={
            "database_read_url": replicated.read_url_with_fallback,
            "mqtt_client_id": f"api-{uuid.uuid4().hex[:8]}",
        }
    )
    async with (
        system(settings, primary_url, MQTT_URL, provider) as runtime,
        system(api_only, primary_url, MQTT_URL, provider, lanes=False, outbox_worker=False) as api,
        client(create_app(runtime)) as pinned,
        client(create_app(api)) as falling_back,
    ):
        lot = await create_lot(runtime)
        await eventually(lambda: _has(pinned, lot.code))
        await eventually(lambda: _has(falling_back, lot.code))
        assert await replicated.read_backends(replicated.primary) == 0
        assert (await falling_back.get("/health")).status_code == 200

        await replicated.standby.stop_immediately()
        try:
            for _ in range(2):  # the broken pooled connection, then a refused new one
                failed = await pinned.get("/api/v1/public/car-parks")
                assert failed.status_code == 500
                assert failed.json()["error"]["code"] == "internal_error"
            assert (await pinned.get("/health")).status_code == 200
            driver = await make_driver(runtime, unique_plate())
            command = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
            assert command["action"] == "open", command

            await eventually(lambda: _has(falling_back, lot.code))
            assert await replicated.read_backends(replicated.primary) >= 1
        finally:
            await replicated.standby.start()


async def _has(api: httpx.AsyncClient, code: str) -> bool:
    response = await api.get("/api/v1/public/car-parks")
    return response.status_code == 200 and code in {c["code"] for c in response.json()}


async def _succeeded_charges(runtime: Runtime, lot: Any) -> list[asyncpg.Record]:
    charges = await charges_of(runtime, lot)
    return charges if charges and all(c["status"] == "succeeded" for c in charges) else []

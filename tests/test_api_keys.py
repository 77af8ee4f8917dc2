"""The city's and the gates' API keys are read from memory, not the database, on every poll, and
a revoked key stops at once in every process (issue #17): `parking admin api-key revoke` tells
them through Redis; an entry's short life is the backstop for a revocation nobody announced."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from parking.admin import cli as admin_cli
from parking.app import create_app
from parking.cli import build_parser
from parking.infra import Endpoints
from parking.runtime import ProviderEndpoint, Runtime, running
from parking.settings import Settings
from tests.conftest import MQTT_URL, REDIS_URL, bearer, eventually

PUBLIC = "/api/v1/public/car-parks"


async def _admin(
    runtime: Runtime, database_url: str, capsys: pytest.CaptureFixture[str], *argv: str
) -> dict[str, Any]:
    """`parking admin --json ARGV…` as an operator runs it, against this test's Redis keys."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=database_url,
        redis_url=REDIS_URL,
        redis_key_prefix=runtime.settings.redis_key_prefix,
    )
    args = build_parser().parse_args(["admin", "--json", "--actor", "test:admin", *argv])
    capsys.readouterr()
    assert await admin_cli.run(settings, args) == 0
    out = capsys.readouterr()
    assert out.err == ""  # nothing to warn about: the processes were told
    result: dict[str, Any] = orjson.loads(out.out)
    return result


async def _city_key(
    runtime: Runtime, database_url: str, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    return await _admin(
        runtime, database_url, capsys, "api-key", "create", "--kind", "city", "--label", "signs"
    )


@pytest.fixture
async def other_process(
    runtime: Runtime, database_url: str, provider: ProviderEndpoint
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    """A second API process: its own runtime (connections, key cache) on the same servers."""
    settings = runtime.settings.model_copy(update={"mqtt_client_id": f"api-{uuid.uuid4().hex}"})
    eps = Endpoints(database_url, REDIS_URL, MQTT_URL)
    async with (
        running(settings, eps, provider, lanes=False, outbox_worker=False) as other,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(other)), base_url="http://parking.test"
        ) as client,
    ):
        yield other, client


async def _listening(runtime: Runtime) -> None:
    """Until the process's key cache listens for revocations (it keeps keys only then)."""
    await asyncio.wait_for(runtime.api_keys.subscribed.wait(), 10)


async def _set_revoked(runtime: Runtime, key_id: int, revoked: bool) -> None:
    """Revokes (or restores) a key in the database alone, as no command does: no announcement."""
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE api_keys SET revoked_at = CASE WHEN $2 THEN now() END WHERE id = $1",
            key_id,
            revoked,
        )


async def test_a_valid_key_is_read_from_memory_until_its_entry_expires(
    api: httpx.AsyncClient,
    runtime: Runtime,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Revoked in the database behind every process's back (no announcement), a key a process
    has seen keeps working there: it is not looked up again. Within
    PARKING_API_KEY_CACHE_SECONDS it is looked up again, and refused."""
    runtime.api_keys.ttl_s = 5.0
    key = await _city_key(runtime, database_url, capsys)
    assert (await api.get(PUBLIC, headers=bearer(key["key"]))).status_code == 200
    await _listening(runtime)
    assert (await api.get(PUBLIC, headers=bearer(key["key"]))).status_code == 200
    await _set_revoked(runtime, key["api_key_id"], True)
    assert (await api.get(PUBLIC, headers=bearer(key["key"]))).status_code == 200

    async def refused() -> bool:
        return (await api.get(PUBLIC, headers=bearer(key["key"]))).status_code == 401

    await eventually(refused, timeout_s=30)


async def test_a_revoked_key_stops_at_once_in_every_process(
    api: httpx.AsyncClient,
    other_process: tuple[Runtime, httpx.AsyncClient],
    runtime: Runtime,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Both processes hold the key in memory for an hour; the revocation command's announcement,
    not the hour, is what stops it in each."""
    other, other_api = other_process
    processes = [(runtime, api), (other, other_api)]
    key = await _city_key(runtime, database_url, capsys)

    async def statuses() -> list[int]:
        return [
            (await http.get(PUBLIC, headers=bearer(key["key"]))).status_code
            for _, http in processes
        ]

    for process, _ in processes:
        process.api_keys.ttl_s = 3600
    assert await statuses() == [200, 200]
    # Each cache keeps keys only while it listens for revocations: once both listen, both keep
    # the key (revoked behind their backs, it still works in each).
    for process, _ in processes:
        await _listening(process)
    assert await statuses() == [200, 200]
    await _set_revoked(runtime, key["api_key_id"], True)
    assert await statuses() == [200, 200]
    await _set_revoked(runtime, key["api_key_id"], False)

    await _admin(runtime, database_url, capsys, "api-key", "revoke", str(key["api_key_id"]))

    async def refused_by_both() -> bool:
        return await statuses() == [401, 401]

    await eventually(refused_by_both)


async def test_made_up_keys_cost_their_sender_a_wait_and_a_wrong_key_no_query(
    runtime: Runtime, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key not in memory is a database query: one client making keys up gets 429 (no query)
    after PARKING_BAD_API_KEYS_PER_MINUTE_PER_CLIENT of them. A sign configured with a wrong
    key, asking again and again, is answered from memory and not counted, so the signs sharing
    its address (one NAT) keep their own key working."""
    runtime.settings.trusted_proxies = ["127.0.0.0/8"]
    runtime.settings.bad_api_keys_per_minute_per_client = 3
    key = await _city_key(runtime, database_url, capsys)
    transport = httpx.ASGITransport(app=create_app(runtime))  # the peer: a trusted proxy
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as http:

        async def status(credential: str, address: str) -> int:
            headers = bearer(credential) | {"X-Forwarded-For": address}
            return (await http.get(PUBLIC, headers=headers)).status_code

        await status(key["key"], "192.0.2.1")
        await _listening(runtime)
        wrong = f"ck_{uuid.uuid4().hex}"
        assert [await status(wrong, "192.0.2.1") for _ in range(10)] == [401] * 10
        made_up = [await status(f"ck_{uuid.uuid4().hex}", "198.51.100.7") for _ in range(5)]
        assert made_up == [401, 401, 401, 429, 429]
        # Nothing from memory now: the signs' address may still look its key up, the other not.
        runtime.api_keys.ttl_s = 0
        assert await status(key["key"], "192.0.2.1") == 200
        assert await status(key["key"], "198.51.100.7") == 429

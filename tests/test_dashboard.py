"""The operator dashboard's API: today's summary of the operator's own car parks and the live
feed (server-sent events from Redis pub/sub) of their occupancy and lane decisions."""

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any, get_args
from zoneinfo import ZoneInfo

import httpx
import orjson
from fastapi import FastAPI

from parking.app import create_app
from parking.auth.tokens import TokenSigner
from parking.dashboard import service
from parking.dashboard.feed import Feed, feed_channels
from parking.lanes.rules import VerifyReason
from parking.lanes.worker import lane_events_channel
from parking.logging import mask_plate
from parking.runtime import Runtime
from parking_dev import sandbox
from tests.conftest import (
    Lot,
    Staff,
    api_server,
    bearer,
    create_lot,
    driver_token,
    eventually,
    exit_after,
    make_driver,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe

SUMMARY = "/api/v1/operator/dashboard/summary"
EVENTS = "/api/v1/operator/dashboard/events"


async def _enter(gate: GateProbe, lot: Lot, plate: str) -> None:
    command = await gate.decide(lot.code, "in1", gate.capture("in", plate))
    assert command["action"] == "open", command


async def _unreadable_exit(gate: GateProbe, lot: Lot) -> None:
    command = await gate.decide(lot.code, "out1", gate.capture("out", None))
    assert command["action"] == "hold", command


async def _traffic_today(runtime: Runtime, lot: Lot) -> tuple[Counter[int], Counter[int]]:
    """Entries and exits per local hour today, from the stays as stored."""
    zone = ZoneInfo(runtime.settings.timezone)
    today = datetime.now(zone).date()
    async with runtime.pool.acquire() as conn:
        stays = await conn.fetch(
            "SELECT entered_at, exited_at, status, entry_capture_id FROM sessions "
            "WHERE car_park_id = $1",
            lot.id,
        )
    entries: Counter[int] = Counter()
    exits: Counter[int] = Counter()
    for stay in stays:
        entered = stay["entered_at"].astimezone(zone)
        if entered.date() == today and stay["entry_capture_id"] is not None:
            entries[entered.hour] += 1
        if stay["status"] == "closed" and stay["exited_at"].astimezone(zone).date() == today:
            exits[stay["exited_at"].astimezone(zone).hour] += 1
    return entries, exits


async def test_summary_shows_only_the_operators_car_parks_today(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    other = await create_lot(runtime)
    driver = await make_driver(runtime, unique_plate())
    exit_command = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=70))
    assert (exit_command["action"], exit_command["fee_fen"]) == ("open", 1200)
    await _enter(gate, lot, unique_plate())
    await _unreadable_exit(gate, lot)
    # Another company's traffic, takings and exceptions are not this operator's.
    other_driver = await make_driver(runtime, unique_plate())
    await exit_after(runtime, gate, other, other_driver.plate, timedelta(minutes=30))
    await _enter(gate, other, unique_plate())
    await _unreadable_exit(gate, other)

    staff = await make_staff(runtime, lot.operator_id, "attendant")
    answer = await api.get(SUMMARY, headers=bearer(staff_token(app, staff)))

    assert answer.status_code == 200, answer.text
    summary = answer.json()
    zone = ZoneInfo(runtime.settings.timezone)
    assert summary["day"] == datetime.now(zone).date().isoformat()
    assert summary["timezone"] == runtime.settings.timezone
    assert summary["car_parks"] == [
        {
            "code": lot.code,
            "name": lot.name,
            "capacity": 50,
            "occupied": 1,
            "free": 49,
            "revenue_fen": 1200,
        }
    ]
    assert summary["revenue_fen"] == 1200
    assert summary["open_exceptions"] == 1
    entries, exits = await _traffic_today(runtime, lot)
    assert [row["hour"] for row in summary["hourly"]] == list(range(24))
    assert {r["hour"]: r["entries"] for r in summary["hourly"] if r["entries"]} == entries
    assert {r["hour"]: r["exits"] for r in summary["hourly"] if r["exits"]} == exits
    assert sum(exits.values()) == 1 and sum(entries.values()) in (1, 2)  # 2 unless past midnight


async def test_dashboard_api_is_for_operator_staff_only(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    driver = await make_driver(runtime, unique_plate())
    for path in (SUMMARY, EVENTS):
        anonymous = await api.get(path)
        as_driver = await api.get(path, headers=bearer(driver_token(app, driver.account_id)))
        assert anonymous.status_code == 401, path
        assert as_driver.status_code == 403, path


async def _events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Parses a server-sent event stream into (event name, JSON data)."""
    name, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if data:
                yield name, orjson.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())


async def _subscribers(runtime: Runtime) -> list[int]:
    """The dashboards' subscriptions (the push feeds' occupancy watcher, subscribed to the
    occupancy channel too, is not counted)."""
    assert runtime.occupancy_watcher is not None
    await asyncio.wait_for(runtime.occupancy_watcher.ready.wait(), 10)
    channels = [runtime.occupancy.channel, lane_events_channel(runtime.settings)]
    counts = await runtime.redis.pubsub_numsub(*channels)
    occupancy, lanes = (count for _, count in counts)
    return [occupancy - 1, lanes]


async def _sign_in(http: httpx.AsyncClient, staff: Staff) -> str:
    answer = await http.post(
        "/api/v1/auth/token",
        json={"grant_type": "password", "email": staff.email, "password": staff.password},
    )
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


async def test_feed_streams_own_occupancy_and_lane_decisions_and_cleans_up(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    other = await create_lot(runtime)
    staff = await make_staff(runtime, lot.operator_id)
    plates = [unique_plate(), unique_plate()]
    # A real server: the stream is read as it is written.
    async with (
        api_server(runtime, sandbox.free_port()) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        token = await _sign_in(http, staff)
        async with http.stream("GET", EVENTS, headers=bearer(token)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = _events(response)
            name, snapshot = await asyncio.wait_for(anext(events), 10)
            assert (name, snapshot) == (
                "snapshot",
                {
                    "car_parks": [
                        {
                            "code": lot.code,
                            "name": lot.name,
                            "capacity": 50,
                            "occupied": 0,
                            "free": 50,
                        }
                    ]
                },
            )
            assert await _subscribers(runtime) == [1, 1]

            await _enter(gate, other, unique_plate())
            for plate in plates:
                await _enter(gate, lot, plate)
            received: list[tuple[str, dict[str, Any]]] = []
            while sum(name == "lane" for name, _ in received) < len(plates):
                received.append(await asyncio.wait_for(anext(events), 10))
        # The client has gone: its subscriptions are closed with it.
        await eventually(lambda: _no_subscribers(runtime))

    assert {data["car_park"] for _, data in received} == {lot.code}
    occupancy = [data for name, data in received if name == "occupancy"]
    assert occupancy == [
        {"car_park": lot.code, "occupied": n, "free": 50 - n, "capacity": 50} for n in (1, 2)
    ]
    lanes = [data for name, data in received if name == "lane"]
    assert [lane["plate"] for lane in lanes] == [mask_plate(p) for p in plates]
    for lane in lanes:
        assert (lane["gate"], lane["direction"], lane["outcome"], lane["action"]) == (
            "in1",
            "in",
            "entered",
            "open",
        )
        assert lane["latency_ms"] >= 0 and datetime.fromisoformat(lane["at"]).tzinfo


async def _no_subscribers(runtime: Runtime) -> bool:
    return await _subscribers(runtime) == [0, 0]


async def test_idle_feed_sends_keep_alive_comments(runtime: Runtime, lot: Lot) -> None:
    feed = Feed(runtime.redis, feed_channels(runtime))
    stream = service.live_events(runtime, feed, lot.operator_id, keepalive_s=0.05)
    try:
        snapshot = await asyncio.wait_for(anext(stream), 5)
        assert snapshot.startswith("event: snapshot\n")
        assert await asyncio.wait_for(anext(stream), 5) == ": keep-alive\n\n"
    finally:
        await stream.aclose()
    assert await _subscribers(runtime) == [0, 0]


async def _open(
    stack: contextlib.AsyncExitStack, http: httpx.AsyncClient, token: str
) -> tuple[httpx.Response, AsyncIterator[tuple[str, dict[str, Any]]]]:
    response = await stack.enter_async_context(http.stream("GET", EVENTS, headers=bearer(token)))
    events = _events(response)
    if response.status_code == 200:
        name, _ = await asyncio.wait_for(anext(events), 10)
        assert name == "snapshot"
    return response, events


async def test_streams_share_one_subscription_and_each_staff_member_has_a_few(
    runtime: Runtime, lot: Lot
) -> None:
    limit = runtime.settings.dashboard_streams_per_user
    alice = await make_staff(runtime, lot.operator_id)
    bob = await make_staff(runtime, lot.operator_id)
    async with (
        api_server(runtime, sandbox.free_port()) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        alice_token, bob_token = await _sign_in(http, alice), await _sign_in(http, bob)
        async with contextlib.AsyncExitStack() as stack:
            # Held on to: a stream's reader, dropped, would close its response.
            streams = [await _open(stack, http, alice_token) for _ in range(limit)]
            assert [response.status_code for response, _ in streams] == [200] * limit
            # Every stream of the process is fed by one Redis subscription.
            assert await _subscribers(runtime) == [1, 1]
            refused, _ = await _open(stack, http, alice_token)
            assert refused.status_code == 429
            await refused.aread()
            assert refused.json()["error"]["code"] == "too_many_streams"
            assert int(refused.headers["Retry-After"]) > 0
            other = await _open(stack, http, bob_token)
            assert other[0].status_code == 200
        await eventually(lambda: _no_subscribers(runtime))
        # Closed streams gave their places back.
        async with contextlib.AsyncExitStack() as stack:
            again = await _open(stack, http, alice_token)
            assert again[0].status_code == 200


async def test_the_stream_limit_is_the_persons_not_the_tokens(runtime: Runtime, lot: Lot) -> None:
    limit = runtime.settings.dashboard_streams_per_user
    # limit + 2 sign-ins in a row: more than the process's password checks a second allow.
    runtime.settings.password_checks_per_second = 1000.0
    staff = await make_staff(runtime, lot.operator_id)
    async with (
        api_server(runtime, sandbox.free_port()) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
        contextlib.AsyncExitStack() as stack,
    ):
        # Each from a sign-in of its own; held on to (a dropped reader closes its response).
        streams = [await _open(stack, http, await _sign_in(http, staff)) for _ in range(limit + 2)]
        statuses = [response.status_code for response, _ in streams]
    assert statuses == [200] * limit + [429, 429]


async def _ends(events: AsyncIterator[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Reads until the server ends the stream; its last event says why."""
    async for name, data in events:
        if name == "end":
            rest = [event async for event in events]
            assert rest == []
            return data
    raise AssertionError("the stream ended without an end event")


async def test_a_stream_ends_when_its_user_is_disabled_signs_out_or_the_token_expires(
    runtime: Runtime, lot: Lot
) -> None:
    runtime.settings.dashboard_recheck_s = 0.1
    staff = await make_staff(runtime, lot.operator_id)
    app = create_app(runtime)
    async with (
        api_server(runtime, sandbox.free_port(), app=app) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        async with contextlib.AsyncExitStack() as stack:
            _, events = await _open(stack, http, await _sign_in(http, staff))
            async with runtime.pool.acquire() as conn:
                await conn.execute(
                    "UPDATE operator_users SET disabled_at = now() WHERE id = $1", staff.user_id
                )
            assert await asyncio.wait_for(_ends(events), 10) == {"reason": "access_revoked"}
            async with runtime.pool.acquire() as conn:
                await conn.execute(
                    "UPDATE operator_users SET disabled_at = NULL WHERE id = $1", staff.user_id
                )

        async with contextlib.AsyncExitStack() as stack:
            signed_in = await http.post(
                "/api/v1/auth/token",
                json={"grant_type": "password", "email": staff.email, "password": staff.password},
            )
            pair = signed_in.json()
            _, events = await _open(stack, http, pair["access_token"])
            out = await http.post(
                "/api/v1/auth/sign-out", json={"refresh_token": pair["refresh_token"]}
            )
            assert out.status_code == 204
            assert await asyncio.wait_for(_ends(events), 10) == {"reason": "access_revoked"}
            # The signed-out access token is refused everywhere, not only by the stream.
            summary = await http.get(SUMMARY, headers=bearer(pair["access_token"]))
            assert summary.status_code == 401

        async with contextlib.AsyncExitStack() as stack:
            app.state.signer = TokenSigner(app.state.signer._key, access_ttl_s=1)
            _, events = await _open(stack, http, await _sign_in(http, staff))
            assert await asyncio.wait_for(_ends(events), 10) == {"reason": "token_expired"}


async def test_a_stream_ends_when_its_user_loses_the_dashboard_role(
    runtime: Runtime, lot: Lot
) -> None:
    """An admin made platform staff (a role that passes no company route) mid-stream: every
    request of theirs is refused at once, and so is the open stream."""
    runtime.settings.dashboard_recheck_s = 0.1
    staff = await make_staff(runtime, lot.operator_id)
    async with (
        api_server(runtime, sandbox.free_port()) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
        contextlib.AsyncExitStack() as stack,
    ):
        token = await _sign_in(http, staff)
        _, events = await _open(stack, http, token)
        async with runtime.pool.acquire() as conn:
            await conn.execute(
                "UPDATE operator_users SET role = 'platform' WHERE id = $1", staff.user_id
            )
        assert (await http.get(SUMMARY, headers=bearer(token))).status_code == 403
        assert await asyncio.wait_for(_ends(events), 10) == {"reason": "access_revoked"}


async def test_the_console_says_every_reason_a_charge_waits_in_both_languages(
    api: httpx.AsyncClient,
) -> None:
    page = (await api.get("/dashboard")).text
    for reason in get_args(VerifyReason):
        assert len(re.findall(rf"\bverify_{reason}: \"[^\"]+\"", page)) == 2, reason


async def test_dashboard_page_is_self_contained(api: httpx.AsyncClient) -> None:
    answer = await api.get("/dashboard")

    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    page = answer.text
    assert 'id="sign-in-form"' in page and "/api/v1/auth/token" in page
    # Nothing loaded from elsewhere: no external scripts, styles, images or fonts.
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert not re.search(r"url\(|@import|<link\b", page)
    policy = answer.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "unsafe-inline" not in policy

"""Live availability for the public: car parks from PostgreSQL, counts from the occupancy
counters (Redis, rebuilt from PostgreSQL when missing)."""

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from parking.car_parks import repository as car_parks
from parking.errors import NotFound
from parking.public import repository
from parking.public.cache import Answer as SerialisedAnswer
from parking.runtime import Runtime

# Car park names are written in Chinese (ISO 639-1).
NAME_LANGUAGE = "zh"

# Per car park, the occupied count last seen and since when ("<count>|<iso time>"); returns
# those times, so every API process reports the same time for the same count.
# KEYS[1]: the hash; ARGV[1]: now; then pairs of car park id and occupied count.
_LAST_CHANGES = """
local times = {}
for i = 2, #ARGV, 2 do
  local seen = redis.call('HGET', KEYS[1], ARGV[i])
  local count, at = nil, nil
  if seen then
    local bar = string.find(seen, '|', 1, true)
    count, at = string.sub(seen, 1, bar - 1), string.sub(seen, bar + 1)
  end
  if count ~= ARGV[i + 1] then
    at = ARGV[1]
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. '|' .. at)
  end
  times[#times + 1] = at
end
return times
"""


async def _last_changes(runtime: Runtime, counts: dict[int, int]) -> dict[int, datetime]:
    """When each count last changed. The counters keep no time, so this is the first time
    this API saw the count; losing the hash only makes the times newer."""
    if not counts:
        return {}
    script = runtime.redis.register_script(_LAST_CHANGES)
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    args: list[str | int] = [now]
    for car_park_id, occupied in counts.items():
        args += [car_park_id, occupied]
    times = await script(keys=[f"{runtime.settings.redis_key_prefix}public:count-seen"], args=args)
    return {
        car_park_id: datetime.fromisoformat(at)
        for car_park_id, at in zip(counts, times, strict=True)
    }


# JSON-ready answers, shaped as the models of parking.public.schemas (which document them):
# plain dicts serialised by orjson cost a fifth of building and dumping 3,476 models.
Answer = dict[str, Any]


async def availabilities(runtime: Runtime, rows: list[asyncpg.Record]) -> list[Answer]:
    """`CarParkAvailability` of each car park row (id, code, name, capacity, latitude,
    longitude), in order."""
    counts = await runtime.occupancy.get_many([r["id"] for r in rows])
    changed = await _last_changes(runtime, counts)
    return [_availability(r, counts[r["id"]], changed[r["id"]]) for r in rows]


def _availability(row: asyncpg.Record, occupied: int, updated_at: datetime) -> Answer:
    """A `CarParkAvailability`."""
    located = row["latitude"] is not None and row["longitude"] is not None
    return {
        "code": row["code"],
        "name": row["name"],
        "capacity": row["capacity"],
        # Cars counted in beyond the capacity (the barrier never stops a car) leave none free.
        "free": max(0, row["capacity"] - occupied),
        "occupied": occupied,
        "location": {"latitude": row["latitude"], "longitude": row["longitude"]}
        if located
        else None,
        "updated_at": updated_at,
    }


async def car_parks_available(conn: asyncpg.Connection, runtime: Runtime) -> list[Answer]:
    """`CarParkAvailability` of every car park."""
    return await availabilities(runtime, await car_parks.list_car_parks(conn))


async def car_park_available(conn: asyncpg.Connection, runtime: Runtime, code: str) -> Answer:
    """The `CarParkAvailability` of one car park."""
    row = await car_parks.get_by_code(conn, code)
    if row is None:
        raise NotFound("car_park")
    return (await availabilities(runtime, [row]))[0]


async def nearby(
    conn: asyncpg.Connection, runtime: Runtime, latitude: float, longitude: float, radius_m: int
) -> list[Answer]:
    """`NearbyCarPark`s, nearest first."""
    rows = await repository.nearby(conn, latitude, longitude, radius_m)
    views = await availabilities(runtime, rows)
    return [
        {**view, "distance_m": round(row["distance_m"])}
        for row, view in zip(rows, views, strict=True)
    ]


async def places(conn: asyncpg.Connection, runtime: Runtime) -> list[Answer]:
    """Every car park as a `Place`."""
    return [
        {
            "id": view["code"],
            "name": [{"language": NAME_LANGUAGE, "text": view["name"]}],
            "location": view["location"],
            "capacity": view["capacity"],
            "availability": {
                "free": view["free"],
                "occupied": view["occupied"],
                "status": "full" if view["free"] == 0 else "open",
                "lastUpdated": view["updated_at"],
            },
        }
        for view in await car_parks_available(conn, runtime)
    ]


# Answers a board keeps for the lists of car parks asked for (signs showing the same ones
# share them); beyond this many, the rest are built for each poll.
SIGN_ANSWERS_PER_BOARD = 10_000


@dataclass(slots=True)
class SignBoard:
    """Every car park's sign numbers, each serialised once (`Sign` JSON, by code), read at
    `as_of`; the answers built from it, by the codes asked for (None: all)."""

    signs: dict[str, bytes]
    as_of: datetime
    answers: dict[tuple[str, ...] | None, SerialisedAnswer] = field(default_factory=dict)


async def sign_board(conn: asyncpg.Connection, runtime: Runtime) -> SignBoard:
    rows = await repository.sign_rows(conn)
    counts = await runtime.occupancy.get_many([r["id"] for r in rows])
    signs: dict[str, bytes] = {}
    for row in rows:
        free = max(0, row["capacity"] - counts[row["id"]])
        status = "closed" if row["closed"] else "full" if free == 0 else "open"
        signs[row["code"]] = orjson.dumps(
            {"code": row["code"], "free": 0 if row["closed"] else free, "status": status}
        )
    return SignBoard(signs, datetime.now(UTC).replace(microsecond=0))


def signs(board: SignBoard, codes: list[str] | None) -> SerialisedAnswer:
    """`Signs` of the car parks asked for (all when None), in the order asked, as bytes from
    the board's. The ETag is weak and covers the numbers, not `as_of`: a sign whose numbers did
    not change is answered 304 by the next boards too."""
    key = tuple(codes) if codes is not None else None
    answer = board.answers.get(key)
    if answer is not None:
        return answer
    if codes is None:
        chosen = list(board.signs.values())
    else:
        chosen = [
            board.signs.get(code) or orjson.dumps({"code": code, "free": None, "status": "unknown"})
            for code in codes
        ]
    numbers = b",".join(chosen)
    as_of = orjson.dumps(board.as_of, option=orjson.OPT_UTC_Z)
    answer = SerialisedAnswer(
        b'{"car_parks":[' + numbers + b'],"as_of":' + as_of + b"}",
        f'W/"{hashlib.blake2b(numbers, digest_size=16).hexdigest()}"',
    )
    if len(board.answers) < SIGN_ANSWERS_PER_BOARD:
        board.answers[key] = answer
    return answer

"""Push subscriptions as their owners see them and set them up."""

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, UrlConstraints

from parking.car_parks.schemas import CODE_PATTERN

# http(s) only, no credentials in it (they would be logged with the URL).
Endpoint = Annotated[AnyHttpUrl, UrlConstraints(max_length=2000, allowed_schemes=["http", "https"])]
ApdsTopic = Literal["SessionCreated", "SessionUpdated", "OccupancyUpdated"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EventSubscription(_Request):
    """APDS `EventSubscription` (endpoint, topics), and the company's car parks it is about
    (`places`, their codes; omitted: all of them, including ones added later).
    SessionCreated: a stay started; SessionUpdated: it ended; OccupancyUpdated (ours, APDS v4
    has no occupancy event): a car park's count changed (at most one per
    PARKING_FEED_OCCUPANCY_INTERVAL_S per car park, with the latest count)."""

    endpoint: Endpoint
    topics: Annotated[list[ApdsTopic], Field(min_length=1, max_length=3)]
    places: (
        Annotated[
            list[Annotated[str, Field(pattern=CODE_PATTERN)]], Field(min_length=1, max_length=500)
        ]
        | None
    ) = None


class Subscription(BaseModel):
    id: uuid.UUID
    endpoint: str
    topics: list[str]
    # Car park codes; None: every car park of the company.
    places: list[str] | None
    paused: bool
    paused_at: datetime | None
    consecutive_failures: int
    created_at: datetime


class CreatedSubscription(BaseModel):
    """APDS `ResponseStatusWithId`, with the key every delivery is signed with (shown once)."""

    status: Literal["ok"] = "ok"
    code: int = 200
    message: str
    id: uuid.UUID
    secret: str


class CityPlatformChange(_Request):
    """Where the company's city platform takes its feed, and the key it gave for signing."""

    endpoint: Endpoint
    key: Annotated[SecretStr, Field(min_length=16, max_length=200)]


class CityPlatform(BaseModel):
    endpoint: str
    topics: list[str]
    consecutive_failures: int
    created_at: datetime

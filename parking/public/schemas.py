"""What guidance signs and the city platform read: car parks with live availability, and the
same as APDS-style places."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class Location(BaseModel):
    latitude: float
    longitude: float


class CarParkAvailability(BaseModel):
    code: str
    name: str
    capacity: int
    free: int
    occupied: int
    location: Location | None
    # When the occupied count last changed (as first seen by this API).
    updated_at: datetime


class NearbyCarPark(CarParkAvailability):
    # Great-circle distance from the point asked about, in whole metres.
    distance_m: int


class LocalisedText(BaseModel):
    language: str
    text: str


class PlaceAvailability(BaseModel):
    free: int
    occupied: int
    status: Literal["open", "full"]
    last_updated: datetime = Field(alias="lastUpdated")


class Place(BaseModel):
    """A car park shaped like an APDS Place with its current availability."""

    id: str
    name: list[LocalisedText]
    location: Location | None
    capacity: int
    availability: PlaceAvailability


class Sign(BaseModel):
    code: str
    # None: no such car park (a sign configured wrongly shows nothing rather than a number).
    free: int | None
    status: Literal["open", "full", "closed", "unknown"]


class Signs(BaseModel):
    car_parks: list[Sign]
    # When the numbers were read (at most PARKING_PUBLIC_CACHE_SECONDS old when served).
    as_of: datetime

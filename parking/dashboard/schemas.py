"""What the operator dashboard shows: its summary and the events of its live feed."""

from datetime import date, datetime

from pydantic import BaseModel


class CarParkLive(BaseModel):
    code: str
    name: str
    capacity: int
    occupied: int
    free: int


class CarParkToday(CarParkLive):
    # Net revenue booked today (local day), fen.
    revenue_fen: int


class HourlyTraffic(BaseModel):
    hour: int
    entries: int
    exits: int


class DashboardSummary(BaseModel):
    day: date
    timezone: str
    car_parks: list[CarParkToday]
    revenue_fen: int
    # One row per local hour of the day, 0-23; entries through an entry gate, exits that
    # closed a stay.
    hourly: list[HourlyTraffic]
    open_exceptions: int


class Snapshot(BaseModel):
    """The first event of the live feed: where the counts stand when it starts."""

    car_parks: list[CarParkLive]


class OccupancyChanged(BaseModel):
    car_park: str
    occupied: int
    free: int
    capacity: int


class LaneDecided(BaseModel):
    """A decision at a gate, as the lane service announces it (plate already masked)."""

    car_park: str
    gate: str
    direction: str
    plate: str | None
    outcome: str
    action: str
    fee_fen: int | None
    latency_ms: float
    at: datetime

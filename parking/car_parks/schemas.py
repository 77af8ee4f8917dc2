from pydantic import BaseModel


class CarParkOccupancy(BaseModel):
    code: str
    name: str
    capacity: int
    occupied: int
    free: int
    latitude: float | None
    longitude: float | None

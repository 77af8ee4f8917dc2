from typing import Annotated

from fastapi import Path
from pydantic import BaseModel

# Car park and gate codes, as the gates' topics use them.
CODE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
CarParkCode = Annotated[str, Path(pattern=CODE_PATTERN)]


class CarParkOccupancy(BaseModel):
    code: str
    name: str
    capacity: int
    occupied: int
    free: int
    latitude: float | None
    longitude: float | None

import unicodedata
from typing import Annotated

from fastapi import Path
from pydantic import BaseModel

# Car park and gate codes, as the gates' topics use them.
CODE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
CarParkCode = Annotated[str, Path(pattern=CODE_PATTERN)]
# A car park's name is shown on gates and phones and sent to the payment provider in every
# charge's description ("parking <name>", at most 200 characters there).
CAR_PARK_NAME_MAX_CHARS = 64


def printable_name(value: str) -> str:
    """Refuses control, format, separator-of-lines and unassigned characters (a NUL, a
    newline, a right-to-left override; the joiner of joined emoji is kept) in a name that
    ends up in charge descriptions."""
    for ch in value:
        if ch != "\u200d" and unicodedata.category(ch) in (
            "Cc",
            "Cf",
            "Cs",
            "Co",
            "Cn",
            "Zl",
            "Zp",
        ):
            raise ValueError(f"the name contains a character that cannot be shown: {ch!r}")
    return value


def check_car_park_name(name: str) -> str:
    """The same rule for names that do not come through the API (seeding, admin commands)."""
    name = printable_name(name.strip())
    if not 1 <= len(name) <= CAR_PARK_NAME_MAX_CHARS:
        raise ValueError(f"a car park's name has 1 to {CAR_PARK_NAME_MAX_CHARS} characters")
    return name


class CarParkOccupancy(BaseModel):
    code: str
    name: str
    capacity: int
    occupied: int
    free: int
    latitude: float | None
    longitude: float | None

"""Money entering from outside: exactly an integer number of fen, or refused.

Provider answers, notifications, statement files and API requests all carry amounts in fen.
Nothing is rounded or truncated on the way in: 600.9, "600.9", 600.0, "6e2", true and (where
not allowed) negative amounts are refused, never read as 600 or 1.
"""

import re
from typing import Annotated, Any

from pydantic import Field

_DIGITS = re.compile(r"-?[0-9]+")
# Ledger amounts are bigint.
MAX_FEN = 2**63 - 1

# API inputs: strict, so that 600.0, "600" and true are refused too.
PositiveFen = Annotated[int, Field(strict=True, gt=0, le=MAX_FEN)]


class InvalidAmount(ValueError):
    """An amount that is not an exact integer number of fen in the allowed range."""


def _checked(amount: int, *, negative_ok: bool) -> int:
    if not negative_ok and amount < 0:
        raise InvalidAmount(f"a negative amount of fen: {amount}")
    if abs(amount) > MAX_FEN:
        raise InvalidAmount(f"an amount of fen out of range: {amount}")
    return amount


def fen_from_json(value: Any, *, negative_ok: bool = False) -> int:
    """An amount from a decoded JSON document: a JSON integer, nothing else."""
    # bool is an int in Python; a float (even 600.0) says the sender counts in something else.
    if type(value) is not int:
        raise InvalidAmount(f"not an integer number of fen: {value!r}")
    return _checked(value, negative_ok=negative_ok)


def fen_from_text(text: str, *, negative_ok: bool = False) -> int:
    """An amount from text (a CSV statement, a command line): digits only, with at most a
    leading minus sign; no decimal point, exponent, spaces or underscores."""
    if not isinstance(text, str) or not _DIGITS.fullmatch(text):
        raise InvalidAmount(f"not an integer number of fen: {text!r}")
    return _checked(int(text), negative_ok=negative_ok)

"""The engine interface every plate reader implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from plate_recognition.grammar import Alternatives, Candidate


@dataclass(frozen=True, slots=True)
class ReadResult:
    """What one engine read from one rectified plate image.

    ``candidates`` are grammatical plates, best first, with comparable scores in (0, 1];
    empty when nothing readable was found. ``raw`` is the engine's unconstrained text and
    ``positions`` its per-character alternatives (kept for voting across frames).
    """

    engine: str
    candidates: tuple[Candidate, ...]
    raw: str = ""
    positions: tuple[tuple[tuple[str, float], ...], ...] = field(default=())

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    @property
    def plate(self) -> str | None:
        return self.candidates[0].plate if self.candidates else None


class PlateReader(Protocol):
    """Reads one plate image (BGR, already cropped/rectified to the plate). ``color`` is
    the plate colour guessed from its pixels, ``color_sure`` whether that guess is sure
    (:func:`plate_recognition.localise.plate_color`)."""

    name: str

    def read(
        self, image: np.ndarray, color: str | None = None, color_sure: bool = False
    ) -> ReadResult: ...


def freeze_positions(
    positions: list[Alternatives],
) -> tuple[tuple[tuple[str, float], ...], ...]:
    """Immutable, picklable copy of per-position alternatives."""
    return tuple(tuple((ch, float(p)) for ch, p in alts) for alts in positions)

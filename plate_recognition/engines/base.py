"""The engine interface every plate reader implements."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
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


def vote(
    results: Sequence[ReadResult], weights: Sequence[float] | None = None, limit: int = 10
) -> tuple[Candidate, ...]:
    """One ranking from several reads of one plate: each plate's weighted mean score (equal
    weights unless given, summing to 1), a read that lacks the plate counting 0, so
    reads must agree for a plate to stay sure."""
    shares = weights or [1 / len(results)] * len(results)
    totals: dict[str, float] = defaultdict(float)
    for result, share in zip(results, shares, strict=True):
        for cand in result.candidates:
            totals[cand.plate] += share * cand.score
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:limit]
    return tuple(Candidate(plate, score) for plate, score in ranked)

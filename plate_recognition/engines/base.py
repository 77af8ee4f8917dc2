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


class Ranked(Protocol):
    """Anything with ranked candidates: an engine's read, a pipeline's recognition."""

    @property
    def candidates(self) -> tuple[Candidate, ...]: ...


def vote(
    results: Sequence[Ranked], weights: Sequence[float] | None = None, limit: int = 10
) -> tuple[Candidate, ...]:
    """One ranking from several reads of one plate: each plate's weighted mean score (the
    plain mean unless ``weights``, summing to 1, are given), a read that lacks the plate
    counting 0, so reads must agree for a plate to stay sure."""
    if not results:
        return ()
    totals: dict[str, float] = defaultdict(float)
    for result, weight in zip(results, weights or [1.0] * len(results), strict=True):
        for cand in result.candidates:
            totals[cand.plate] += weight * cand.score
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:limit]
    mean_of = 1 if weights else len(results)
    return tuple(Candidate(plate, total / mean_of) for plate, total in ranked)

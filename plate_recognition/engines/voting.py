"""Readers that read every plate with several engines and let them vote.

``fused`` (the default): two PlateNets (the same design and photos, trained from different
seeds) and the general PP-OCR recogniser (:data:`FUSED_WEIGHTS`). PlateNet (trained for
plates) reads degraded plates far better than PP-OCR; PP-OCR, trained on millions of text
lines, knows glyphs PlateNet never saw. The engines must agree for a read to stay sure: no
PlateNet is trusted with a sure read, however high its own score. On photos it never learnt
from the first read 皖A099Q5 as 皖A09905 at 0.99998 (held-out seed 1002, glare), a score the
calibration put above the certain threshold, where PP-OCR disagreed.

``combined``: PP-OCR and Tesseract, weighted by measured accuracy (Tesseract mostly breaks
ties between PP-OCR's own alternatives rather than overruling it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from plate_recognition.engines.base import PlateReader, ReadResult, vote


class VotingReader:
    """Reads with every one of ``readers``; each plate's score is the weighted mean of its
    scores (:func:`plate_recognition.engines.base.vote`); the raw text and per-character
    alternatives are the first reader's."""

    def __init__(
        self, name: str, readers: Sequence[PlateReader], weights: Sequence[float] | None = None
    ) -> None:
        self.name = name
        self._readers = tuple(readers)
        self._weights = tuple(weights) if weights is not None else None

    def read(
        self, image: np.ndarray, color: str | None = None, color_sure: bool = False
    ) -> ReadResult:
        results = [r.read(image, color, color_sure) for r in self._readers]
        first = results[0]  # the text and alternatives kept are the first reader's
        return ReadResult(self.name, vote(results, self._weights), first.raw, first.positions)


#: The fused reader's weights: each PlateNet a quarter, PP-OCR a half. The two networks
#: learnt from the same photos and share their blind spots (both read a night 浙JP1W22 as
#: 皖JP1W22 at 0.998: the training photos are mostly 皖), so together they weigh as much as
#: PP-OCR, whose errors are its own, and cannot make a read sure without it.
FUSED_WEIGHTS = (0.25, 0.25, 0.5)


def fused() -> VotingReader:
    from plate_recognition.engines.platenet import PlateNetReader
    from plate_recognition.engines.rapidocr import RapidOcrReader

    readers = (PlateNetReader("platenet"), PlateNetReader("platenet2"), RapidOcrReader())
    return VotingReader("fused", readers, FUSED_WEIGHTS)


def combined() -> VotingReader:
    from plate_recognition.engines.rapidocr import RapidOcrReader
    from plate_recognition.engines.tesseract import TesseractReader

    return VotingReader("combined", (RapidOcrReader(), TesseractReader()), (0.8, 0.2))

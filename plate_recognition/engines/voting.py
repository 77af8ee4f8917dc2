"""Readers that read every plate with several engines and let them vote.

``fused`` (the default): PlateNet and the general PP-OCR recogniser, equal weights. PlateNet
(trained for plates) reads degraded plates far better than PP-OCR; PP-OCR, trained on
millions of text lines, knows glyphs PlateNet never saw. The engines must agree for a read to
stay sure: PlateNet alone is not trusted with a sure read, however high its own score. On
photos it never learnt from it read 皖A099Q5 as 皖A09905 at 0.99998 (held-out seed 1002,
glare), a score the calibration put above the certain threshold, where PP-OCR disagreed.

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


def fused() -> VotingReader:
    from plate_recognition.engines.platenet import PlateNetReader
    from plate_recognition.engines.rapidocr import RapidOcrReader

    return VotingReader("fused", (PlateNetReader(), RapidOcrReader()))


def combined() -> VotingReader:
    from plate_recognition.engines.rapidocr import RapidOcrReader
    from plate_recognition.engines.tesseract import TesseractReader

    return VotingReader("combined", (RapidOcrReader(), TesseractReader()), (0.8, 0.2))

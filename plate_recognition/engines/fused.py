"""The default reader: PlateNet and the general PP-OCR recogniser, voting.

PlateNet (trained for plates) reads degraded plates far better than PP-OCR; PP-OCR, trained
on millions of text lines, knows glyphs PlateNet never saw. Each plate's score is the mean
of its scores in the two reads, a plate one read lacks counting 0, so the engines must agree
for a read to stay sure. PlateNet alone is not trusted with a sure read, however high its
own score: on photos it never learnt from it read 皖A099Q5 as 皖A09905 at 0.99998 (held-out
seed 1002, glare), a score the calibration maps above the certain threshold, where PP-OCR
disagreed. Reading every plate with both costs PP-OCR's CPU on every read.
"""

from __future__ import annotations

import numpy as np

from plate_recognition.engines.base import ReadResult, vote
from plate_recognition.engines.platenet import PlateNetReader
from plate_recognition.engines.rapidocr import RapidOcrReader


class FusedReader:
    name = "fused"

    def __init__(self) -> None:
        self._net = PlateNetReader()
        self._general = RapidOcrReader()

    def read(
        self, image: np.ndarray, color: str | None = None, color_sure: bool = False
    ) -> ReadResult:
        results = (
            self._net.read(image, color, color_sure),
            self._general.read(image, color, color_sure),
        )
        lead = max(results, key=lambda r: r.best.score if r.best else 0.0)
        return ReadResult(self.name, vote(results), lead.raw, lead.positions)

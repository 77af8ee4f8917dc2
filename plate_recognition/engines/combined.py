"""Vote between the PP-OCR and Tesseract engines (slow: both run on every plate)."""

from __future__ import annotations

import numpy as np

from plate_recognition.engines.base import ReadResult, vote
from plate_recognition.engines.rapidocr import RapidOcrReader
from plate_recognition.engines.tesseract import TesseractReader

#: Weights follow measured accuracy: Tesseract mostly breaks ties between PP-OCR's own
#: alternatives rather than overruling it.
_WEIGHTS = {"rapidocr": 0.8, "tesseract": 0.2}


class CombinedReader:
    name = "combined"

    def __init__(self) -> None:
        self._rapid = RapidOcrReader()
        self._tess = TesseractReader()

    def read(
        self, image: np.ndarray, color: str | None = None, color_sure: bool = False
    ) -> ReadResult:
        results = [
            self._rapid.read(image, color, color_sure),
            self._tess.read(image, color, color_sure),
        ]
        return ReadResult(
            engine=self.name,
            candidates=vote(results, [_WEIGHTS[result.engine] for result in results]),
            raw=results[0].raw,
            positions=results[0].positions,
        )

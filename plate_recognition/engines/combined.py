"""Vote between the PP-OCR and Tesseract engines (slow: both run on every plate)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from plate_recognition.engines.base import ReadResult
from plate_recognition.engines.rapidocr import RapidOcrReader
from plate_recognition.engines.tesseract import TesseractReader
from plate_recognition.grammar import Candidate

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
        scores: dict[str, float] = defaultdict(float)
        for result in results:
            for cand in result.candidates:
                scores[cand.plate] += _WEIGHTS[result.engine] * cand.score
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])[:10]
        return ReadResult(
            engine=self.name,
            candidates=tuple(Candidate(plate, score) for plate, score in ranked),
            raw=results[0].raw,
            positions=results[0].positions,
        )

"""Tesseract engine: the serial read by Tesseract, the province glyph by the PP-OCR model.

Stock Tesseract (even with ``chi_sim``) practically never reads the province glyph of a
real plate, so that one character is classified by the PP-OCR recogniser restricted to
the 31 province glyphs, run on the left part of the plate only. The rest goes through
Tesseract as a single text line (psm 7) with an alphanumeric whitelist, after upscaling,
colour-aware inversion (Tesseract wants dark text on light ground) and binarisation;
the grammar then fixes letter/digit positions and ranks alternatives.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytesseract

from plate_recognition.engines.base import ReadResult, freeze_positions
from plate_recognition.engines.rapidocr import RapidOcrReader
from plate_recognition.grammar import ALNUM, PROVINCES, Alternatives, rank_candidates

_HEIGHT = 80
# psm 7: one text line; no dictionaries, they only "correct" serials into words.
_CONFIG = (
    "--psm 7 --oem 1 -c tessedit_char_whitelist="
    + ALNUM
    + " -c load_system_dawg=0 -c load_freq_dawg=0"
)
#: Share of the plate width taken by the province glyph (plus the gap after it).
_PROVINCE_SHARE = 0.16


class TesseractReader:
    """Plate reader on Tesseract 5 (LSTM) for the serial."""

    name = "tesseract"

    def __init__(self) -> None:
        self._version = str(pytesseract.get_tesseract_version())  # fails early if missing
        self._province = RapidOcrReader()

    def _binarise(self, image: np.ndarray, color: str | None) -> np.ndarray:
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        scale = _HEIGHT / gray.shape[0]
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        gray = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(2, 8)).apply(gray)
        _, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        # Blue/black plates carry light characters; green/yellow/white dark ones. Without a
        # colour, the majority of pixels is the background.
        light_text = (
            color in ("blue", "black") if color else cv2.countNonZero(binary) < (binary.size / 2)
        )
        if light_text:
            binary = cv2.bitwise_not(binary)
        return cv2.copyMakeBorder(binary, 12, 12, 12, 12, cv2.BORDER_CONSTANT, value=255)

    def _serial(self, image: np.ndarray, color: str | None) -> list[Alternatives]:
        w = image.shape[1]
        binary = self._binarise(image[:, int(_PROVINCE_SHARE * w) :], color)
        data = pytesseract.image_to_data(
            binary, config=_CONFIG, output_type=pytesseract.Output.DICT
        )
        out: list[Alternatives] = []
        for text, conf in zip(data["text"], data["conf"], strict=True):
            p = max(float(conf), 1.0) / 100.0
            out.extend([(ch, p)] for ch in str(text).strip())
        return out

    def _province_alternatives(self, image: np.ndarray) -> Alternatives:
        w = image.shape[1]
        left = image[:, : max(4, int(0.3 * w))]
        for alts in self._province.positions(left):
            provinces = [(ch, p) for ch, p in alts if ch in PROVINCES]
            if provinces:
                return provinces
        return []

    def read(self, image: np.ndarray, color: str | None = None) -> ReadResult:
        positions = [self._province_alternatives(image), *self._serial(image, color)]
        return ReadResult(
            engine=self.name,
            candidates=tuple(rank_candidates(positions, color)),
            raw="".join(alts[0][0] if alts else "?" for alts in positions),
            positions=freeze_positions(positions),
        )

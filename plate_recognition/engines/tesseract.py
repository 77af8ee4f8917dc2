"""Tesseract engine: the serial read by Tesseract, the province glyph by the PP-OCR model.

Stock Tesseract (even with ``chi_sim``) practically never reads the province glyph of a
real plate, so that one character is classified by the PP-OCR recogniser restricted to
the 31 province glyphs, run on the left part of the plate only. The rest goes through
Tesseract as a single text line (psm 7) with an alphanumeric whitelist after upscaling,
colour-aware inversion (Tesseract wants dark text on light ground), binarisation and
removal of everything that is not a serial character (frame, rivets, province glyph);
the grammar then fixes letter/digit positions and ranks alternatives.

Tesseract runs in-process through tesserocr when it is installed (~10 ms a plate) and as
a ``tesseract`` subprocess through pytesseract otherwise (~250 ms a plate).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from plate_recognition.engines.base import ReadResult, freeze_positions
from plate_recognition.engines.rapidocr import RapidOcrReader
from plate_recognition.grammar import ALNUM, PROVINCES, Alternatives, rank_candidates

_HEIGHT = 80
_PAD = 16
# No dictionaries: they only "correct" serials into words.
_VARIABLES = {
    "tessedit_char_whitelist": ALNUM,
    "load_system_dawg": "0",
    "load_freq_dawg": "0",
}
_CLI_CONFIG = "--psm 7 --oem 1 " + " ".join(f"-c {k}={v}" for k, v in _VARIABLES.items())
#: Characters whose centre lies left of this share of the width belong to the province.
_PROVINCE_SHARE = 0.14
#: A character is at least this share of the plate's height; dots and rivets are less.
_MIN_CHAR_HEIGHT = 0.3
#: A character is at most this share of the plate's width; frame remnants are wider.
_MAX_CHAR_WIDTH = 0.2

#: Serial alternatives from a binarised line image (dark text on white).
LineReader = Callable[[np.ndarray], list[Alternatives]]


def _tessdata() -> str | None:
    """Folder holding ``eng.traineddata`` (the tesserocr wheel does not ship one)."""
    env = os.environ.get("TESSDATA_PREFIX")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/share/tesseract-ocr/*/tessdata"), reverse=True)
    candidates += ["/usr/share/tessdata", "/usr/local/share/tessdata"]
    return next((c for c in candidates if (Path(c) / "eng.traineddata").is_file()), None)


def _tesserocr_reader() -> LineReader | None:
    try:
        import tesserocr
    except ImportError:
        return None
    path = _tessdata()
    if path is None:
        return None
    api = tesserocr.PyTessBaseAPI(
        path=path,
        lang="eng",
        psm=tesserocr.PSM.SINGLE_LINE,
        oem=tesserocr.OEM.LSTM_ONLY,
        variables=_VARIABLES,
    )

    def read(binary: np.ndarray) -> list[Alternatives]:
        h, w = binary.shape
        api.SetImageBytes(binary.tobytes(), w, h, 1, w)
        api.Recognize()
        out: list[Alternatives] = []
        it = api.GetIterator()
        level = tesserocr.RIL.SYMBOL
        if it is not None and not it.Empty(level):
            while True:
                text = (it.GetUTF8Text(level) or "").strip()
                p = max(float(it.Confidence(level)), 1.0) / 100.0
                out.extend([(ch, p)] for ch in text)
                if not it.Next(level):
                    break
        return out

    return read


def _pytesseract_reader() -> LineReader:
    import pytesseract

    pytesseract.get_tesseract_version()  # fails early if the binary is missing

    def read(binary: np.ndarray) -> list[Alternatives]:
        data = pytesseract.image_to_data(
            binary, config=_CLI_CONFIG, output_type=pytesseract.Output.DICT
        )
        out: list[Alternatives] = []
        for text, conf in zip(data["text"], data["conf"], strict=True):
            p = max(float(conf), 1.0) / 100.0
            out.extend([(ch, p)] for ch in str(text).strip())
        return out

    return read


def serial_image(image: np.ndarray, color: str | None) -> np.ndarray:
    """The plate's serial characters, black on white, everything else erased."""
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
    ink = binary if light_text else cv2.bitwise_not(binary)
    h, w = ink.shape
    # The plate's frame: long horizontal runs and near full-height vertical strokes.
    rows = cv2.morphologyEx(
        ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (w // 5, 1))
    )
    cols = cv2.morphologyEx(
        ink, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, int(0.85 * h)))
    )
    ink = cv2.subtract(ink, cv2.bitwise_or(rows, cols))
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(ink, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    for i in range(1, n):
        keep[i] = (
            stats[i, cv2.CC_STAT_HEIGHT] >= _MIN_CHAR_HEIGHT * h
            and stats[i, cv2.CC_STAT_WIDTH] <= _MAX_CHAR_WIDTH * w
            and centroids[i][0] >= _PROVINCE_SHARE * w
        )
    clean = np.where(keep[labels], 0, 255).astype(np.uint8)
    return cv2.copyMakeBorder(clean, _PAD, _PAD, _PAD, _PAD, cv2.BORDER_CONSTANT, value=255)


class TesseractReader:
    """Plate reader on Tesseract 5 (LSTM) for the serial."""

    name = "tesseract"

    def __init__(self) -> None:
        self._line = _tesserocr_reader() or _pytesseract_reader()
        self._province = RapidOcrReader()

    def _province_alternatives(self, image: np.ndarray) -> Alternatives:
        w = image.shape[1]
        left = image[:, : max(4, int(0.3 * w))]
        for alts in self._province.positions(left):
            provinces = [(ch, p) for ch, p in alts if ch in PROVINCES]
            if provinces:
                return provinces
        return []

    def read(
        self, image: np.ndarray, color: str | None = None, color_sure: bool = False
    ) -> ReadResult:
        # Tesseract's reads carry no per-frame probabilities to constrain: ``color_sure``
        # changes nothing here.
        del color_sure
        serial = self._line(serial_image(image, color))
        positions = [self._province_alternatives(image), *serial]
        return ReadResult(
            engine=self.name,
            candidates=tuple(rank_candidates(positions, color)),
            raw="".join(alts[0][0] if alts else "?" for alts in positions),
            positions=freeze_positions(positions),
        )

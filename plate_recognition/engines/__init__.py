"""Plate reading engines behind one interface, chosen by name."""

from __future__ import annotations

from plate_recognition.engines.base import PlateReader, ReadResult

ENGINES = ("fused", "rapidocr", "platenet", "platenet2", "tesseract", "combined")
DEFAULT_ENGINE = "fused"


def get_reader(name: str = DEFAULT_ENGINE) -> PlateReader:
    """A new reader for ``name``. Construction loads models: cache it per process."""
    # Imports are local so that choosing one engine never loads another's runtime.
    if name == "rapidocr":
        from plate_recognition.engines.rapidocr import RapidOcrReader

        return RapidOcrReader()
    if name == "fused":
        from plate_recognition.engines.voting import fused

        return fused()
    if name in ("platenet", "platenet2"):
        from plate_recognition.engines.platenet import PlateNetReader

        return PlateNetReader(name)
    if name == "tesseract":
        from plate_recognition.engines.tesseract import TesseractReader

        return TesseractReader()
    if name == "combined":
        from plate_recognition.engines.voting import combined

        return combined()
    raise ValueError(f"unknown plate engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["DEFAULT_ENGINE", "ENGINES", "PlateReader", "ReadResult", "get_reader"]

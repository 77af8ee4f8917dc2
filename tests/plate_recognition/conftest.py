from __future__ import annotations

import csv
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "plates"


def load_rows() -> list[dict[str, str]]:
    with (DATA / "labels.csv").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def plate_data() -> Path:
    return DATA


@pytest.fixture(scope="session")
def real_plates() -> list[str]:
    """Ground-truth plates when the data is present (else synthetic plates only)."""
    return [r["plate"] for r in load_rows()] if (DATA / "labels.csv").is_file() else []


@pytest.fixture(scope="session")
def plate_rows() -> list[dict[str, str]]:
    if not (DATA / "labels.csv").is_file():
        pytest.skip(f"plate data not found at {DATA}")
    return load_rows()

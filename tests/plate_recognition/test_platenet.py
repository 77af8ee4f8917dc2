"""PlateNet (the plate-trained recogniser), the held-out split it is measured on, and the
default fused reader in which two PlateNets and PP-OCR vote on every plate."""

from __future__ import annotations

import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from parking.settings import Settings
from plate_recognition import calibration
from plate_recognition.conditions import degrade
from plate_recognition.engines import get_reader
from plate_recognition.engines.base import ReadResult
from plate_recognition.engines.voting import FUSED_WEIGHTS, VotingReader
from plate_recognition.evaluate import load_samples
from plate_recognition.grammar import Candidate
from plate_recognition.holdout import HOLDOUT_EVERY, held_out, unseen


def _held_out_crops(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    return [r for r in rows if r["kind"] == "crop" and held_out(r["file"])][:n]


def test_the_split_is_a_stable_hash_of_the_file_name() -> None:
    names = [f"images/{k:016x}.jpg" for k in range(4000)]
    share = sum(held_out(n) for n in names) / len(names)
    assert abs(share - 1 / HOLDOUT_EVERY) < 0.03
    for name in names[:50]:
        # Only the name counts, not the folder it was read from.
        assert held_out(name) == held_out(Path("/elsewhere") / Path(name).name)
        assert held_out(name) == (zlib.crc32(Path(name).name.encode()) % HOLDOUT_EVERY == 0)
    assert unseen("images/any.jpg", "scene")  # whole frames are never trained on


def test_eval_held_out_reads_only_unseen_photos(
    plate_data: Path, plate_rows: list[dict[str, str]]
) -> None:
    every = load_samples(plate_data)
    unseen_only = load_samples(plate_data, held_out_only=True)
    assert 0 < len(unseen_only) < len(every)
    assert all(s.kind == "scene" or held_out(s.path.name) for s in unseen_only)
    assert {s.path.name for s in every if s.kind == "scene"} <= {s.path.name for s in unseen_only}


def test_training_never_sees_a_held_out_photo(
    plate_data: Path, plate_rows: list[dict[str, str]]
) -> None:
    from parking_dev.reader_training import load_training

    training = load_training(plate_data)
    trained_plates = [plate for _, plate in training]
    crops = [r for r in plate_rows if r["kind"] == "crop"]
    assert len(training) == sum(not held_out(r["file"]) for r in crops)
    # Plates (not only files) are checked: the held-out plates that no training photo shows.
    only_held = {r["plate"] for r in crops if held_out(r["file"])} - {
        r["plate"] for r in crops if not held_out(r["file"])
    }
    assert only_held and not only_held & set(trained_plates)


@pytest.mark.parametrize("engine", ["platenet", "platenet2"])
def test_each_platenet_reads_held_out_crops(
    plate_data: Path, plate_rows: list[dict[str, str]], engine: str
) -> None:
    reader = get_reader(engine)
    rows = _held_out_crops(plate_rows, 24)
    reads = [reader.read(cv2.imread(str(plate_data / r["file"])), "blue") for r in rows]
    assert sum(read.plate == r["plate"] for read, r in zip(reads, rows, strict=True)) >= 22
    assert all(read.engine == engine for read in reads)


@pytest.mark.parametrize("engine", ["platenet", "platenet2"])
def test_each_platenet_reads_heavy_jpeg_of_held_out_crops(
    plate_data: Path, plate_rows: list[dict[str, str]], engine: str
) -> None:
    """The PP-OCR reader read 25 of these 40, 31 with its denoised re-read (2026-12-06); each
    PlateNet reads 36."""
    reader = get_reader(engine)
    rows = _held_out_crops(plate_rows, 20)
    exact = 0
    for r in rows:
        image = cv2.imread(str(plate_data / r["file"]))
        for seed in (7, 8):
            copy = degrade(image, "jpeg", Path(r["file"]).name, seed)
            exact += reader.read(copy, "blue").plate == r["plate"]
    assert exact >= 32


class _Fixed:
    """A reader whose every read is one plate at a fixed score, counting its reads."""

    def __init__(self, name: str, plate: str, score: float) -> None:
        self.name, self.plate, self.score, self.reads = name, plate, score, 0

    def read(
        self, image: np.ndarray, color: str | None = None, color_sure: bool = False
    ) -> ReadResult:
        self.reads += 1
        return ReadResult(self.name, (Candidate(self.plate, self.score),), raw=self.plate)


def _fused(first: _Fixed, second: _Fixed, general: _Fixed) -> VotingReader:
    return VotingReader("fused", (first, second, general), FUSED_WEIGHTS)


IMAGE = np.zeros((24, 94, 3), np.uint8)


def test_even_a_sure_platenet_read_is_voted_with_the_others() -> None:
    """The first PlateNet read 皖A099Q5 as 皖A09905 at 0.99998 on a held-out photo: its own
    score is not enough for a sure read, and the other two outvote it."""
    first = _Fixed("platenet", "皖A09905", 0.99998)
    second = _Fixed("platenet2", "皖A099Q5", 0.9)
    general = _Fixed("rapidocr", "皖A099Q5", 0.8)
    result = _fused(first, second, general).read(IMAGE, "blue")
    assert (result.engine, second.reads, general.reads) == ("fused", 1, 1)
    assert result.candidates == (
        Candidate("皖A099Q5", pytest.approx(0.25 * 0.9 + 0.5 * 0.8)),
        Candidate("皖A09905", pytest.approx(0.25 * 0.99998)),
    )


def test_the_two_networks_agreeing_cannot_make_a_read_sure_without_ppocr() -> None:
    """Both networks learnt from the same, mostly 皖, photos: both read a night 浙JP1W22 as
    皖JP1W22 at 0.998. With PP-OCR against them, the shipped calibration keeps the read below
    the certain threshold and below a charge's verification agreement."""
    first = _Fixed("platenet", "皖JP1W22", 0.998)
    second = _Fixed("platenet2", "皖JP1W22", 0.999)
    general = _Fixed("rapidocr", "浙JP1W22", 0.98)
    result = _fused(first, second, general).read(IMAGE, "blue")
    assert [c.plate for c in result.candidates] == ["皖JP1W22", "浙JP1W22"]
    calibrate = calibration.calibrator("fused")
    assert calibrate is not None
    score = calibrate(result.candidates[0].score)
    assert score < calibration.certain_threshold("fused")
    assert score < Settings().verify_agree_score


def test_agreeing_engines_keep_their_weighted_mean_score() -> None:
    first, second = _Fixed("platenet", "皖A12345", 0.97), _Fixed("platenet2", "皖A12345", 0.95)
    general = _Fixed("rapidocr", "皖A12345", 0.99)
    result = _fused(first, second, general).read(IMAGE, "blue")
    assert result.candidates == (Candidate("皖A12345", pytest.approx(0.975)),)

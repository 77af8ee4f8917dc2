"""Which plate a capture shows: the camera's own read when it is confident, else server-side
OCR of the capture's frames in a process pool (never on the event loop), frames voting."""

import asyncio
import base64
import binascii
import multiprocessing
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from typing import Literal

from gate_controller.protocol import CameraRead, Capture
from parking.lanes.repository import CameraOwnRead
from parking.lanes.rules import FrameRead, of_plate
from parking.logging import configure_logging, get_logger
from parking.settings import Settings
from plate_recognition.calibration import is_small_plate
from plate_recognition.grammar import Candidate, candidates_from_text, is_valid, normalise
from plate_recognition.pipeline import Recognition, reader, recognise, vote

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class PlateReading:
    """A capture's read (a `rules.Read`): ranked candidates, the plate's colour as the camera
    or the OCR saw it (None: unknown, and then the read is not certain of the vehicle), and
    the camera model whose calibration its score follows."""

    candidates: tuple[Candidate, ...]
    # "operator": a person settled a held capture's plate (see `operator_reading`).
    source: Literal["camera", "ocr", "none", "operator"]
    raw: str | None = None
    image: bytes | None = None  # the first frame, kept for an operator if a person must decide
    color: str | None = None
    model: str | None = None
    # The server's reads of each frame, when it read them (`ocr_reading`).
    frames: tuple[FrameRead, ...] = ()
    # A server read's colour was shown surely by a frame (hue and character polarity agreeing),
    # not a guess nor the camera's (`rules.is_certain`).
    color_sure: bool = False

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


def operator_reading(plate: str, color: str | None) -> PlateReading:
    """An attendant's decision on a held capture: a person looked at the car and chose or typed
    the (grammatical, normalised) plate, so it is as certain as a read can be (with the colour
    the camera saw, or the plate's grammar's). Like a certain camera read, it is taken as it is
    and never bent onto a look-alike parked plate."""
    return PlateReading((Candidate(plate, 1.0),), "operator", plate, color=color)


def decode_frames(capture: Capture) -> list[bytes]:
    """The capture's frames as bytes; ValueError when one is not valid base64."""
    try:
        return [base64.b64decode(frame, validate=True) for frame in capture.frames()]
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image is not valid base64: {exc}") from exc


def _read_frame(data: bytes, engine: str, certain_score: float) -> Recognition | None:
    """Runs in a pool process. An image the reader cannot take (undecodable, too large, one an
    OpenCV or model call refuses) is an unreadable frame, not an error: raised, it would leave
    the capture unanswered, resent by the gate for ever. A small plate's read stays below the
    lane's own certain threshold too."""
    try:
        return recognise(data, engine=engine, certain_score=certain_score)
    except ValueError:
        return None
    except Exception as exc:  # cv2.error, onnxruntime's errors, MemoryError's kin
        # Logged with its message: a reader bug shows as every frame unreadable otherwise.
        log.warning("lane.frame_unreadable", error=f"{type(exc).__name__}: {exc}"[:300])
        return None


def _load_engine(engine: str) -> None:
    reader(engine)


class PlateReader:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            key = self.settings.log_pseudonym_key
            # spawn: the parent runs threads (paho, asyncpg), which fork would copy half-way.
            self._pool = ProcessPoolExecutor(
                max_workers=self.settings.ocr_workers,
                mp_context=multiprocessing.get_context("spawn"),
                # A spawned child inherits no logging: its lines are masked and formatted as
                # ours only once configured.
                initializer=configure_logging,
                initargs=(
                    self.settings.log_level,
                    self.settings.log_json,
                    key.get_secret_value() if key else None,
                ),
            )
        return self._pool

    async def _read_frames(
        self, pool: ProcessPoolExecutor, frames: list[bytes]
    ) -> list[Recognition | None]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(
            *(
                loop.run_in_executor(
                    pool,
                    _read_frame,
                    f,
                    self.settings.ocr_engine,
                    self.settings.plate_certain_score,
                )
                for f in frames
            )
        )

    async def warm_up(self) -> None:
        """Starts every pool process and loads its model, so the first captures do not pay."""
        loop = asyncio.get_running_loop()
        pool = self._executor()
        await asyncio.gather(
            *(
                loop.run_in_executor(pool, _load_engine, self.settings.ocr_engine)
                for _ in range(self.settings.ocr_workers * 2)
            )
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def read_frames(self, frames: list[bytes]) -> list[Recognition | None]:
        """Each of the first PARKING_OCR_MAX_FRAMES frames read in the pool (None: not an
        image). A pool a process of which died (out of memory on a hostile image, say) is
        replaced and the frames read again; broken twice, they are unreadable, for a person,
        rather than a capture left unanswered that the gate resends into every new pool."""
        frames = frames[: self.settings.ocr_max_frames]
        for _ in range(2):
            pool = self._executor()
            try:
                return await self._read_frames(pool, frames)
            except BrokenProcessPool:
                log.error("lane.ocr_pool_broken")
                self._replace(pool)
        log.error("lane.ocr_frames_unreadable", frames=len(frames))
        return [None] * len(frames)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """Drops the broken pool, once: every capture that was waiting on it lands here, and
        one that already got the new pool must not see it shut down under its reads."""
        if self._pool is broken:
            self._pool = None
            broken.shutdown(wait=False)

    async def read_again(self, capture: Capture, frames: list[bytes]) -> PlateReading:
        """The frames read by the server alone (`second_reading`)."""
        recognitions = [r for r in await self.read_frames(frames) if r is not None]
        return second_reading(capture.camera_read, recognitions, frames[0])

    async def read(self, capture: Capture, frames: list[bytes]) -> PlateReading:
        camera = capture.camera_read
        decided = camera_reading(camera, self.settings.camera_min_confidence, bool(frames))
        if decided is not None:
            return decided
        results = await self.read_frames(frames)
        recognitions = [r for r in results if r is not None]
        reading = ocr_reading(camera, recognitions, frames[0])
        log.info(
            "lane.ocr_read",
            frames=len(frames),
            read=len(recognitions),
            score=round(reading.candidates[0].score, 3) if reading.candidates else None,
        )
        return reading


def camera_reading(
    camera: CameraRead | None, min_confidence: float, has_frames: bool
) -> PlateReading | None:
    """The read when the camera's own decides it (pure: the misread simulation reads with it):
    a confident camera read, or whatever the camera offers when there are no frames to read.
    None: the frames are to be read (`ocr_reading`)."""
    color, model = (camera.color, camera.model) if camera else (None, None)
    if camera and camera.confidence >= min_confidence:
        plate = normalise(camera.plate)
        if plate is not None and is_valid(plate):
            # The hot path: a confident, grammatical camera read is taken as it is (whether
            # it is *certain* is the exit decision's question: lanes.rules.is_certain).
            return PlateReading(
                (Candidate(plate, camera.confidence),),
                "camera",
                camera.plate,
                None,
                color,
                model,
            )
    camera_candidates = _camera_candidates(camera) if camera else []
    if camera and camera.confidence >= min_confidence:
        return PlateReading(tuple(camera_candidates), "camera", camera.plate, None, color, model)
    if not has_frames:
        source: Literal["camera", "none"] = "camera" if camera_candidates else "none"
        return PlateReading(
            tuple(camera_candidates),
            source,
            camera.plate if camera else None,
            None,
            color,
            model,
        )
    return None


def ocr_reading(
    camera: CameraRead | None, recognitions: list[Recognition], first_frame: bytes | None
) -> PlateReading:
    """The frames' reads voting, with a doubtful camera read as one more frame (pure)."""
    color = camera.color if camera else None
    camera_candidates = _camera_candidates(camera) if camera else []
    merged = _merge(vote(recognitions), camera_candidates)
    # The colour the frames show, by majority, a colour shown surely before any guessed (the
    # camera's own guess breaks no tie: it is the doubtful read). It is sure when the frames of
    # the plate read that show a colour surely all show the same one.
    best = merged[0].plate if merged else None
    sure = Counter(
        r.color
        for r in recognitions
        if r.color and r.color_sure and best and of_plate(r.plate, best)
    )
    guessed = Counter(r.color for r in recognitions if r.color)
    shown = sure or guessed
    ocr_color = shown.most_common(1)[0][0] if shown else color
    raw = next((r.raw for r in recognitions if r.raw), camera.plate if camera else None)
    return PlateReading(
        tuple(merged),
        "ocr",
        raw,
        first_frame,
        ocr_color,
        frames=frame_reads(recognitions),
        color_sure=len(sure) == 1,
    )


def second_reading(
    camera: CameraRead | None, recognitions: list[Recognition], first_frame: bytes | None
) -> PlateReading:
    """The server's own read of a capture whose camera read found no stay (pure;
    `rules.wants_second_reader`): the frames alone voting, the camera's doubtful text left out
    (it is what is in doubt), its colour only when no frame shows one."""
    reading = ocr_reading(None, recognitions, first_frame)
    if reading.color is None and camera is not None:
        return replace(reading, color=camera.color)
    return reading


def camera_own_read(camera: CameraRead | None, reading: PlateReading) -> CameraOwnRead | None:
    """The camera's own read kept beside a capture's read when the server's reader made it
    (pure: the lane records it, the misread simulation too): the end's second reader at a
    charge's verification (`rules.frames_to_verify`). None when the camera decided the read
    itself, an operator did, or the camera sent no read."""
    if camera is None or reading.source != "ocr":
        return None
    return CameraOwnRead(camera.plate, camera.color, camera.confidence, camera.model)


def frame_reads(recognitions: Sequence[Recognition | None]) -> tuple[FrameRead, ...]:
    """Each frame's top read (None: no plate found) with its calibrated score: what a charge's
    verification weighs (`rules.verify_charge`)."""
    return tuple(
        FrameRead(
            r.candidates[0].plate,
            r.candidates[0].score,
            r.color,
            r.color_sure,
            is_small_plate(r.plate_px),
        )
        if r is not None and r.candidates
        else FrameRead(None, 0.0)
        for r in recognitions
    )


def _camera_candidates(camera: CameraRead) -> list[Candidate]:
    """A camera's confidence is for its whole read: a grammatical read keeps it as its score,
    followed by the grammar's alternatives (which only matter when matching a doubtful read)."""
    alternatives = candidates_from_text(camera.plate, camera.confidence, camera.color)
    plate = normalise(camera.plate)
    if plate is None or not is_valid(plate):
        return alternatives
    return [Candidate(plate, camera.confidence), *(c for c in alternatives if c.plate != plate)]


def _merge(voted: list[Candidate], camera: list[Candidate]) -> list[Candidate]:
    if not camera:
        return voted
    scores: dict[str, float] = {}
    for candidate in [*voted, *camera]:
        scores[candidate.plate] = max(scores.get(candidate.plate, 0.0), candidate.score)
    return [Candidate(p, s) for p, s in sorted(scores.items(), key=lambda kv: -kv[1])]

"""A second reader for a charge on one reader's word (issue #15).

The lane opens the gate for a bound car at once and records its charge 'awaiting_verification'
when the stay's reads are not both *proven* (rules.is_proven: certain by a calibrated score).
The outbox worker's 'verify_charge' job runs this after the car has left, never on the gate's
path: the server's reader reads the entry's and the exit's kept frames in a process pool and
`rules.verify_charge` decides. An end the camera read is corroborated by the server's frames;
an end the server's reader decided, by the camera's own read of it (kept in the capture's
row) naming the same vehicle with the frames agreeing (`rules.frames_to_verify`). Verified:
the charge goes on (pending, accrued, queued, once). Otherwise it waits for an operator with
both frames (`awaiting_confirmation`), as a charge on doubtful reads does. The misread
simulation decides with the same `verify_charge`.
"""

from collections.abc import Sequence
from typing import Any

import asyncpg

from billing import audit, charges
from parking.lanes import repository as repo
from parking.lanes.reading import PlateReader, frame_reads
from parking.lanes.repository import CameraOwnRead
from parking.lanes.rules import (
    FrameRead,
    Identity,
    Verification,
    camera_names,
    frames_to_verify,
    has_second_reader,
    verify_charge,
)
from parking.logging import get_logger
from parking.settings import Settings

log = get_logger(__name__)


def _reads(reads: Sequence[FrameRead] | None) -> list[dict[str, Any]] | None:
    if reads is None:
        return None
    return [
        {
            "plate": r.plate,
            "score": round(r.score, 4),
            "color": r.color,
            "color_sure": r.color_sure,
            "small": r.small,
        }
        for r in reads
    ]


def _camera(
    identity: Identity, proven: bool, source: str | None, camera: CameraOwnRead | None
) -> dict[str, Any] | None:
    """The camera's own read of an end the server's reader decided, as the verification
    weighed it (`has_second_reader`): its text, colour, uncalibrated confidence and model, and
    whether it named the stay's vehicle. None when none was weighed (a proven end, an end the
    camera decided, no read from the camera)."""
    if proven or source != "ocr" or camera is None:
        return None
    return {
        "plate": camera.text,
        "color": camera.color,
        "confidence": round(camera.confidence, 4),
        "model": camera.model,
        "names_vehicle": camera_names(camera, identity),
    }


class ChargeVerifier:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.verification = Verification.from_settings(settings)
        # Its own pool of reader processes, started at the first charge to verify: the lane's
        # pool reads the gates' frames and must not queue behind this.
        self.reader = PlateReader(settings)

    def close(self) -> None:
        self.reader.close()

    async def _frames(
        self,
        identity: Identity,
        proven: bool,
        source: str | None,
        camera: CameraOwnRead | None,
        images: list[bytes],
    ) -> Sequence[FrameRead] | None:
        """One end's frames as `frames_to_verify` lets them count (read only when they do)."""
        wanted = not proven and has_second_reader(identity, source, camera)
        reads = frame_reads(await self.reader.read_frames(images)) if wanted else ()
        return frames_to_verify(identity, proven, source, reads, camera)

    async def __call__(self, charge_id: int) -> None:
        async with self.pool.acquire() as conn:
            evidence = await repo.charge_evidence(conn, charge_id)
        if evidence is None or evidence.status != "awaiting_verification":
            return  # decided already (a job run twice), or gone
        identity = (evidence.plate, evidence.plate_color)
        entry = await self._frames(
            identity,
            evidence.entry_proven,
            evidence.entry_source,
            evidence.entry_camera,
            evidence.entry_frames,
        )
        exit_ = await self._frames(
            identity,
            evidence.exit_proven,
            evidence.exit_source,
            evidence.exit_camera,
            evidence.exit_frames,
        )
        verdict = verify_charge(identity, (entry, exit_), self.verification)
        found = {
            "verdict": verdict.outcome,
            # Why a person decides, and which end's frames it rests on (None when verified).
            "reason": verdict.reason,
            "end": verdict.end,
            "entry": _reads(entry),
            "exit": _reads(exit_),
            # The camera's own reads weighed as an end's second reader.
            "camera": {
                "entry": _camera(
                    identity, evidence.entry_proven, evidence.entry_source, evidence.entry_camera
                ),
                "exit": _camera(
                    identity, evidence.exit_proven, evidence.exit_source, evidence.exit_camera
                ),
            },
        }
        async with self.pool.acquire() as conn, conn.transaction():
            if verdict.outcome == "verified":
                decided = await charges.verified(conn, charge_id, found) is not None
            else:
                decided = await charges.refer_to_operator(conn, charge_id, found)
            if decided:
                await audit.record(
                    conn,
                    "system:verifier",
                    f"charge.{verdict.outcome}",
                    f"charge:{charge_id}",
                    found,
                )
        log.info(
            "charge.verification",
            charge_id=charge_id,
            verdict=verdict.outcome,
            reason=verdict.reason,
            decided=decided,
        )

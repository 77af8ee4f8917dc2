from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from parking.text import NO_NUL


class CameraReadSummary(BaseModel):
    """The camera's own read of a capture whose read the server's reader made."""

    plate: str
    color: str | None
    confidence: float

    @classmethod
    def of(
        cls, plate: str | None, color: str | None, confidence: float | None
    ) -> "CameraReadSummary | None":
        """From a capture's `camera_*` columns; None when the camera's read was not kept."""
        if plate is None or confidence is None:
            return None
        return cls(plate=plate, color=color, confidence=round(confidence, 4))


class ReadSummary(BaseModel):
    """A capture's read as the lane recorded it."""

    source: str | None
    confidence: float | None
    certain: bool | None
    image_url: str | None
    # With source 'ocr': what the camera itself read (the end's second reader), if it sent one.
    camera: CameraReadSummary | None = None


class Confirmation(BaseModel):
    id: int  # the charge's
    car_park: str
    plate: str
    plate_color: str
    entered_at: datetime
    exited_at: datetime | None
    amount_fen: int
    created_at: datetime
    match_status: str | None
    entry: ReadSummary
    exit: ReadSummary
    # What the server's reader found in the frames when it checked the charge first
    # ({"verdict": "refuted" | "unconfirmed", "reason" and "end": why, at which end
    # (parking.lanes.rules.Verdict), "entry", "exit": each frame's plate, score,
    # colour, "camera": {"entry", "exit": the camera's own read it weighed for that end, its
    # plate, colour, confidence, model and whether it named the vehicle, or None}}); None when
    # the charge was never verified.
    verification: dict[str, Any] | None = None
    # The vehicle left again later with no entry record and was asked the fixed fee at the gate:
    # its car may never have left at this exit (another car's, read as it), and confirming
    # would charge the stay on top of that fee.
    left_again_at: datetime | None = None


class ConfirmationDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Why (kept in the audit log): what the frames showed.
    reason: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=500, pattern=NO_NUL),
    ] = Field(description="what the operator saw in the entry and exit frames")


class Decided(BaseModel):
    id: int
    status: Literal["pending", "rejected"]
    session_id: int
    # The exception the rejected exit waits in for the right plate.
    exception_id: int | None = None
    # Whether the rejected stay was opened again (its car may still be inside).
    reopened: bool | None = None

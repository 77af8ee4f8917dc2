"""The lane's outputs: the barrier relay and the display above it.

Real drivers (a relay on a serial port or GPIO, the LED display's protocol) implement these
Protocols; the simulated ones record what they were told, for the tests and for dry runs.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)


class Barrier(Protocol):
    async def open(self, reason: str) -> None:
        """Lifts the barrier once; it closes by itself after the car has passed."""
        ...


class Display(Protocol):
    async def show(self, lines: list[str], *, qr_url: str | None = None) -> None:
        """Replaces what the display shows; `qr_url`: a payment QR code to show with it."""
        ...


@dataclass(frozen=True, slots=True)
class Opening:
    reason: str
    at: datetime


@dataclass
class SimulatedRelay:
    """A barrier that only records its openings."""

    openings: list[Opening] = field(default_factory=list)

    async def open(self, reason: str) -> None:
        self.openings.append(Opening(reason, datetime.now(UTC)))
        log.info("barrier.opened", reason=reason, count=len(self.openings))


@dataclass
class SimulatedDisplay:
    """A display that only records what it showed (it may show plates: never logged)."""

    shown: list[list[str]] = field(default_factory=list)
    qr_url: str | None = None

    async def show(self, lines: list[str], *, qr_url: str | None = None) -> None:
        self.shown.append(list(lines))
        self.qr_url = qr_url

    @property
    def current(self) -> list[str]:
        return self.shown[-1] if self.shown else []

"""What the route modules share: the provider's state as a dependency, header and body types."""

from typing import Annotated

from fastapi import Depends, Header, Request
from pydantic import Field

from parking_dev.sandbox.provider import Sandbox

# Keys appear in URLs (`/v1/orders/{out_trade_no}`, the pay link), so they stay URL-safe.
KEY_PATTERN = r"^[A-Za-z0-9_.:-]+$"
IdempotencyKey = Annotated[str, Header(min_length=8, max_length=64, pattern=KEY_PATTERN)]
AmountFen = Annotated[int, Field(gt=0, strict=True)]
NotifyUrl = Annotated[str | None, Field(default=None, max_length=500, pattern=r"^https?://")]


def _sandbox(request: Request) -> Sandbox:
    sandbox: Sandbox = request.app.state.sandbox
    return sandbox


# The app's provider state (`app.state.sandbox`), looked up per request.
SandboxDep = Annotated[Sandbox, Depends(_sandbox)]


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")

"""Proof that a driver owns the vehicle whose plate they bind: the vehicle registry (the data of
the vehicle's licence, 行驶证) behind one interface.

One registry per app, kept on `app.state.vehicle_registry`. Production puts its registry
adapter there when it builds the app; when nothing was put there, the first request that needs
one creates a `DevRegistry` and keeps it, so the demo and the tests register vehicles on the
same instance the API asks (`registry_of(app)`).

The licence number itself is never stored: a binding keeps `licence_ref`, a salted slow hash
of it (scrypt, as for passwords), which can later confirm that a presented licence is the one
that proved the binding and reads back nothing.
"""

import asyncio
import unicodedata
from dataclasses import dataclass
from typing import Literal, Protocol

from fastapi import FastAPI

from parking.auth.tokens import hash_password, verify_password
from parking.errors import AppError

# How far a registry's answer proves that the claimant owns the vehicle (plate, colour):
# - "registered_owner": the registry's own record of the vehicle names this licence and owner.
#   It proves who owns the vehicle now, also against an earlier binding by someone else (a car
#   sold since): a dispute it answers ends, and the binding moves.
# - "unrecorded": accepted although the registry holds no record to compare (the dev
#   registry's `DEV-<plate>`): enough to bind a free plate, never to take one from its holder.
# - "not_proven": the registry does not confirm it.
Proof = Literal["registered_owner", "unrecorded", "not_proven"]


class VehicleRegistry(Protocol):
    # Recorded on the binding as `verified_by`.
    name: str

    async def prove(self, plate: str, color: str, licence_no: str, owner_name: str) -> Proof:
        """What the registry says of this vehicle (canonical plate, plate colour: a yellow
        浙A12345 is another vehicle than the blue one) with this licence number and owner."""
        ...


def canonical_licence_no(licence_no: str) -> str:
    return unicodedata.normalize("NFKC", licence_no).strip().upper()


def _canonical_name(owner_name: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", owner_name).split()).casefold()


@dataclass(frozen=True, slots=True)
class _Vehicle:
    licence_no: str
    owner_name: str


class DevRegistry:
    """An in-memory registry for laptops, the demo and the tests, keyed like a real one by
    (plate, colour).

    A registered vehicle is proven only by its licence number and owner, and that proof is
    the registry's own record ("registered_owner"). A vehicle nobody registered is proven by
    the licence number `dev_licence_no(plate)` (any owner name), without a record
    ("unrecorded"), so a vehicle can be bound from /docs without registering it first.
    """

    name = "dev-registry"

    def __init__(self) -> None:
        self._vehicles: dict[tuple[str, str], _Vehicle] = {}

    def register(self, plate: str, color: str, licence_no: str, owner_name: str) -> None:
        """Records (or replaces, as when a car is sold) the vehicle (canonical `plate`,
        `color`)."""
        self._vehicles[(plate, color)] = _Vehicle(
            canonical_licence_no(licence_no), _canonical_name(owner_name)
        )

    async def prove(self, plate: str, color: str, licence_no: str, owner_name: str) -> Proof:
        known = self._vehicles.get((plate, color))
        if known is None:
            if canonical_licence_no(licence_no) == dev_licence_no(plate):
                return "unrecorded"
            return "not_proven"
        if known == _Vehicle(canonical_licence_no(licence_no), _canonical_name(owner_name)):
            return "registered_owner"
        return "not_proven"


def dev_licence_no(plate: str) -> str:
    """The licence number that proves a plate the `DevRegistry` has no record of."""
    return f"DEV-{plate}"


def registry_of(app: FastAPI) -> VehicleRegistry:
    """The app's registry; a `DevRegistry` (created on first use) only where dev adapters are
    allowed (PARKING_DEV_ADAPTERS): it proves any plate with `DEV-<plate>`, so it fails closed."""
    registry: VehicleRegistry | None = getattr(app.state, "vehicle_registry", None)
    if registry is None:
        if not app.state.runtime.settings.dev_adapters:
            raise AppError(
                503, "vehicle_registry_unavailable", "plate ownership cannot be checked now"
            )
        registry = DevRegistry()
        app.state.vehicle_registry = registry
    return registry


async def licence_ref(licence_no: str) -> str:
    """What a binding stores of the licence number that proved it (hashed off the event loop:
    scrypt takes tens of milliseconds)."""
    return await asyncio.to_thread(hash_password, canonical_licence_no(licence_no))


async def same_licence(licence_no: str, ref: str | None) -> bool | None:
    """Whether `licence_no` is the licence a stored `licence_ref` was made of (None: no ref)."""
    if ref is None:
        return None
    return await asyncio.to_thread(verify_password, canonical_licence_no(licence_no), ref)

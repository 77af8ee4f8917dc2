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
from typing import Protocol

from fastapi import FastAPI

from parking.auth.tokens import hash_password
from parking.errors import AppError


class VehicleRegistry(Protocol):
    # Recorded on the binding as `verified_by`.
    name: str

    async def verify(self, plate: str, color: str, licence_no: str, owner_name: str) -> bool:
        """Whether the registry has this vehicle (canonical plate, plate colour) with this
        licence number and owner."""
        ...


def canonical_licence_no(licence_no: str) -> str:
    return unicodedata.normalize("NFKC", licence_no).strip().upper()


def _canonical_name(owner_name: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", owner_name).split()).casefold()


@dataclass(frozen=True, slots=True)
class _Vehicle:
    color: str
    licence_no: str
    owner_name: str


class DevRegistry:
    """An in-memory registry for laptops, the demo and the tests.

    A registered plate is proven only by its registered colour, licence number and owner.
    A plate nobody registered is proven by the licence number `dev_licence_no(plate)` (any
    owner name), so a vehicle can be bound from /docs without registering it first.
    """

    name = "dev-registry"

    def __init__(self) -> None:
        self._vehicles: dict[str, _Vehicle] = {}

    def register(self, plate: str, color: str, licence_no: str, owner_name: str) -> None:
        """Records (or replaces, as when a car is sold) the vehicle with canonical `plate`."""
        self._vehicles[plate] = _Vehicle(
            color, canonical_licence_no(licence_no), _canonical_name(owner_name)
        )

    async def verify(self, plate: str, color: str, licence_no: str, owner_name: str) -> bool:
        known = self._vehicles.get(plate)
        if known is None:
            return canonical_licence_no(licence_no) == dev_licence_no(plate)
        return known == _Vehicle(
            color, canonical_licence_no(licence_no), _canonical_name(owner_name)
        )


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

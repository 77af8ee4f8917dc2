"""Validation against the official APDS v4 OpenAPI document (tests/fixtures/apds/): its
component schemas as JSON Schema 2020-12 (as OpenAPI 3.1 says), references resolved within the
document, formats (date-time, e-mail) checked."""

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENT = Path(__file__).resolve().parent / "fixtures" / "apds" / "apds4.yaml"
_URI = "urn:apds:v4"


@cache
def document() -> dict[str, Any]:
    """The document as published."""
    loaded: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    return loaded


@cache
def _patched() -> dict[str, Any]:
    """The document with its one unsatisfiable schema fixed (see fixtures/apds/README.md)."""
    patched = copy.deepcopy(document())
    del patched["components"]["schemas"]["Reference"]["maxProperties"]
    return patched


@cache
def _registry() -> Registry:
    return Registry().with_resource(_URI, Resource(_patched(), specification=DRAFT202012))


def schema_errors(component: str, instance: Any, *, patched: bool = True) -> list[str]:
    """What is wrong with `instance` as an APDS `component` (empty: it conforms)."""
    registry = (
        _registry()
        if patched
        else Registry().with_resource(_URI, Resource(document(), specification=DRAFT202012))
    )
    validator = Draft202012Validator(
        {"$ref": f"{_URI}#/components/schemas/{component}"},
        registry=registry,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )
    return [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(instance)
    ]


def response_component(path: str, method: str, status: int) -> str:
    """The schema the document gives for an answer of `method path` with `status`."""
    operation = document()["paths"][path][method]
    ref: str = operation["responses"][str(status)]["content"]["application/json"]["schema"]["$ref"]
    return ref.rsplit("/", 1)[1]


def discriminated(component: str, value: str) -> str:
    """The schema a `discriminator` of `component` maps `value` to (jsonschema ignores
    discriminators, so items are checked against it explicitly)."""
    mapping = document()["components"]["schemas"][component]["discriminator"]["mapping"]
    ref: str = mapping[value]
    return ref.rsplit("/", 1)[1]

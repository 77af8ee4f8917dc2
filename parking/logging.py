"""structlog configuration: dotted event names, a correlation id, no personal data in clear.

Plates and phone numbers must never reach a log line readable. Callers pass them through
`pseudonym()`, and processors mask any key named like personal data, and plates and phones
quoted in error texts, as a safety net.
"""

import copy
import hashlib
import hmac
import logging
import re
import secrets
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TextIO

import structlog
import uvicorn.config

if TYPE_CHECKING:
    from parking.settings import Settings

correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)

_PERSONAL_KEYS = frozenset({"plate", "phone", "plates", "candidates", "body"})
# Texts that quote what they are about: a traceback, a provider's or a validation's error
# message (a pydantic error repeats the input, a WeChat answer's plate_number included).
_FREE_TEXT_KEYS = frozenset({"exception", "error", "reason", "why"})
_pseudonym_key = secrets.token_bytes(32)


def pseudonym(value: str) -> str:
    """Stable keyed hash of a plate or phone: equal inputs correlate, nothing reads back."""
    digest = hmac.new(_pseudonym_key, value.encode(), hashlib.sha256).hexdigest()
    return f"p_{digest[:12]}"


def mask_plate(plate: str) -> str:
    """For people (dashboard feed, demo output): keep the province and last two characters."""
    if len(plate) <= 3:
        return "*" * len(plate)
    return plate[:1] + "*" * (len(plate) - 3) + plate[-2:]


def _add_correlation_id(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    cid = correlation_id.get()
    if cid is not None:
        event.setdefault("cid", cid)
    return event


def _mask_personal(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in _PERSONAL_KEYS & event.keys():
        value = event[key]
        if isinstance(value, str) and not value.startswith("p_"):
            event[key] = pseudonym(value)
        elif isinstance(value, list | tuple):
            event[key] = [pseudonym(str(v)) for v in value]
    return event


def _mask_free_text(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in _FREE_TEXT_KEYS & event.keys():
        if isinstance(event[key], str):
            event[key] = mask_plates_in_text(event[key])
    return event


def configure_logging(
    level: str = "INFO", json: bool = False, key: str | None = None, stream: TextIO | None = None
) -> None:
    global _pseudonym_key
    if key:
        _pseudonym_key = key.encode()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_correlation_id,
            _mask_personal,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks as text, without local variables (which hold plates), then masked
            # with the other free texts: database errors quote the offending key, e.g.
            # "Key (plate)=(浙A12345)".
            structlog.processors.format_exc_info,
            _mask_free_text,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def configure_from(settings: "Settings", stream: TextIO | None = None) -> None:
    """The configuration every process of ours starts with (spawned children included: they
    inherit nothing, and an unconfigured structlog prints every event unmasked)."""
    key = settings.log_pseudonym_key
    configure_logging(
        settings.log_level, settings.log_json, key.get_secret_value() if key else None, stream
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


_PLATE_IN_TEXT = re.compile(r"[\u4e00-\u9fff][A-Z][A-Z0-9]{4,6}[\u4e00-\u9fff]?")
_PHONE_IN_TEXT = re.compile(r"(?<!\d)(?:\+?86[- ]?)?1[3-9]\d{9}(?!\d)")


def mask_plates_in_text(text: str) -> str:
    """Masks plates and mobile numbers found anywhere in a text."""
    text = _PLATE_IN_TEXT.sub(lambda m: mask_plate(m.group(0)), text)
    return _PHONE_IN_TEXT.sub(lambda m: m.group(0)[:3] + "****" + m.group(0)[-4:], text)


class MaskPersonalData(logging.Filter):
    """For stdlib loggers that bypass structlog (uvicorn's: "Exception in ASGI application" with
    the traceback of a 500, whose database error quotes the row, plate included): the message
    and its traceback become one text, masked like our own free texts, before any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{logging.Formatter().formatException(record.exc_info)}"
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = mask_plates_in_text(message), ()
        return True


def server_log_config() -> dict[str, Any]:
    """uvicorn's own logging configuration, its records masked (`MaskPersonalData`)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["filters"] = {"personal_data": {"()": MaskPersonalData}}
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        config["loggers"].setdefault(name, {})["filters"] = ["personal_data"]
    return config

"""The sandbox's injected failures: `FaultConfig`, and the command-line flags that set it."""

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


@dataclass
class FaultConfig:
    """What goes wrong, and how often (probabilities in [0, 1], drawn from a seeded rng)."""

    error_rate: float = 0.0  # 503 before doing anything
    lost_response_rate: float = 0.0  # the request takes effect, then 503
    timeout_rate: float = 0.0  # hang timeout_s before taking effect
    slow_after_apply_rate: float = 0.0  # take effect, then hang timeout_s before answering
    timeout_s: float = 10.0
    # A deduction stays "processing" this long; 0 decides it within the request (the
    # synchronous success most agreement deductions get), answered 200 instead of 202.
    processing_delay_s: float = 0.05
    decline_rate: float = 0.0  # deductions declined for insufficient funds
    declined_agreements: set[str] = field(default_factory=set)  # always declined
    # Refusals of a charge request, each with the error code a real provider gives. The
    # driver's side: the driver paused the pay-later service (403 agreement_paused). The
    # merchant's side: an agreement number the provider does not know (404
    # agreement_not_found), the merchant's credentials refused (401 unauthorized); an
    # over-long description is a 400 invalid_request and a reused key a 409 by themselves.
    paused_agreements: set[str] = field(default_factory=set)
    unknown_agreements: set[str] = field(default_factory=set)
    unauthorized_rate: float = 0.0  # 401 before doing anything
    notify_url: str | None = None  # for orders created without their own notify_url
    notify_retry_s: tuple[float, ...] = (0.2, 1.0, 5.0)  # waits between delivery attempts
    lost_notification_rate: float = 0.0  # never sent: the merchant must query the order
    duplicate_notification_rate: float = 0.0  # the same event delivered twice
    late_notification_rate: float = 0.0  # delivered late_notification_s after the outcome
    late_notification_s: float = 2.0
    forged_notification_rate: float = 0.0  # plus a wrongly signed one with other status/amount
    statement_timezone: str = "Asia/Shanghai"  # the day boundaries of statement files
    seed: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_rate") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name} must be between 0 and 1, not {value}")
            if f.name.endswith("_s") and f.name != "notify_retry_s" and value < 0:
                raise ValueError(f"{f.name} must not be negative, not {value}")
        if any(wait < 0 for wait in self.notify_retry_s):
            raise ValueError("notify_retry_s must not contain negative waits")
        try:
            ZoneInfo(self.statement_timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown statement_timezone {self.statement_timezone!r}") from exc

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["declined_agreements"] = sorted(self.declined_agreements)
        data["paused_agreements"] = sorted(self.paused_agreements)
        data["unknown_agreements"] = sorted(self.unknown_agreements)
        data["notify_retry_s"] = list(self.notify_retry_s)
        return data


FAULT_FIELDS = frozenset(f.name for f in fields(FaultConfig))


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability between 0 and 1, not {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"seconds must not be negative, not {text}")
    return value


def _seconds_list(text: str) -> tuple[float, ...]:
    return tuple(_seconds(part) for part in text.split(",") if part.strip())


def _timezone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"unknown time zone {text!r}") from exc
    return text


# (flag, FaultConfig field, parser, metavar, help) for every fault but the agreement sets.
_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str, str], ...] = (
    ("--error-rate", "error_rate", _rate, "P", "share of requests answered 503 at once"),
    ("--unauthorized-rate", "unauthorized_rate", _rate, "P",
     "share of requests answered 401 (the merchant's credentials refused)"),
    ("--lost-response-rate", "lost_response_rate", _rate, "P",
     "share of requests that take effect, then answer 503"),
    ("--timeout-rate", "timeout_rate", _rate, "P",
     "share of requests that hang --timeout seconds before taking effect"),
    ("--slow-after-apply-rate", "slow_after_apply_rate", _rate, "P",
     "share of requests that take effect, then hang --timeout seconds"),
    ("--timeout", "timeout_s", _seconds, "SECONDS", "length of an injected hang"),
    ("--processing-delay", "processing_delay_s", _seconds, "SECONDS",
     "how long a deduction stays processing"),
    ("--decline-rate", "decline_rate", _rate, "P",
     "share of deductions declined for insufficient funds"),
    ("--notify-url", "notify_url", str, "URL",
     "where notifications go for orders created without a notify_url"),
    ("--notify-retry", "notify_retry_s", _seconds_list, "S1,S2,...",
     "waits between notification delivery attempts (empty: no retries)"),
    ("--lost-notification-rate", "lost_notification_rate", _rate, "P",
     "share of notifications never sent"),
    ("--duplicate-notification-rate", "duplicate_notification_rate", _rate, "P",
     "share of notifications delivered twice"),
    ("--late-notification-rate", "late_notification_rate", _rate, "P",
     "share of notifications delayed by --late-notification-delay"),
    ("--late-notification-delay", "late_notification_s", _seconds, "SECONDS",
     "how late a late notification is"),
    ("--forged-notification-rate", "forged_notification_rate", _rate, "P",
     "share of notifications accompanied by a wrongly signed forgery"),
    ("--statement-timezone", "statement_timezone", _timezone, "TZ",
     "time zone of statement days"),
    ("--seed", "seed", int, "N", "seed of the fault rng, for reproducible runs"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per FaultConfig field; `faults_from_args` reads them back."""
    defaults = FaultConfig()
    for flag, name, parse, metavar, help_text in _FLAGS:
        parser.add_argument(
            flag,
            dest=name,
            type=parse,
            default=getattr(defaults, name),
            metavar=metavar,
            help=f"{help_text} (default: %(default)s)",
        )
    parser.add_argument(
        "--declined-agreement",
        dest="declined_agreements",
        action="append",
        metavar="AGREEMENT_NO",
        help="always decline deductions under this agreement (repeatable)",
    )
    parser.add_argument(
        "--paused-agreement",
        dest="paused_agreements",
        action="append",
        metavar="AGREEMENT_NO",
        help="refuse deductions under this agreement: 403 agreement_paused (repeatable)",
    )
    parser.add_argument(
        "--unknown-agreement",
        dest="unknown_agreements",
        action="append",
        metavar="AGREEMENT_NO",
        help="refuse deductions under this agreement: 404 agreement_not_found (repeatable)",
    )


def faults_from_args(args: argparse.Namespace) -> FaultConfig:
    values = {name: getattr(args, name) for name in FAULT_FIELDS}
    for name in ("declined_agreements", "paused_agreements", "unknown_agreements"):
        values[name] = set(getattr(args, name) or ())
    return FaultConfig(**values)

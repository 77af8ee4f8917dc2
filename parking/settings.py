"""All configuration in one place, read from `PARKING_*` environment variables."""

import ipaddress
import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from plate_recognition.calibration import certain_threshold


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARKING_", env_file=".env", extra="ignore")

    # Servers. Unset means "start an embedded one under data_dir" (see parking.infra).
    database_url: str | None = None
    # A streaming replica for reads that may lag the primary by a moment: public availability
    # and operator reports (deps.ReadConnectionDep). None: the primary. Nothing that decides an
    # exit, moves money, authorises a caller or writes reads from it. Several hosts with
    # `?target_session_attrs=prefer-standby` fall back to the primary when no replica answers.
    database_read_url: str | None = None
    redis_url: str | None = None
    mqtt_url: str | None = None
    data_dir: Path = Path(".data")
    embedded_mqtt_port: int = 18830

    # Prepended to every gate topic so several deployments (or test runs) can share a broker.
    mqtt_topic_prefix: str = ""
    # Unique per process by default: two clients with one id keep disconnecting each other.
    mqtt_client_id: str = Field(
        default_factory=lambda: f"parking-{socket.gethostname()}-{os.getpid()}"
    )
    # Lane workers scale out behind `$share/<group>/...` (Mosquitto 2, EMQX); None: plain.
    mqtt_shared_group: str | None = None
    mqtt_ack_timeout_s: float = 5.0

    # Namespace for every Redis key and channel, so deployments (or test runs) can share a Redis.
    redis_key_prefix: str = "parking:"

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Proxies in front of the API (addresses or CIDRs, comma-separated: the ingress's pod
    # network). X-Forwarded-For is believed only from these, and the client that per-client
    # limits count is its right-most hop that is not one of them. Empty: the TCP peer, and
    # the header is ignored (a client can write anything there).
    trusted_proxies: Annotated[list[str], NoDecode] = []
    # The largest request body a route accepts unless it has a limit of its own (tariff
    # tables more, provider notifications less: parking.app); larger ones are answered 413
    # before they are read or anyone is authenticated.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)

    # Lane service.
    lane_concurrency: int = 16
    max_capture_bytes: int = 512 * 1024
    duplicate_read_window_s: int = 120
    command_ttl_s: int = 30
    # An offline capture's gate time this far after we received it, or before its stay's entry,
    # is a wrong gate clock: flagged for an operator and priced at the receipt time.
    gate_clock_tolerance_s: int = Field(default=300, ge=0)
    timezone: str = "Asia/Shanghai"

    # Plate reading. A camera read at or above camera_min_confidence is taken as it is; below
    # it, or with no read, the capture's images are read server-side in a process pool.
    camera_min_confidence: float = 0.9
    # The least score a read needs to open a stay at the entry.
    plate_min_confidence: float = 0.8
    # A read is *certain* (DESIGN.md, "The exit decision" 5) when its score reaches the
    # threshold of its source, it has a colour, and it is a valid plate of that colour. Only
    # certain reads match a parked plate exactly, and only a stay whose entry and exit reads
    # were both certain is charged pay-later without a person. Server OCR: a calibrated
    # probability, by default the threshold `parking plates calibrate` chose and shipped in
    # plate_recognition/calibration.json. Cameras: per camera model (`camera_read.model`,
    # measured like the server's reader), else the default.
    plate_certain_score: float = Field(default_factory=certain_threshold, ge=0.0, le=1.0)
    camera_certain_scores: dict[str, float] = Field(default_factory=dict)
    camera_certain_score_default: float = Field(default=0.98, ge=0.0, le=1.0)
    ocr_engine: str = "rapidocr"
    # OCR process pool: one single-threaded reader per core this process may run on.
    ocr_workers: int = Field(default_factory=_usable_cores, ge=1)

    # Where drivers' phones and the payment provider reach this service: the gate's payment QR
    # codes and the provider's notification URL are built from it.
    public_base_url: str = "http://127.0.0.1:8000"

    # Drivers' messages: Chinese by default ("en" for an English deployment; no per-account
    # preference exists yet). Charge messages link to `<public_base_url>/r/<token>`.
    message_language: Literal["zh", "en"] = "zh"
    # Signs the receipt page's expiring frame URLs (HMAC-SHA256, >= 32 characters). Unset: a
    # fixed development key when dev_adapters is on, else no frames on receipts (503).
    receipt_key: SecretStr | None = None
    receipt_frame_url_ttl_s: int = Field(default=900, ge=10, le=86_400)

    # Billing. With no provider URL a sandbox provider is started in-process (laptop runs).
    payment_provider_url: str | None = None
    # Verifies the provider's signed notifications; required with payment_provider_url.
    payment_provider_secret: SecretStr | None = None
    payment_provider_timeout_s: float = 3.0
    charge_retry_base_s: float = 0.5
    # How long an accepted charge waits for its notification before the order is queried.
    charge_query_after_s: float = 5.0
    worker_poll_interval_s: float = 0.5
    worker_sweep_interval_s: float = 60.0
    # A job a crashed worker had claimed is picked up again after this long.
    worker_lease_s: float = 60.0
    debt_reminder_every_days: int = 3

    # Attempts per kind of outbox job; after the last one the job is dead (never claimed again,
    # listed for operators, who may retry it). A dead charge stays pending: it is not a debt.
    job_max_attempts_charge: int = Field(default=20, ge=1)
    job_max_attempts_refund: int = Field(default=20, ge=1)
    job_max_attempts_notification: int = Field(default=8, ge=1)
    job_max_attempts_gate_command: int = Field(default=5, ge=1)
    # Retry delays double up to this (each with jitter).
    job_backoff_cap_s: float = Field(default=300.0, gt=0)

    # Stand-ins for the outside world on a laptop (vehicle licence registry): never in production.
    # Without them, binding a plate needs a registry configured on the app (503 otherwise).
    dev_adapters: bool = False

    # Access control. Tokens are signed with jwt_secret (HS256); when it is unset a random key
    # is drawn per process (a laptop run: tokens do not survive a restart).
    jwt_secret: SecretStr | None = None
    access_token_ttl_s: int = 900
    refresh_token_ttl_days: int = 30
    login_code_ttl_s: int = 300
    login_code_max_attempts: int = 5
    # Sign-in codes texted to one phone: this many in a row, then each further request waits
    # twice as long as the one before, from login_code_backoff_s up to login_code_backoff_max_s
    # (a phone is never refused for longer than that); forgotten after an hour without one,
    # or at the phone's next sign-in. One client address may ask for 30 an hour.
    login_codes_free: int = Field(default=3, ge=1)
    login_code_backoff_s: float = Field(default=60.0, gt=0)
    login_code_backoff_max_s: float = Field(default=900.0, gt=0)
    login_codes_per_hour_per_client: int = 30
    # Public fee quotes one client may ask for per minute.
    quotes_per_minute_per_client: int = 60
    # Provider notifications that fail verification (forged, junk) one client may send per
    # minute; each is dead-lettered (a 4 KiB excerpt), and beyond this refused unstored.
    rejected_notifications_per_minute_per_client: int = Field(default=30, ge=1)
    # Staff passwords: this many wrong ones for an e-mail from one client address, then each
    # further try from there waits twice as long as the one before (1 s, 2 s, ... up to
    # password_backoff_max_s); nothing is checked while it waits, and the right password
    # forgives. From all addresses together an e-mail gets 4× the free tries and then waits at
    # most password_email_backoff_max_s (so a botnet cannot keep its owner out for longer); one
    # address gets 6× over all e-mails (spraying). Forgotten after an hour without a failure.
    password_free_failures: int = Field(default=5, ge=1)
    password_backoff_max_s: float = Field(default=900.0, gt=0)
    password_email_backoff_max_s: float = Field(default=30.0, gt=0)
    # Live dashboard streams one staff member may have open at once (over all API processes),
    # and how often an open stream checks that its user still has the right (not disabled,
    # moved or signed out); it also ends when its token expires.
    dashboard_streams_per_user: int = Field(default=3, ge=1)
    dashboard_recheck_s: float = Field(default=30.0, gt=0)
    # Signs the gates' offline whitelists (Ed25519 private key, PEM or base64 seed; `parking
    # gates keygen`). Unset: no whitelist is published and an offline gate holds every exit.
    gate_config_key: SecretStr | None = None
    gate_config_interval_s: float = 60.0

    # Capture frames kept for operators (exception queue) this many days, then erased.
    image_retention_days: int = 30
    # Pruned hourly (and by `parking prune`): done outbox jobs, dead letters (bad gate
    # messages) and dead jobs that carry no money (notifications, gate commands), sent driver
    # notifications, and refresh tokens this long after they expired or were revoked. Money
    # (charges, payments, refunds, ledger) and dead charge or refund jobs are never pruned.
    done_job_retention_days: int = Field(default=7, ge=1)
    dead_letter_retention_days: int = Field(default=30, ge=1)
    sent_notification_retention_days: int = Field(default=90, ge=1)
    refresh_token_grace_days: int = Field(default=7, ge=0)
    # Monthly partitions of stays, captures and ledger lines kept ready beyond this month.
    partition_months_ahead: int = Field(default=2, ge=1, le=24)

    log_level: str = "INFO"
    log_json: bool = False

    # Key for the hash that stands in for plates and phones in logs. When unset a random key
    # is drawn per process: logs stay free of personal data but do not correlate across runs.
    log_pseudonym_key: SecretStr | None = None

    # The public list, places and nearby answers are built at most once per this many seconds
    # per process and served from memory in between, so their counts are at most this old
    # (parking.public.cache). 0: built for every request.
    public_cache_seconds: float = Field(default=1.0, ge=0)
    # Requests to the public lists and car parks (/api/v1/public/…, /api/v1/car-parks) one
    # client may make per minute; callers with the city's key are not counted.
    public_requests_per_minute_per_client: int = Field(default=120, ge=1)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxy_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: list[str]) -> list[str]:
        # A typo must stop the start, not silently trust nobody (or everybody).
        return [str(ipaddress.ip_network(item, strict=False)) for item in value]


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""All configuration in one place, read from `PARKING_*` environment variables."""

import ipaddress
import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from plate_recognition.calibration import certain_threshold
from plate_recognition.engines import DEFAULT_ENGINE


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARKING_", env_file=".env", extra="ignore")

    # "production" refuses to start while any stand-in for the outside world would be used
    # (parking.production lists them): embedded servers, the sandbox provider, the in-memory
    # SMS and notifier, the dev vehicle registry, random per-process keys, unsigned commands.
    env: Literal["development", "production"] = "development"

    # Servers. Unset means "start an embedded one under data_dir" (see parking.infra).
    database_url: str | None = None
    # A streaming replica for reads that may lag the primary by a moment: public availability
    # and operator reports (deps.ReadConnectionDep). None: the primary. Nothing that decides an
    # exit, moves money, authorises a caller or writes reads from it. Several hosts with
    # `?target_session_attrs=prefer-standby` fall back to the primary when no replica answers.
    database_read_url: str | None = None
    redis_url: str | None = None
    mqtt_url: str | None = None
    # A file holding PARKING_MQTT_URL (instead of it): each pod of a StatefulSet reads its own
    # broker login, mounted from a Secret under its pod name (deploy/kubernetes). A missing file
    # stops the process rather than letting it share another process's login.
    mqtt_url_file: Path | None = None
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
    # A held gate's QR code starts a payment for this long after the capture was received
    # (the car is at the barrier); later scans are told it expired. A payment already
    # started stays payable.
    gate_qr_ttl_s: int = Field(default=900, ge=60)
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
    # plate_recognition/calibration.json for the engine the lanes read with. Cameras: per
    # camera model (`camera_read.model`, measured like the server's reader), else the default.
    ocr_engine: str = DEFAULT_ENGINE
    plate_certain_score: float = Field(
        default_factory=lambda fields: certain_threshold(fields["ocr_engine"]), ge=0.0, le=1.0
    )
    camera_certain_scores: dict[str, float] = Field(default_factory=dict)
    camera_certain_score_default: float = Field(default=0.98, ge=0.0, le=1.0)
    # A camera score is a calibrated probability only where an installer measured it: the
    # models in camera_certain_scores (set from `parking plates calibrate` on that model's
    # reads), and every other model when this says the default was measured so too. A charge
    # on an uncalibrated camera's reads waits for the server's reader to agree with the entry
    # and exit frames (lanes.rules.verify_charge): a frame agrees when it reads the stay's
    # plate at verify_agree_score or more, contradicts when it reads another valid plate at
    # verify_contradict_score or more (calibrated scores). Agreement from 0.96: 72.5 % of the
    # fused reader's right reads and 2.6 % of its wrong valid plates score that much (held-out
    # reads, devtools/parking_dev/ocr_reads.json); from 0.95, 78.5 % and 6.4 %; from 0.9, 90 %
    # and 13 %: too easy an agreement for a plate that reads wrong the same way every time.
    camera_default_calibrated: bool = False
    verify_agree_score: float = Field(default=0.96, ge=0.0, le=1.0)
    verify_contradict_score: float = Field(default=0.9, ge=0.0, le=1.0)
    # OCR process pool: one single-threaded reader per core this process may run on.
    ocr_workers: int = Field(default_factory=_usable_cores, ge=1)
    # The frames of one capture the server reads, the first ones: a gate sends two or three,
    # and every further frame is a read the pool does not give other gates' captures (one
    # gate's nine large frames held another car park's read up for seconds).
    ocr_max_frames: int = Field(default=4, ge=1)

    # Where drivers' phones and the payment provider reach this service: the gate's payment QR
    # codes, receipt links and the provider's notification URL are built from it. Unset: this
    # API's own address (api_host:api_port; a development run); production requires it.
    public_base_url: str = Field(default="", validate_default=True)

    # Drivers' messages: Chinese by default ("en" for an English deployment; no per-account
    # preference exists yet). Charge messages link to `<public_base_url>/r/<token>`.
    message_language: Literal["zh", "en"] = "zh"
    # Signs the receipt page's expiring frame URLs (HMAC-SHA256, >= 32 characters). Unset: a
    # fixed development key when dev_adapters is on, else no frames on receipts (503).
    receipt_key: SecretStr | None = None
    receipt_frame_url_ttl_s: int = Field(default=900, ge=10, le=86_400)

    # Billing. The payment rails: "sandbox" (a stand-in with injectable faults; with no
    # provider URL one is started in-process, a laptop run) or "wechat" (WeChat Pay Score
    # parking, API v3: billing.wechat; with none of the wechat_* keys set, an emulator of it is
    # started in-process instead, a stand-in too). See docs/billing.md, "Payment rails".
    payment_provider: Literal["sandbox", "wechat"] = "sandbox"
    payment_provider_url: str | None = None
    # Verifies the provider's signed notifications; required with payment_provider_url.
    payment_provider_secret: SecretStr | None = None
    payment_provider_timeout_s: float = 3.0
    # How long a request the client gave up on (a timeout) may still take effect at the
    # provider: a charge it has no order of is treated as never sent only after this.
    payment_request_in_flight_s: float = 120.0
    # WeChat Pay (payment_provider=wechat): the merchant id and app id, the merchant API
    # certificate's serial number and private key (PEM file), the APIv3 key (32 characters),
    # and the platform's public key (PEM file) with its id (PUB_KEY_ID_...), or a folder of
    # platform certificates instead. The API is WeChat's own unless an emulator's is given.
    wechat_api_url: str = "https://api.mch.weixin.qq.com"
    wechat_mchid: str | None = None
    wechat_appid: str | None = None
    wechat_cert_serial_no: str | None = None
    wechat_private_key_path: Path | None = None
    wechat_apiv3_key: SecretStr | None = None
    wechat_platform_public_key_path: Path | None = None
    wechat_platform_public_key_id: str | None = None
    wechat_platform_cert_dir: Path | None = None
    # The driver app (a WeChat mini program) signs drivers in with wx.login: the server
    # exchanges its code for the driver's openid with the mini program's AppSecret, at WeChat's
    # sign-in API (not the payment one) unless an emulator's is given.
    wechat_app_secret: SecretStr | None = None
    wechat_login_url: str = "https://api.weixin.qq.com"
    charge_retry_base_s: float = 0.5
    # How long an accepted charge waits for its notification before the order is queried.
    charge_query_after_s: float = 5.0
    worker_poll_interval_s: float = 0.5
    worker_sweep_interval_s: float = 60.0
    # A bound plate's service state with the provider (normal / paused / overdue / not opened)
    # older than this is asked again by the worker's sweep, at most `plate_state_batch` plates
    # per sweep (state notifications and entry registrations keep it fresh in between).
    plate_state_max_age_s: float = Field(default=86_400.0, ge=0)
    plate_state_batch: int = Field(default=50, ge=1, le=1000)
    # A job a crashed worker had claimed is picked up again after this long.
    worker_lease_s: float = 60.0
    debt_reminder_every_days: int = 3
    # A driver's pass bought in the app: the reminder before it ends (unless renewed).
    pass_reminder_days: int = Field(default=3, ge=1, le=60)

    # Attempts per kind of outbox job; after the last one the job is dead (never claimed again,
    # listed for operators, who may retry it). A dead charge stays pending: it is not a debt.
    job_max_attempts_charge: int = Field(default=20, ge=1)
    job_max_attempts_refund: int = Field(default=20, ge=1)
    job_max_attempts_notification: int = Field(default=8, ge=1)
    job_max_attempts_gate_command: int = Field(default=5, ge=1)
    job_max_attempts_feed_delivery: int = Field(default=10, ge=1)
    job_max_attempts_verify_charge: int = Field(default=10, ge=1)
    # Retry delays double up to this (each with jitter).
    job_backoff_cap_s: float = Field(default=300.0, gt=0)

    # Text messages (sign-in codes, drivers' notifications). Unset provider: the in-memory dev
    # sender (nothing leaves the process). "aliyun": Alibaba Cloud SMS (dysmsapi SendSms) with
    # these keys, the approved sign name and one template per message (parking.sms).
    sms_provider: Literal["aliyun"] | None = None
    sms_endpoint: str = "https://dysmsapi.aliyuncs.com/"
    sms_access_key_id: str | None = None
    sms_access_key_secret: SecretStr | None = None
    sms_sign_name: str | None = None
    # Template codes (SMS_…): the sign-in code (`${code}`); the charge after an exit
    # (`${plate}`, `${car_park}`, `${time}`, `${duration}`, `${amount}` in yuan, `${receipt}`
    # the receipt link); every other notice, its whole text (billing.notifications, in
    # PARKING_MESSAGE_LANGUAGE) as `${content}`.
    sms_template_login_code: str | None = None
    sms_template_charge: str | None = None
    sms_template_notice: str | None = None
    sms_timeout_s: float = Field(default=5.0, gt=0)

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
    # Sign-in codes texted to one phone from one client address: this many in a row, then each
    # further request from there waits twice as long as the one before, from
    # login_code_backoff_s up to login_code_backoff_max_s. From all addresses together the phone
    # gets as many in a row and then waits at most login_code_phone_backoff_max_s (so a botnet
    # texts it at most once in five minutes, and its owner, asking from an address of their
    # own, waits no longer; shorter lets a botnet guess more, 5 guesses a code). Forgotten
    # after an hour without one, or at the phone's next sign-in. One client address may ask
    # for 30 an hour.
    login_codes_free: int = Field(default=3, ge=1)
    login_code_backoff_s: float = Field(default=60.0, gt=0)
    login_code_backoff_max_s: float = Field(default=900.0, gt=0)
    login_code_phone_backoff_max_s: float = Field(default=300.0, gt=0)
    login_codes_per_hour_per_client: int = 30
    # Wrong guesses at a phone's codes, over all its codes and addresses: this many in a row,
    # then each further guess waits twice as long as the one before, from login_code_backoff_s
    # up to login_code_guess_backoff_max_s. Each code allows login_code_max_attempts, and the
    # phone gets a code every five minutes whoever asks, so without this a botnet guessed 1,440
    # times a day at a six-digit code (one phone in 700 a day); now about 60. The price: the
    # owner's right code is refused while a wait lasts, and a guesser who spends one guess
    # each time a wait ends keeps the owner's sign-in refused for as long as they keep at it
    # (texting the owner a code each time); apps signed in and the gates are not affected.
    # Forgotten a day after the last guess, or at the phone's next sign-in.
    login_code_guesses_free: int = Field(default=10, ge=1)
    login_code_guess_backoff_max_s: float = Field(default=1800.0, gt=0)
    # Public fee quotes one client may ask for per minute.
    quotes_per_minute_per_client: int = 60
    # Provider notifications that fail verification (forged, junk) one client may send per
    # minute; each is dead-lettered (a 4 KiB excerpt), and beyond this refused unstored.
    rejected_notifications_per_minute_per_client: int = Field(default=30, ge=1)
    # And all clients together (many addresses): at most this many dead letters of junk a
    # minute, over all API processes. The provider's valid notifications are never counted.
    rejected_notifications_per_minute: int = Field(default=300, ge=1)
    # Staff passwords: this many wrong ones for an e-mail from one client address, then each
    # further try from there waits twice as long as the one before (1 s, 2 s, ... up to
    # password_backoff_max_s); nothing is checked while it waits, and the right password
    # forgives. From all addresses together an e-mail gets 4× the free tries and then waits at
    # most password_email_backoff_max_s (so a botnet cannot keep its owner out for longer); one
    # address gets 6× over all e-mails (spraying). Forgotten after an hour without a failure.
    password_free_failures: int = Field(default=5, ge=1)
    password_backoff_max_s: float = Field(default=900.0, gt=0)
    password_email_backoff_max_s: float = Field(default=30.0, gt=0)
    # Password checks (scrypt, ~60 ms of CPU each) one API process makes per second, with as
    # many in a burst; a guess beyond them is refused at once (429, nothing counted, nothing
    # hashed), so that guesses from any number of addresses never take more than this share
    # of a core from the lanes and the rest of the API.
    password_checks_per_second: float = Field(default=4.0, gt=0)
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
    # How long a process keeps an API key it found valid without asking the database again
    # (0: it always asks). A revoked key stops at once anyway (`parking admin api-key revoke`
    # tells every process through Redis); this bounds a revocation nobody announced.
    api_key_cache_seconds: float = Field(default=10.0, ge=0)
    # Unknown or revoked API keys one client may present per minute; beyond, 429 without a
    # look in the database (a key not in memory costs a query; an invalid token costs none).
    bad_api_keys_per_minute_per_client: int = Field(default=20, ge=1)
    # Requests to the public lists and car parks (/api/v1/public/…, /api/v1/car-parks) one
    # client may make per minute; callers with the city's key are not counted.
    public_requests_per_minute_per_client: int = Field(default=120, ge=1)
    # Items per page of the APDS lists (/apds/v4/…).
    apds_page_size: int = Field(default=100, ge=1, le=1000)

    # Push feeds (APDS webhooks, the city platform): a delivery is one signed POST answered
    # 2xx within feed_timeout_s; a failed one is tried again after feed_retry_base_s, doubling
    # (PARKING_JOB_BACKOFF_CAP_S, PARKING_JOB_MAX_ATTEMPTS_FEED_DELIVERY). An APDS subscription
    # is paused after this many failed attempts in a row (the city platform never is: nothing
    # of its feed is dropped). A car park's occupancy goes to a subscriber at most once per
    # feed_occupancy_interval_s, with the latest count.
    feed_timeout_s: float = Field(default=5.0, gt=0)
    feed_retry_base_s: float = Field(default=1.0, gt=0)
    feed_pause_after_failures: int = Field(default=10, ge=1)
    feed_occupancy_interval_s: float = Field(default=5.0, ge=0)
    # Every car park's free spaces go to the city platform this often, changed or not (0: off).
    feed_city_heartbeat_s: float = Field(default=300.0, ge=0)
    # POSTs a feed worker has in flight at once (over kept-alive connections).
    feed_concurrency: int = Field(default=64, ge=1, le=1000)
    # Endpoints on loopback are refused like every non-public address unless this is set
    # (development and tests run their receivers there); production refuses it.
    feed_allow_loopback: bool = False

    @model_validator(mode="after")
    def _mqtt_url_from_file(self) -> "Settings":
        if self.mqtt_url_file is None:
            return self
        if self.mqtt_url is not None:
            raise ValueError("set PARKING_MQTT_URL or PARKING_MQTT_URL_FILE, not both")
        try:
            url = self.mqtt_url_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(
                f"PARKING_MQTT_URL_FILE {str(self.mqtt_url_file)!r}: {exc.strerror}; this "
                "process has no broker login of its own"
            ) from None
        if not url:
            raise ValueError(f"PARKING_MQTT_URL_FILE {str(self.mqtt_url_file)!r} is empty")
        self.mqtt_url = url
        return self

    @field_validator("public_base_url")
    @classmethod
    def _public_base_url(cls, value: str, info: ValidationInfo) -> str:
        if value:
            return value.rstrip("/")
        host = info.data.get("api_host", "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{info.data.get('api_port', 8000)}"

    def wechat_configured(self) -> bool:
        """Any WeChat Pay key is set: the real rails are meant, and all of them are needed."""
        return any(
            getattr(self, name) is not None
            for name in type(self).model_fields
            if name.startswith("wechat_") and name not in ("wechat_api_url", "wechat_login_url")
        )

    def wechat_missing(self) -> list[str]:
        """The WeChat Pay settings still unset (all of them named at once)."""
        missing = [
            f"PARKING_{name.upper()}"
            for name in (
                "wechat_mchid",
                "wechat_appid",
                "wechat_cert_serial_no",
                "wechat_private_key_path",
                "wechat_apiv3_key",
                "wechat_app_secret",
            )
            if getattr(self, name) is None
        ]
        has_key = (
            self.wechat_platform_public_key_path is not None
            and self.wechat_platform_public_key_id is not None
        )
        if not has_key and self.wechat_platform_cert_dir is None:
            missing.append(
                "PARKING_WECHAT_PLATFORM_PUBLIC_KEY_PATH and PARKING_WECHAT_PLATFORM_PUBLIC_KEY_ID"
                " (or PARKING_WECHAT_PLATFORM_CERT_DIR)"
            )
        return missing

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

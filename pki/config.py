"""Lab settings: read once from the environment (and `.env` through python-dotenv), validated."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from dotenv import dotenv_values

from .authority import is_hostname

PROJECT_ROOT = Path(__file__).resolve().parent.parent

KEY_TYPES = ("ec", "rsa", "rsa2048", "rsa3072")
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


SECRET_FIELDS = ("ca_passphrase", "dashboard_admin_password", "dashboard_secret_key")
TRUE_VALUES = ("1", "true", "yes", "on")
N = TypeVar("N", int, float)


class ConfigError(ValueError):
    """A setting has a value the lab cannot use; the message names the setting and the fix."""


def _number_setting(env: Mapping[str, str], key: str, default: N, convert: Callable[[str], N], what: str) -> N:
    """The setting as `convert` (int, float) reads it, `default` when it is unset or blank."""
    raw = (env.get(key) or "").strip()
    if not raw:
        return default
    try:
        return convert(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not {what}; fix it in .env") from None


def _int_setting(env: Mapping[str, str], key: str, default: int, minimum: int = 0) -> int:
    value = _number_setting(env, key, default, int, "a whole number")
    if value < minimum:
        raise ConfigError(f"{key}={value} must be at least {minimum}; fix it in .env")
    return value


def _seconds_setting(env: Mapping[str, str], key: str, default: float) -> float:
    """A positive, finite number of seconds (fractions allowed)."""
    value = _number_setting(env, key, default, float, "a number of seconds")
    if not 0 < value < float("inf"):
        raise ConfigError(f"{key}={value:g} must be a positive number of seconds; fix it in .env")
    return value


def _list_setting(env: Mapping[str, str], key: str, default: str = "") -> list[str]:
    raw = env.get(key)
    if raw is None or not raw.strip():
        raw = default
    return [item.strip() for item in raw.split(",") if item.strip()]


def _port_setting(env: Mapping[str, str], key: str, default: int, minimum: int = 1) -> int:
    value = _int_setting(env, key, default, minimum)
    if value > 65535:
        raise ConfigError(f"{key}={value} is not a port number (at most 65535); fix it in .env")
    return value


def _host_names(names: list[str], key: str) -> list[str]:
    result = []
    for name in names:
        name = name.lower().rstrip(".")
        if not is_hostname(name):
            raise ConfigError(f"{key}: {name!r} is not a DNS host name (letters, digits, '-' and dots; no wildcards)")
        result.append(name)
    return result


INGEST_ID_RE = re.compile(r"ingest-[1-9][0-9]{0,3}")


def _ingest_id(value: str) -> str:
    value = value.strip()
    if not INGEST_ID_RE.fullmatch(value):
        raise ConfigError(f"INGEST_ID={value!r} must be ingest-<n> (n from 1 to INGEST_REPLICAS)")
    return value


def parse_devices(value: str | list[str]) -> list[str]:
    """Split and validate a device list; ids become certificate CNs and MQTT topic levels."""
    items = value if isinstance(value, list) else [v.strip() for v in value.split(",") if v.strip()]
    seen: list[str] = []
    for device in items:
        if not DEVICE_ID_RE.match(device):
            raise ConfigError(
                f"device id {device!r} is not allowed: use 1-64 letters, digits, '_' or '-', "
                "starting with a letter or digit"
            )
        if device not in seen:
            seen.append(device)
    return seen


def lab_environ(dotenv_path: Path | None = None) -> dict[str, str]:
    """`.env` (LAB_ENV_FILE, default ./.env) overlaid by the process environment: python-dotenv's override=False.

    Also for keys Settings does not model (a thermometer's DEVICE_ID, CLIENT_CERT_PATH, ...).
    """
    path = dotenv_path or Path(os.environ.get("LAB_ENV_FILE", PROJECT_ROOT / ".env"))
    file_values = {k: v for k, v in dotenv_values(path).items() if v is not None} if path.exists() else {}
    return {**file_values, **os.environ}


@dataclass(frozen=True)
class Settings:
    ca_passphrase: str | None = None
    devices: list[str] = field(default_factory=lambda: ["device001", "device002"])
    cert_days: int = 365
    renew_before_days: int = 30
    key_type: str = "ec"
    broker_address: str = "localhost"
    broker_port: int = 8883
    broker_sans: list[str] = field(default_factory=list)
    broker_bind: str = "127.0.0.1"
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 5000
    certs_dir: Path = PROJECT_ROOT / "certs"
    data_dir: Path = PROJECT_ROOT / "data"
    database_url: str = ""
    publish_interval: float = 5.0
    # Operator access (dashboard/auth.py): the `admin` operator's first password, HTTPS, extra Host names,
    # the idle timeout of a login (seconds) and the key that signs session cookies (else one in the data folder).
    dashboard_admin_password: str | None = None
    dashboard_tls: bool = False
    dashboard_names: list[str] = field(default_factory=list)
    dashboard_idle_timeout: int = 1800
    dashboard_secret_key: str | None = None
    # Seconds a superseded certificate stays usable before it goes on the CRL (reason superseded); 0 = at once.
    superseded_grace: int = 900
    # Seconds between two looks of a running process (thermometer, dashboard) at its certificate and key files, so
    # that it switches to a pair renewed under it well inside the grace above (lab/rotation.py).
    cert_watch_seconds: float = 5.0
    # The CA's HTTPS endpoint for EST and ACME (`ca/`): CA_HTTPS_HOST, CA_HTTPS_PORT (0 = off), the port http-01
    # is validated on (RFC 8555 8.3: 80), and the DNS names ACME may issue server certificates for.
    ca_https_host: str = "127.0.0.1"
    ca_https_port: int = 8443
    acme_http01_port: int = 80
    acme_allowed_names: list[str] = field(default_factory=lambda: ["localhost"])
    # The CA service (`python -m ca`): how many replicas, each with its own identity `ca-<n>` (the
    # generator issues their certificates, the ACL lists them; compose's `--scale ca=N` needs N <= CA_REPLICAS).
    ca_replicas: int = 1
    # Telemetry ingest (dashboard/ingest.py): how many `ingest-<n>` identities the generator issues (and the ACL
    # lets read telemetry), and which one this process connects as.
    ingest_replicas: int = 2
    ingest_id: str = "ingest-1"
    ingest_embedded: bool = True  # INGEST_EMBEDDED: the dashboard process runs one ingest replica itself
    # DASHBOARD_MQTT: this process holds the `dashboard` connection (the CA over MQTT, revocation's disconnects,
    # the CA's log). One process per lab may (the broker forces client id = CN): dashboard replicas set 0 on all
    # but one.
    dashboard_mqtt: bool = True
    # Redis URL (redis://host:port/db) shared by dashboard replicas: Flask-SocketIO's message queue and the
    # readings bus (dashboard/bus.py). Empty: one dashboard process, no Redis.
    socketio_message_queue: str = ""

    @property
    def ingest_identities(self) -> list[str]:
        return [f"ingest-{n}" for n in range(1, self.ingest_replicas + 1)]

    def __repr__(self) -> str:  # never show the passphrase in logs or tracebacks
        fields = ", ".join(f"{k}={'***' if k in SECRET_FIELDS and v else v!r}" for k, v in self.__dict__.items())
        return f"Settings({fields})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, dotenv_path: Path | None = None) -> Settings:
        """Process environment wins over `.env`, as python-dotenv's `override=False` does."""
        env: Mapping[str, str] = lab_environ(dotenv_path) if environ is None else environ
        key_type = (env.get("KEY_TYPE") or "ec").strip().lower()
        if key_type not in KEY_TYPES:
            raise ConfigError(f"KEY_TYPE={key_type!r} is not supported; use one of {', '.join(KEY_TYPES)}")
        certs_dir = Path(env.get("CERTS_DIR") or PROJECT_ROOT / "certs")
        data_dir = Path(env.get("DATA_DIR") or PROJECT_ROOT / "data")
        if not certs_dir.is_absolute():
            certs_dir = PROJECT_ROOT / certs_dir
        if not data_dir.is_absolute():
            data_dir = PROJECT_ROOT / data_dir
        interval_raw = (env.get("PUBLISH_INTERVAL") or "5").strip()
        try:
            interval = float(interval_raw)
        except ValueError:
            raise ConfigError(f"PUBLISH_INTERVAL={interval_raw!r} is not a number of seconds") from None
        if interval <= 0:
            raise ConfigError("PUBLISH_INTERVAL must be greater than 0")
        return cls(
            ca_passphrase=env.get("CA_PASSPHRASE") or None,
            devices=parse_devices(_list_setting(env, "DEVICES", "device001,device002")),
            cert_days=_int_setting(env, "CERT_DAYS", 365, minimum=1),
            renew_before_days=_int_setting(env, "RENEW_BEFORE_DAYS", 30),
            key_type=key_type,
            broker_address=(env.get("BROKER_ADDRESS") or "localhost").strip(),
            broker_port=_int_setting(env, "BROKER_PORT", 8883, minimum=1),
            broker_sans=_list_setting(env, "BROKER_SANS"),
            broker_bind=(env.get("BROKER_BIND") or "127.0.0.1").strip(),
            dashboard_host=(env.get("DASHBOARD_HOST") or "127.0.0.1").strip(),
            dashboard_port=_int_setting(env, "DASHBOARD_PORT", 5000, minimum=1),
            certs_dir=certs_dir,
            data_dir=data_dir,
            database_url=(env.get("DATABASE_URL") or "").strip(),
            publish_interval=interval,
            dashboard_admin_password=env.get("DASHBOARD_ADMIN_PASSWORD") or None,
            dashboard_tls=(env.get("DASHBOARD_TLS") or "").strip().lower() in TRUE_VALUES,
            dashboard_names=_list_setting(env, "DASHBOARD_NAMES"),
            dashboard_idle_timeout=_int_setting(env, "DASHBOARD_IDLE_TIMEOUT", 1800, minimum=60),
            dashboard_secret_key=env.get("DASHBOARD_SECRET_KEY") or None,
            superseded_grace=_int_setting(env, "SUPERSEDED_GRACE_SECONDS", 900, minimum=0),
            cert_watch_seconds=_seconds_setting(env, "CERT_WATCH_SECONDS", 5.0),
            ca_https_host=(env.get("CA_HTTPS_HOST") or "127.0.0.1").strip(),
            ca_https_port=_port_setting(env, "CA_HTTPS_PORT", 8443, minimum=0),
            acme_http01_port=_port_setting(env, "ACME_HTTP01_PORT", 80),
            ca_replicas=_int_setting(env, "CA_REPLICAS", 1, minimum=1),
            acme_allowed_names=_host_names(_list_setting(env, "ACME_ALLOWED_NAMES", "localhost"), "ACME_ALLOWED_NAMES"),
            ingest_replicas=_int_setting(env, "INGEST_REPLICAS", 2, minimum=1),
            ingest_id=_ingest_id(env.get("INGEST_ID") or "ingest-1"),
            ingest_embedded=(env.get("INGEST_EMBEDDED") or "1").strip().lower() in TRUE_VALUES,
            dashboard_mqtt=(env.get("DASHBOARD_MQTT") or "1").strip().lower() in TRUE_VALUES,
            socketio_message_queue=(env.get("SOCKETIO_MESSAGE_QUEUE") or "").strip(),
        )

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'lab.db'}"


def revoked_next_step(name: str) -> str:
    """The one next step for a lab device whose certificate is revoked (generator, --check, runner, thermometer)."""
    return (
        f"issue it a new certificate with `./setup.sh certs --devices {name}` (the generator's --devices), "
        f"or remove {name} from DEVICES in .env"
    )

"""A thermometer's configuration (the seed's environment variables, `.env` underneath, flags on top) and the
check of its certificate files before it connects.

- With only DEVICE_ID the files default to `<CERTS_DIR>/<id>/...` as the generator writes them.
- Certificate problems are found before connecting (one-line error naming the file, exit 2): a device
  that cannot authenticate would otherwise retry forever with the broker's opaque "verify failed".
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from pki.authority import CAError, WrongPassphrase, common_name, load_certificate, load_private_key, utcnow
from pki.config import DEVICE_ID_RE, ConfigError, Settings

from . import est
from .credentials import identity_problem
from .mqtt import Identity
from .renewal import RENEW_CHECK_INTERVAL
from .rotation import WATCH_SECONDS

log = logging.getLogger("thermometer")


class DeviceConfigError(ValueError):
    """The thermometer cannot start; the message is one line and names the setting or file."""


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceConfig:
    device_id: str
    identity: Identity
    broker_address: str = "localhost"
    broker_port: int = 8883
    interval: float = 5.0
    renew_before_days: float = 30.0
    renew_check_interval: float = RENEW_CHECK_INTERVAL  # 0: never renew
    watch_interval: float = WATCH_SECONDS  # seconds between looks at the certificate files (CERT_WATCH_SECONDS)

    @property
    def temperature_topic(self) -> str:
        return f"iot/thermometer/{self.device_id}/temperature"

    @property
    def status_topic(self) -> str:
        return f"iot/thermometer/{self.device_id}/status"


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not between 1 and 65535")
    return port


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError("the interval must be a positive number of seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thermometer.py",
        description="A simulated thermometer: publishes its temperature over mutual-TLS MQTT. Every flag "
        "overrides the environment variable named in its help (and .env underneath).",
        epilog="Certificate lifecycle (environment only): RENEW_CHECK_INTERVAL (seconds between checks of the "
        "certificate, default 3600, 0: never renew) and RENEW_BEFORE_DAYS (default 30): the device renews its "
        "certificate itself over MQTT once inside that window or past two thirds of its lifetime. Without a "
        "certificate, ENROL_TOKEN (a single-use token from POST /v1/ssl/tokens) makes it enrol first at CA_URL "
        "(default http://127.0.0.1:<DASHBOARD_PORT>); ENROL_TOKEN_FILE instead claims a `name token` line of a "
        "shared file and takes its name as DEVICE_ID.",
    )
    parser.add_argument("--device-id", help="device id = certificate CN (DEVICE_ID)")
    parser.add_argument(
        "--ca-cert",
        type=Path,
        help="root CA the broker must chain to (CA_CERT_PATH; default <CERTS_DIR>/<id>/root_ca.crt)",
    )
    parser.add_argument(
        "--cert", type=Path, help="client certificate (CLIENT_CERT_PATH; default <CERTS_DIR>/<id>/<id>.crt)"
    )
    parser.add_argument(
        "--key", type=Path, help="client private key, unencrypted (CLIENT_KEY_PATH; default <CERTS_DIR>/<id>/<id>.key)"
    )
    parser.add_argument(
        "--broker", help="broker host name or IP, must be in its certificate (BROKER_ADDRESS; default localhost)"
    )
    parser.add_argument("--port", type=_port, help="broker TLS port (BROKER_PORT; default 8883)")
    parser.add_argument("--interval", type=_seconds, help="seconds between readings (PUBLISH_INTERVAL; default 5)")
    parser.add_argument(
        "--enrol",
        choices=est.ENROL_MODES,
        help="how the device enrols and renews (ENROL; "
        "default mqtt: a token at CA_URL's v1/ssl/sign, renewal over MQTT; est: EST simpleenroll "
        "and simplereenroll at EST_URL, default https://localhost:<CA_HTTPS_PORT>/.well-known/est)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every reading (LOG_LEVEL=DEBUG)")
    return parser


def load_config(args: argparse.Namespace, environ: Mapping[str, str]) -> DeviceConfig:
    """Flags over the environment over `.env`; raises DeviceConfigError with a one-line message."""
    try:
        settings = Settings.from_env(environ)
    except ConfigError as ex:
        raise DeviceConfigError(str(ex)) from None
    device_id = (args.device_id or environ.get("DEVICE_ID") or "").strip()
    if not device_id:
        raise DeviceConfigError("DEVICE_ID is not set: export DEVICE_ID=device001 or pass --device-id")
    if not DEVICE_ID_RE.match(device_id):
        raise DeviceConfigError(
            f"device id {device_id!r} is not allowed: 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    defaults = Identity.of(settings.certs_dir, device_id)

    def path(flag: Path | None, key: str, default: Path) -> Path:
        raw = flag if flag is not None else (environ.get(key) or "").strip()
        return Path(raw).expanduser() if raw else default

    identity = Identity(
        path(args.ca_cert, "CA_CERT_PATH", defaults.ca_cert),
        path(args.cert, "CLIENT_CERT_PATH", defaults.cert),
        path(args.key, "CLIENT_KEY_PATH", defaults.key),
    )
    port = args.port if args.port is not None else settings.broker_port
    if port > 65535:
        raise DeviceConfigError(f"BROKER_PORT={port} is not a port number")
    check_raw = (environ.get("RENEW_CHECK_INTERVAL") or "").strip()
    try:
        check_interval = float(check_raw) if check_raw else RENEW_CHECK_INTERVAL
    except ValueError:
        check_interval = -1.0
    if not 0 <= check_interval < math.inf:
        raise DeviceConfigError(f"RENEW_CHECK_INTERVAL={check_raw!r} is not a number of seconds (0: never renew)")
    return DeviceConfig(
        device_id=device_id,
        identity=identity,
        broker_address=(args.broker or settings.broker_address).strip(),
        broker_port=port,
        interval=args.interval if args.interval is not None else settings.publish_interval,
        renew_before_days=settings.renew_before_days,
        renew_check_interval=check_interval,
        watch_interval=settings.cert_watch_seconds,
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DeviceConfigError(f"{what} {path} does not exist (run ./setup.sh certs to generate it)") from None
    except OSError as ex:
        raise DeviceConfigError(f"cannot read {what} {path}: {ex.strerror or ex}") from None


def check_identity(config: DeviceConfig) -> x509.Certificate:
    """Fail fast, naming the file, on what the TLS handshake would only report as 'verify failed'.

    Returns the client certificate. Nothing here ever logs key material.
    """
    identity = config.identity
    ca_data = _read(identity.ca_cert, "CA certificate")
    cert_data = _read(identity.cert, "client certificate")
    key_data = _read(identity.key, "client key")
    try:
        roots = x509.load_pem_x509_certificates(ca_data)
    except ValueError:
        raise DeviceConfigError(f"CA certificate {identity.ca_cert} is not a PEM certificate") from None
    try:
        cert = load_certificate(cert_data)
    except CAError:
        raise DeviceConfigError(f"client certificate {identity.cert} is not a PEM certificate") from None
    try:
        key = load_private_key(key_data)
    except WrongPassphrase:
        raise DeviceConfigError(f"client key {identity.key} is encrypted; the device needs it unencrypted") from None
    except CAError:
        raise DeviceConfigError(f"client key {identity.key} is not a readable PEM private key") from None
    problem = identity_problem(cert, key, roots, config.device_id)
    if problem == "key":
        raise DeviceConfigError(f"client key {identity.key} does not match certificate {identity.cert}")
    if problem == "issuer":
        raise DeviceConfigError(f"client certificate {identity.cert} was not issued by the CA in {identity.ca_cert}")
    if problem == "name":
        # The broker takes the CN as user name and client id: the device's topic would be denied.
        raise DeviceConfigError(
            f"client certificate {identity.cert} is for {common_name(cert)!r}, not for device {config.device_id!r}"
        )
    now = utcnow()
    if cert.not_valid_after_utc <= now:
        log.warning(
            "certificate %s expired on %s: the broker will refuse it",
            identity.cert,
            cert.not_valid_after_utc.isoformat(),
        )
    elif cert.not_valid_before_utc > now:
        log.warning(
            "certificate %s is not valid before %s: is this machine's clock right?",
            identity.cert,
            cert.not_valid_before_utc.isoformat(),
        )
    return cert

"""A simulated thermometer: mutual-TLS MQTT client that publishes a plausible temperature every interval.

`thermometer.py` is the thin entry point; this module is the command line, and re-exports the pieces tests
import: the configuration (`lab/device_config.py`), the temperature (`lab/temperature.py`), the offline buffer
(`lab/buffer.py`), the MQTT session (`lab/session.py`) and the publishing loop (`lab/publisher.py`).

- Configuration: the seed's environment variables (DEVICE_ID, CA_CERT_PATH, CLIENT_CERT_PATH,
  CLIENT_KEY_PATH, BROKER_ADDRESS, BROKER_PORT, PUBLISH_INTERVAL), `.env` underneath, flags on top.
  With only DEVICE_ID the files default to `<CERTS_DIR>/<id>/...` as the generator writes them.
- Certificate problems are found before connecting (one-line error naming the file, exit 2): a device
  that cannot authenticate would otherwise retry forever with the broker's opaque "verify failed".
- Readings are produced on schedule whether or not the broker is reachable; the ones that could not be
  sent wait in a bounded buffer and go out, oldest first, after the reconnect. `seq` numbers each
  reading of this process (1, 2, ...), so a consumer can prove there is no gap.
- Revocation: when a connection is lost or refused, one TLS handshake asks the broker whether it refuses this
  certificate as revoked (`lab.mqtt.certificate_revoked`). If so the thermometer logs one line saying so and
  what to do, never connects with that certificate again, and exits with EXIT_REVOKED (3); with
  ON_REVOKED=wait (the compose lab, whose restart policy would otherwise start it again) it waits instead
  until a new certificate replaces the file, then carries on with it.
- SIGTERM/SIGINT: the last readings are delivered, retained `offline` is acknowledged, then a clean
  DISCONNECT (so the broker does not also fire the will), exit 0.
- Certificate lifecycle: with no certificate but an enrolment token (ENROL_TOKEN, or a line claimed from
  ENROL_TOKEN_FILE) the device first enrols over the CA's HTTP API (`lab/enrolment.py`); afterwards it renews
  its certificate itself over MQTT (`lab/renewal.py`), switching to a new client without losing a reading.
  With ENROL=est (`--enrol est`) both go over EST instead (`lab/est.py`).
- Files renewed under it (the generator, `./setup.sh certs`, or the CA): every CERT_WATCH_SECONDS (default 5)
  it looks at its certificate and key files (`lab/rotation.py`); once they hold another complete pair that
  passes the checks above, it switches to a new client with them the same way, long before the superseded
  certificate goes on the CRL (SUPERSEDED_GRACE_SECONDS, default 900).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pki.authority import CAError, load_certificate
from pki.config import ConfigError, Settings, lab_environ, revoked_next_step

from . import est
from .buffer import BUFFER_SIZE, ReadingBuffer
from .credentials import recover
from .device_config import DeviceConfig, DeviceConfigError, build_parser, check_identity, load_config
from .enrolment import EnrolmentError, EnrolmentRefused, enrol_if_needed, with_claimed_token
from .publisher import Thermometer
from .renewal import RenewalPolicy
from .session import MAX_IN_FLIGHT, STOP_POLL
from .temperature import TemperatureWalk, baseline_for, iso_utc, make_reading

__all__ = [
    "BUFFER_SIZE",
    "EXIT_CONFIG",
    "EXIT_OK",
    "EXIT_REVOKED",
    "EXIT_UNAVAILABLE",
    "MAX_IN_FLIGHT",
    "DeviceConfig",
    "DeviceConfigError",
    "ReadingBuffer",
    "TemperatureWalk",
    "Thermometer",
    "baseline_for",
    "build_parser",
    "check_identity",
    "est_renewal",
    "iso_utc",
    "load_config",
    "main",
    "make_reading",
    "revoked_line",
    "wait_for_new_certificate",
]

log = logging.getLogger("thermometer")

EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_CONFIG = 2
EXIT_REVOKED = 3  # the broker refuses this certificate as revoked; not restarted (lab/native.py, compose: wait)
ON_REVOKED = ("exit", "wait")
NEW_CERTIFICATE_POLL = 5.0  # seconds between two looks at the certificate file while waiting (ON_REVOKED=wait)


def est_renewal(config: DeviceConfig, environ: Mapping[str, str]) -> Callable[[str], dict[str, Any]] | None:
    """With ENROL=est the renewer asks the CA by EST simplereenroll instead of MQTT; None: over MQTT."""
    try:
        if est.enrol_mode(environ) != "est":
            return None
        return est.renewal_request(est.est_url(environ, Settings.from_env(environ)), config.identity)
    except (ValueError, ConfigError) as ex:
        raise DeviceConfigError(str(ex)) from None


def _configure_logging(verbose: bool, environ: Mapping[str, str]) -> None:
    level_name = "DEBUG" if verbose else (environ.get("LOG_LEVEL") or "INFO").strip().upper()
    level = logging.getLevelName(level_name)
    logging.basicConfig(
        level=level if isinstance(level, int) else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def revoked_line(config: DeviceConfig, serial: str, waiting: bool) -> str:
    """The one line a revoked thermometer logs: what happened and the next step (the same as ./setup.sh status)."""
    then = (
        f"waiting for a new certificate in {config.identity.cert}"
        if waiting
        else f"exiting with code {EXIT_REVOKED}, not to be restarted"
    )
    return (
        f"{config.device_id}: the CA revoked its certificate (serial {serial}, {config.identity.cert}); it will "
        f"not connect with it again. Next step: {revoked_next_step(config.device_id)}. Now {then}."
    )


def wait_for_new_certificate(config: DeviceConfig, revoked: bytes, stopped: Callable[[], bool]) -> bool:
    """ON_REVOKED=wait: True once the certificate file holds another certificate that passes check_identity."""
    while not stopped():
        deadline = time.monotonic() + NEW_CERTIFICATE_POLL
        while time.monotonic() < deadline:
            if stopped():
                return False
            time.sleep(STOP_POLL)
        try:
            if config.identity.cert.read_bytes() == revoked:
                continue
            check_identity(config)
        except (OSError, DeviceConfigError) as ex:
            log.debug("no usable new certificate yet: %s", ex)
            continue
        log.info("%s found a new certificate in %s: connecting with it", config.device_id, config.identity.cert)
        return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 stopped by SIGTERM/SIGINT, 1 the CA could not be reached to enrol, 2 configuration or
    certificate problem, or the CA refused the enrolment token, 3 the CA revoked the certificate (EXIT_REVOKED)."""
    args = build_parser().parse_args(argv)
    environ = lab_environ()
    _configure_logging(args.verbose, environ)
    if args.enrol:
        environ = {**environ, "ENROL": args.enrol}
    try:
        environ = with_claimed_token(environ)
        config = load_config(args, environ)
        renew_request = est_renewal(config, environ)
        recover(config.identity)
        enrol_if_needed(config.device_id, config.identity, environ)
        check_identity(config)
    except (DeviceConfigError, EnrolmentRefused) as ex:
        print(f"error: {ex}", file=sys.stderr)
        return EXIT_CONFIG
    except EnrolmentError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    on_revoked = (environ.get("ON_REVOKED") or "exit").strip().lower()
    if on_revoked not in ON_REVOKED:
        print(f"error: ON_REVOKED={on_revoked!r} must be one of {', '.join(ON_REVOKED)}", file=sys.stderr)
        return EXIT_CONFIG
    renewal = None
    if config.renew_check_interval > 0:
        renewal = RenewalPolicy.for_device(config.renew_before_days, config.renew_check_interval)
    # Plain values, set from the signal handler (which must not take locks).
    stop: list[str] = []
    current: list[Thermometer] = []

    def request_stop(signum: int, _frame: Any) -> None:
        stop.append(signal.Signals(signum).name)
        if current:
            current[-1].request_stop(stop[0])

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    while True:
        try:
            thermometer = Thermometer(config, renewal=renewal, renew_request=renew_request)
        except (OSError, ValueError) as ex:  # ssl could still refuse the files (e.g. an unsupported key)
            print(f"error: cannot use {config.identity.cert} / {config.identity.key}: {ex}", file=sys.stderr)
            return EXIT_CONFIG
        current.append(thermometer)
        if stop:
            thermometer.request_stop(stop[0])
        thermometer.run()
        if not thermometer.revoked:
            return EXIT_OK
        try:
            revoked = config.identity.cert.read_bytes()
            serial = format(load_certificate(revoked).serial_number, "x")
        except (OSError, CAError):
            revoked, serial = b"", "?"
        log.error(revoked_line(config, serial, on_revoked == "wait"))
        if on_revoked != "wait" or not wait_for_new_certificate(config, revoked, lambda: bool(stop)):
            return EXIT_REVOKED

"""First enrolment with a single-use token: a device with no certificate gets one without the CA passphrase.

The operator asks the CA for a token bound to one name (`POST /v1/ssl/tokens`, passphrase-protected, valid an
hour by default) and gives it to the device as ENROL_TOKEN. The device makes its key here, sends
`{"name", "days", "token", "csr"}` to `<CA_URL>/v1/ssl/sign`, checks the certificate it gets back (issued by
the CA in CA_CERT_PATH when that file exists, for its key, for its name), writes certificate, key (0600) and,
if it had none, the CA certificate atomically, then joins the broker. The token is never logged.

For fleets whose names are not known per container (`docker compose up --scale`): ENROL_TOKEN_FILE names a
shared file of `name token` lines (written by `python -m lab.enrolment tokens`); a device without DEVICE_ID
claims the first free line under a lock, marking it with its host name, and finds the same line again after a
restart.

`python -m lab.enrolment tokens --names a,b --file F` asks the running dashboard for tokens (with CA_PASSPHRASE
from .env) and appends them to F, next to a copy of the root certificate for the devices to pin.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from pki.authority import CAError, cert_pem, key_pem, load_certificate, serial_hex, utcnow, verify_leaf
from pki.config import DEVICE_ID_RE, ConfigError, Settings, lab_environ, parse_devices
from pki.store import CERT_MODE, KEY_MODE, atomic_write, exclusive_lock, read_optional

from . import est
from .credentials import CredentialError, check_issued, load_roots, new_key_and_csr, store
from .mqtt import Identity

log = logging.getLogger("thermometer")

ENROL_WAIT = 300.0  # seconds an enrolling device keeps retrying a CA that does not answer (yet)
REQUEST_TIMEOUT = 15.0
RETRY_STATUSES = (429, 502, 503, 504)


class EnrolmentError(Exception):
    """The CA could not be reached (in time); worth retrying later. One line, never contains the token."""


class EnrolmentRefused(EnrolmentError):
    """The CA refused, or its answer cannot be used: retrying the same way will not help."""


@dataclass(frozen=True)
class Enrolment:
    token: str = field(repr=False)
    ca_url: str
    days: int
    est_url: str | None = None  # ENROL=est: simpleenroll there instead of v1/ssl/sign (lab/est.py)


def default_ca_url(settings: Settings) -> str:
    host = settings.dashboard_host
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host  # noqa: S104 - a comparison
    scheme = "https" if settings.dashboard_tls else "http"  # DASHBOARD_TLS=1: the dashboard serves HTTPS only
    return f"{scheme}://{host}:{settings.dashboard_port}"


def enrolment_from_env(environ: Mapping[str, str]) -> Enrolment | None:
    token = (environ.get("ENROL_TOKEN") or "").strip()
    if not token:
        return None
    try:
        settings = Settings.from_env(environ)
    except ConfigError as ex:
        raise EnrolmentRefused(str(ex)) from None
    url = (environ.get("CA_URL") or "").strip().rstrip("/") or default_ca_url(settings)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise EnrolmentRefused(f"CA_URL={url!r} must be an http:// or https:// URL")
    try:
        by_est = est.enrol_mode(environ) == "est"
    except ValueError as ex:
        raise EnrolmentRefused(str(ex)) from None
    return Enrolment(token, url, settings.cert_days, est.est_url(environ, settings) if by_est else None)


# -- HTTP ----------------------------------------------------------------------------------------------


def _opener(url: str, ca_file: Path | None) -> urllib.request.OpenerDirector:
    """No proxies (the CA is local or on the LAN); https verified against ca_file when given, else the system."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))


def post_json(
    url: str, body: Mapping[str, Any], ca_file: Path | None = None, timeout: float = REQUEST_TIMEOUT
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    """POST JSON; (status, JSON body, headers) for answers, errors included. EnrolmentError: no answer at all."""
    request = urllib.request.Request(  # noqa: S310 - http(s) only
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with _opener(url, ca_file).open(request, timeout=timeout) as response:
            return response.status, _json(response.read()), response.headers
    except urllib.error.HTTPError as ex:
        return ex.code, _json(ex.read(), f"HTTP {ex.code} {ex.reason}"), ex.headers
    except (urllib.error.URLError, OSError, ValueError) as ex:  # refused, DNS, timeout, TLS
        reason = getattr(ex, "reason", None) or ex
        if isinstance(reason, ssl.SSLCertVerificationError):  # retrying will not make it trustworthy
            trust = f"the CA certificate {ca_file}" if ca_file else "the system's trusted roots (no CA_CERT_PATH yet)"
            raise EnrolmentRefused(
                f"the https certificate of {url} does not verify against {trust}: {reason.verify_message}"
            ) from None
        raise EnrolmentError(f"no answer from {url}: {reason}") from None


def _json(data: bytes, fallback: str = "not a JSON answer") -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        return {"error": fallback}
    return body if isinstance(body, dict) else {"error": fallback}


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- enrolling ----------------------------------------------------------------------------------------


def needs_enrolment(identity: Identity) -> bool:
    """No certificate yet, or only an expired one (a device that was off too long enrols again)."""
    data = read_optional(identity.cert)
    if data is None:
        return True
    try:
        return load_certificate(data).not_valid_after_utc <= utcnow()
    except CAError:
        return False  # a broken file is reported by the identity check, not silently replaced


def enrol(device_id: str, identity: Identity, enrolment: Enrolment, *, wait: float = ENROL_WAIT) -> x509.Certificate:
    """Get a certificate for a new key with the token and store the pair; raises EnrolmentRefused/EnrolmentError."""
    url = f"{enrolment.ca_url}/v1/ssl/sign"
    if urllib.parse.urlsplit(url).scheme == "http" and not _is_loopback(url):
        log.warning("sending the enrolment token to %s unencrypted: use an https:// CA_URL outside a lab", url)
    pinned = identity.ca_cert.exists()
    try:
        roots = load_roots(identity.ca_cert) if pinned else []
    except CredentialError as ex:
        raise EnrolmentRefused(str(ex)) from None
    key, csr = new_key_and_csr(device_id)
    body = {"name": device_id, "days": enrolment.days, "token": enrolment.token, "csr": csr}
    ca_file = identity.ca_cert if pinned else None
    if enrolment.est_url is not None:
        if not pinned:
            raise EnrolmentRefused(
                f"EST enrolment needs the root certificate at {identity.ca_cert} first "
                "(CA_CERT_PATH), to verify the CA's https certificate"
            )
        url = f"{enrolment.est_url}/simpleenroll"

    def send() -> tuple[int, dict[str, Any], Mapping[str, str]]:
        if enrolment.est_url is not None:
            return _est_enrol(url, csr, identity.ca_cert, device_id, enrolment.token)
        return post_json(url, body, ca_file)

    deadline = time.monotonic() + wait
    attempt = 0
    while True:
        attempt += 1
        try:
            status, reply, headers = send()
        except EnrolmentError as ex:
            status, reply, headers, problem = 0, {}, {}, str(ex)
        else:
            problem = f"{reply.get('error', 'no error message')} (HTTP {status})"
        if status in (200, 201):
            break
        if status and status not in RETRY_STATUSES:
            raise EnrolmentRefused(f"the CA at {enrolment.ca_url} refused the enrolment of {device_id}: {problem}")
        delay = min(30.0, 2.0 ** min(attempt - 1, 5))
        retry_after = (headers or {}).get("Retry-After")
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        if time.monotonic() + delay > deadline:
            raise EnrolmentError(f"could not enrol {device_id} within {wait:g} s: {problem}")
        log.warning("enrolment of %s: %s; retrying in %.0f s", device_id, problem, delay)
        time.sleep(delay)
    try:
        if not pinned:
            roots = [_self_signed_root(reply.get("ca"))]
        cert = check_issued(reply, key, roots, device_id)
        store(
            identity, cert_pem(cert), key_pem(key), keep_previous=False, ca_pem=None if pinned else cert_pem(roots[0])
        )
    except CredentialError as ex:
        raise EnrolmentRefused(f"the CA at {enrolment.ca_url} answered, but {ex}") from None
    except OSError as ex:
        raise EnrolmentRefused(f"cannot write the certificate files of {device_id}: {ex}") from None
    if not pinned:
        log.warning(
            "no CA certificate at %s before enrolling: the one the CA sent is now trusted (pin it "
            "beforehand with CA_CERT_PATH to make sure)",
            identity.ca_cert,
        )
    log.info(
        "enrolled %s with the CA at %s: serial %s, valid until %s",
        device_id,
        enrolment.ca_url,
        serial_hex(cert),
        cert.not_valid_after_utc.isoformat(timespec="seconds"),
    )
    return cert


def _est_enrol(
    url: str, csr: str, ca_file: Path, device_id: str, token: str
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    try:
        return est.post_csr(url, csr, ca_file=ca_file, basic=(device_id, token))
    except est.ESTUntrusted as ex:
        raise EnrolmentRefused(str(ex)) from None
    except est.ESTUnreachable as ex:
        raise EnrolmentError(str(ex)) from None


def _self_signed_root(pem: object) -> x509.Certificate:
    if not isinstance(pem, str):
        raise CredentialError("its reply has no CA certificate")
    try:
        root = load_certificate(pem.encode())
        constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (CAError, x509.ExtensionNotFound):
        raise CredentialError("its CA certificate is not a CA certificate") from None
    if not constraints.ca or not verify_leaf(root, root):
        raise CredentialError("its CA certificate is not a self-signed root")
    return root


def enrol_if_needed(device_id: str, identity: Identity, environ: Mapping[str, str]) -> x509.Certificate | None:
    """Enrol when there is no usable certificate and a token was given; None when nothing had to be done."""
    if not needs_enrolment(identity):
        return None
    enrolment = enrolment_from_env(environ)
    if enrolment is None:
        return None
    return enrol(device_id, identity, enrolment)


# -- a shared token file (docker compose --scale) -------------------------------------------------------


def claim_token(path: Path, claimant: str) -> tuple[str, str]:
    """(name, token) of this claimant's line of `path`: the one it claimed before, else the first free one.

    Lines are `name token` (free) or `name token claimant` (taken); `#` starts a comment. The file is
    rewritten atomically under `<path>.lock`, so replicas starting together never take the same line.
    """
    if not claimant or any(c.isspace() for c in claimant):
        raise EnrolmentRefused(f"cannot claim a token as {claimant!r}")
    with exclusive_lock(path.with_name(path.name + ".lock")):
        try:
            lines = path.read_text().splitlines()
        except OSError as ex:
            raise EnrolmentRefused(f"cannot read ENROL_TOKEN_FILE {path}: {ex.strerror or ex}") from None
        entries = [(i, line.split()) for i, line in enumerate(lines)]
        entries = [(i, f) for i, f in entries if len(f) >= 2 and not f[0].startswith("#")]
        for _i, fields in entries:
            if len(fields) >= 3 and fields[2] == claimant:
                return fields[0], fields[1]
        for i, fields in entries:
            if len(fields) == 2:
                if not DEVICE_ID_RE.match(fields[0]):
                    raise EnrolmentRefused(f"{path} line {i + 1}: {fields[0]!r} is not a device id")
                lines[i] = f"{fields[0]} {fields[1]} {claimant}"
                atomic_write(path, ("\n".join(lines) + "\n").encode(), KEY_MODE)
                return fields[0], fields[1]
    raise EnrolmentRefused(f"every token in {path} is taken: add more with python -m lab.enrolment tokens")


def with_claimed_token(environ: Mapping[str, str]) -> Mapping[str, str]:
    """ENROL_TOKEN_FILE without DEVICE_ID: claim a line (as this host) and take its name and token."""
    token_file = (environ.get("ENROL_TOKEN_FILE") or "").strip()
    if not token_file or (environ.get("DEVICE_ID") or "").strip():
        return environ
    try:
        name, token = claim_token(Path(token_file), socket.gethostname())
    except OSError as ex:  # e.g. the lock file cannot be created: a read-only mount
        raise EnrolmentRefused(f"cannot claim a token from {token_file}: {ex.strerror or ex}") from None
    log.info("claimed the device id %s from %s", name, token_file)
    return {**environ, "DEVICE_ID": name, "ENROL_TOKEN": token}


# -- python -m lab.enrolment tokens ------------------------------------------------------------------


def request_tokens(
    ca_url: str, passphrase: str, names: Sequence[str], ttl: int, ca_file: Path | None = None
) -> list[tuple[str, str]]:
    tokens = []
    for name in names:
        status, reply, _ = post_json(f"{ca_url}/v1/ssl/tokens", {"name": name, "pass": passphrase, "ttl": ttl}, ca_file)
        if status != 201 or not isinstance(reply.get("token"), str):
            raise EnrolmentRefused(f"no token for {name}: {reply.get('error', 'unexpected answer')} (HTTP {status})")
        tokens.append((name, reply["token"]))
    return tokens


def _fetch_root(ca_url: str, ca_file: Path | None) -> bytes:
    request = urllib.request.Request(f"{ca_url}/v1/ssl/ca")  # noqa: S310 - http(s) only
    try:
        with _opener(ca_url, ca_file).open(request, timeout=REQUEST_TIMEOUT) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as ex:
        raise EnrolmentError(f"cannot fetch the root certificate from {ca_url}: {ex}") from None
    load_certificate(data)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.enrolment", description="Enrolment tokens for devices that were never pre-generated."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tokens = sub.add_parser(
        "tokens",
        help="ask the running dashboard (the CA) for single-use tokens and append "
        "`name token` lines to a file that devices claim from (ENROL_TOKEN_FILE)",
    )
    tokens.add_argument("--names", required=True, help="comma-separated device ids, one token each")
    tokens.add_argument(
        "--file",
        type=Path,
        required=True,
        help="the token file (created 0600); the root "
        "certificate is written next to it as root_ca.crt for the devices to pin",
    )
    tokens.add_argument("--ttl", type=int, default=86400, help="seconds each token stays valid (default 86400)")
    tokens.add_argument("--ca-url", help="the CA (default CA_URL, or the dashboard of this lab)")
    args = parser.parse_args(argv)
    environ = lab_environ()
    try:
        settings = Settings.from_env(environ)
        names = parse_devices(args.names)
    except ConfigError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    passphrase = settings.ca_passphrase
    if not passphrase:
        print("error: CA_PASSPHRASE is not set (in .env or the environment)", file=sys.stderr)
        return 2
    ca_url = (args.ca_url or environ.get("CA_URL") or default_ca_url(settings)).rstrip("/")
    try:
        root = _fetch_root(ca_url, None)
        issued = request_tokens(ca_url, passphrase, names, args.ttl)
        args.file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.file.parent / "root_ca.crt", root, CERT_MODE)
        with exclusive_lock(args.file.with_name(args.file.name + ".lock")):
            existing = args.file.read_bytes() if args.file.exists() else b""
            if existing and not existing.endswith(b"\n"):
                existing += b"\n"
            lines = "".join(f"{name} {token}\n" for name, token in issued)
            atomic_write(args.file, existing + lines.encode(), KEY_MODE)
    except (EnrolmentError, CAError, OSError) as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 1
    print(
        f"{len(issued)} token(s) for {', '.join(names)} appended to {args.file} (valid {args.ttl} s); "
        f"root certificate in {args.file.parent / 'root_ca.crt'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The device's EST client (RFC 7030): `ENROL=est` (or `thermometer.py --enrol est`).

First enrolment: `POST <EST_URL>/simpleenroll` with HTTP Basic `<device id>:<ENROL_TOKEN>` and the CSR as
base64 DER (`application/pkcs10`). Renewal: `POST <EST_URL>/simplereenroll` with the current certificate and
key as the TLS client credential. Both answers are PKCS#7 certs-only, base64. EST_URL defaults to
`https://localhost:<CA_HTTPS_PORT>/.well-known/est`. The CA's HTTPS certificate is verified against the device's
root (CA_CERT_PATH): EST without a pinned root is refused (RFC 7030 4.1.1 bootstrapping is not done here).

Nothing here logs the token or a key.
"""

from __future__ import annotations

import base64
import binascii
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from pki.authority import cert_pem
from pki.config import Settings

from .mqtt import Identity
from .renewal import RenewalError

ENROL_MODES = ("mqtt", "est")  # mqtt: token enrolment over the CA's HTTP API, renewal over MQTT (the default)
REQUEST_TIMEOUT = 15.0


class ESTUnreachable(Exception):
    """No answer from the EST server (refused, timeout, DNS); worth retrying."""


class ESTUntrusted(Exception):
    """The EST server's certificate does not verify against the device's root: retrying will not help."""


def enrol_mode(environ: Mapping[str, str]) -> str:
    mode = (environ.get("ENROL") or "mqtt").strip().lower()
    if mode not in ENROL_MODES:
        raise ValueError(f"ENROL={mode!r} is not supported; use one of {', '.join(ENROL_MODES)}")
    return mode


def est_url(environ: Mapping[str, str], settings: Settings) -> str:
    url = (environ.get("EST_URL") or "").strip().rstrip("/")
    return url or f"https://localhost:{settings.ca_https_port}/.well-known/est"


Answer = tuple[int, dict[str, Any], Mapping[str, str]]


def post_csr(
    url: str,
    csr_pem: str,
    *,
    ca_file: Path,
    basic: tuple[str, str] | None = None,
    client: Identity | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> Answer:
    """POST a CSR the EST way: (status, {"crt": PEM} or {"error": text}, headers).

    Raises ESTUnreachable (no answer) or ESTUntrusted (the server's certificate does not verify)."""
    if not url.startswith("https://"):
        raise ESTUntrusted(f"EST_URL {url} must be https:// (RFC 7030 3.3: EST runs over TLS)")
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(Encoding.DER)
    headers = {"Content-Type": "application/pkcs10"}
    if basic is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url, data=base64.encodebytes(der), method="POST", headers=headers)  # noqa: S310
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, _certificate(response.read()), response.headers
    except urllib.error.HTTPError as ex:
        text = ex.read(2048).decode("utf-8", "replace").strip() or f"HTTP {ex.code} {ex.reason}"
        return ex.code, {"error": text}, ex.headers
    except (urllib.error.URLError, OSError) as ex:
        reason = getattr(ex, "reason", None) or ex
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise ESTUntrusted(
                f"the https certificate of {url} does not verify against {ca_file}: {reason.verify_message}"
            ) from None
        raise ESTUnreachable(f"no answer from {url}: {reason}") from None


def _certificate(data: bytes) -> dict[str, Any]:
    try:
        certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(data.split()), validate=True))
    except (ValueError, binascii.Error):
        return {"error": "the EST answer is not a base64 PKCS#7 certs-only structure"}
    if len(certs) != 1:
        return {"error": f"the EST answer holds {len(certs)} certificates, not 1"}
    return {"crt": cert_pem(certs[0]).decode()}


def renewal_request(url: str, identity: Identity) -> Callable[[str], dict[str, Any]]:
    """The Renewer's request over EST simplereenroll, authenticated by the device's current certificate."""

    def request(csr_pem: str) -> dict[str, Any]:
        try:
            status, body, _ = post_csr(f"{url}/simplereenroll", csr_pem, ca_file=identity.ca_cert, client=identity)
        except (ESTUnreachable, ESTUntrusted) as ex:
            raise RenewalError(str(ex)) from None
        except (OSError, ValueError) as ex:  # the current files cannot be used as a TLS credential
            raise RenewalError(f"cannot use {identity.cert} for EST: {ex}") from None
        if status != 200 or "crt" not in body:
            raise RenewalError(f"the CA refused the renewal over EST: {body.get('error')} (HTTP {status})")
        return body

    return request

"""A device's own key and certificate files: a new key and CSR, checking what the CA sent back, storing it.

Shared by first enrolment (`lab/enrolment.py`, over HTTP with a token) and renewal (`lab/renewal.py`, over
MQTT with the current certificate). The private key is made here and never leaves the device.

Renewal replaces a working pair, so the previous one is kept next to it (`<file>.previous`) until the new
pair has connected to the broker: if the new pair does not work, or the device stops in between, the
previous pair is put back (`restore_previous`, and `recover` at start-up).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from pki.authority import (
    CAError,
    PrivateKey,
    common_name,
    generate_private_key,
    load_certificate,
    load_private_key,
    public_key_matches,
    utcnow,
    verify_leaf,
)
from pki.store import CERT_MODE, KEY_MODE, LOCK_FILE, atomic_write, exclusive_lock, read_optional

from .mqtt import Identity

log = logging.getLogger("thermometer")

PREVIOUS_SUFFIX = ".previous"


class CredentialError(ValueError):
    """What the CA sent back cannot be used (or the files cannot be written); one line, safe to log."""


def new_key_and_csr(device_id: str) -> tuple[PrivateKey, str]:
    """A fresh EC P-256 key and a PEM CSR for it with CN = the device id (nothing else: the CA decides the rest)."""
    key = generate_private_key("ec")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(Encoding.PEM).decode()


def load_roots(path: Path) -> list[x509.Certificate]:
    data = read_optional(path)
    if data is None:
        raise CredentialError(f"CA certificate {path} does not exist")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CredentialError(f"CA certificate {path} is not a PEM certificate") from None


def identity_problem(
    cert: x509.Certificate, key: PrivateKey, roots: list[x509.Certificate], device_id: str
) -> str | None:
    """The one rule for "this certificate is this device's, for this key": the first check it fails, "key" (not
    for `key`), "issuer" (not signed by one of `roots`) or "name" (CN is not `device_id`); None when it passes.

    The broker takes the CN as user name and client id, so a certificate for another name is refused too.
    """
    if not public_key_matches(cert, key):
        return "key"
    if not any(verify_leaf(root, cert) for root in roots):
        return "issuer"
    if common_name(cert) != device_id:
        return "name"
    return None


def check_issued(
    body: Mapping[str, Any], key: PrivateKey, roots: list[x509.Certificate], device_id: str
) -> x509.Certificate:
    """The certificate in a CA reply, once it is proven usable: issued by one of `roots`, for `key`, for us."""
    pem = body.get("crt")
    if not isinstance(pem, str):
        raise CredentialError("the CA's reply has no certificate")
    try:
        cert = load_certificate(pem.encode())
    except CAError:
        raise CredentialError("the CA's reply is not a PEM certificate") from None
    problem = identity_problem(cert, key, roots, device_id)
    if problem == "key":
        raise CredentialError("the certificate in the CA's reply is not for the key this device just made")
    if problem == "issuer":
        raise CredentialError("the certificate in the CA's reply was not issued by the device's CA")
    if problem == "name":
        raise CredentialError(f"the certificate in the CA's reply is for {common_name(cert)!r}, not {device_id!r}")
    if cert.not_valid_after_utc <= utcnow():
        raise CredentialError("the certificate in the CA's reply has already expired")
    return cert


def previous(path: Path) -> Path:
    return path.with_name(path.name + PREVIOUS_SUFFIX)


def not_writable(identity: Identity) -> str | None:
    """Why the device could not replace its certificate and key files (None: it can), e.g. a read-only mount."""
    for path in (identity.cert, identity.key):
        folder = path.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} is not writable"
    return None


def store(
    identity: Identity, cert_pem: bytes, key_pem: bytes, *, keep_previous: bool, ca_pem: bytes | None = None
) -> None:
    """Write the new pair atomically (key 0600); with `keep_previous`, the current pair is kept as `.previous`.

    The key is written first: a stop between the two writes leaves a pair that does not match, which
    `recover` repairs from `.previous` at the next start.
    """
    if keep_previous:
        cert_data, key_data = read_optional(identity.cert), read_optional(identity.key)
        if cert_data is not None and key_data is not None:
            atomic_write(previous(identity.key), key_data, KEY_MODE)
            atomic_write(previous(identity.cert), cert_data, CERT_MODE)
    for path in (identity.cert, identity.key, identity.ca_cert):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if ca_pem is not None:
        atomic_write(identity.ca_cert, ca_pem, CERT_MODE)
    atomic_write(identity.key, key_pem, KEY_MODE)
    atomic_write(identity.cert, cert_pem, CERT_MODE)


def lab_lock(identity: Identity) -> contextlib.AbstractContextManager[object]:
    """The certificates folder's writer lock when the device's files live in the lab's layout (certs/<id>/):
    the generator and the CA service write there under it, so a renewal never interleaves with them."""
    lock = identity.cert.parent.parent / LOCK_FILE
    if lock.is_file() and os.access(lock, os.W_OK):
        return exclusive_lock(lock)
    return contextlib.nullcontext()


def has_previous(identity: Identity) -> bool:
    return previous(identity.cert).exists() and previous(identity.key).exists()


def restore_previous(identity: Identity) -> bool:
    """Put the `.previous` pair back in place (renames, key first); False when there is none."""
    if not has_previous(identity):
        return False
    os.replace(previous(identity.key), identity.key)
    os.replace(previous(identity.cert), identity.cert)
    return True


def discard_previous(identity: Identity) -> None:
    for path in (previous(identity.key), previous(identity.cert)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def pair_works(identity: Identity) -> bool:
    """The certificate and key files load and belong together (whether the broker accepts them is another matter)."""
    cert_data, key_data = read_optional(identity.cert), read_optional(identity.key)
    if cert_data is None or key_data is None:
        return False
    try:
        return public_key_matches(load_certificate(cert_data), load_private_key(key_data))
    except CAError:
        return False


def recover(identity: Identity) -> bool:
    """At start-up: a renewal was interrupted and left a broken pair; put the previous one back. True if it did."""
    if has_previous(identity) and not pair_works(identity):
        restore_previous(identity)
        log.warning(
            "the certificate files %s were left half-replaced by an interrupted renewal; the previous "
            "pair is back in place",
            identity.cert,
        )
        return True
    return False

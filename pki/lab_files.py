"""Tolerant readers of the lab's files for the generator (`pki.generator`): a certificate, a key or a CRL that is
missing or unreadable is a status to report, never an exception; the inventory is read without creating it."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from .authority import CAError, load_certificate, load_private_key
from .inventory import REVOKED as REVOKED_STATUS
from .inventory import CertificateRecord
from .status import INVALID, MISSING
from .store import read_optional

T = TypeVar("T")


def _read(path: Path, load: Callable[[bytes], T], missing: str, unreadable: str) -> tuple[T | None, str]:
    """(what `load` makes of the file, "") or (None, `missing` / `unreadable`)."""
    data = read_optional(path)
    if data is None:
        return None, missing
    try:
        return load(data), ""
    except CAError:
        return None, unreadable


def read_cert(path: Path) -> tuple[x509.Certificate | None, str]:
    return _read(path, load_certificate, "missing", "unreadable certificate")


def read_key(path: Path) -> tuple[object | None, str]:
    return _read(path, load_private_key, "missing key", "unreadable key")


def revoked_in_inventory(database_url: str, serials: Sequence[str]) -> dict[str, tuple[dt.datetime | None, str]]:
    """serial -> (revocation time, reason) for those of `serials` the inventory marks revoked.

    Read-only: a database that does not exist stays absent (`--check` must not create one), and one that
    cannot be read counts as knowing nothing (the CRL is consulted as well).
    """
    if not serials:
        return {}
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).is_file()):
        return {}
    try:
        with Session(_reader_engine(database_url)) as session:
            rows = session.execute(
                select(
                    CertificateRecord.serial, CertificateRecord.revoked_at, CertificateRecord.revocation_reason
                ).where(CertificateRecord.serial.in_(list(serials)), CertificateRecord.status == REVOKED_STATUS)
            )
            return {serial: (when, reason or "unspecified") for serial, when, reason in rows}
    except SQLAlchemyError:
        return {}


@functools.lru_cache(maxsize=8)
def _reader_engine(database_url: str) -> Engine:
    """One engine per database (the dashboard checks every few seconds); NullPool: no connection stays open."""
    return create_engine(database_url, poolclass=NullPool)


def load_crl(path: Path, root: x509.Certificate | None) -> tuple[x509.CertificateRevocationList | None, str]:
    """The CRL at `path` and '' when it is one of `root`'s; else None and the status to report."""
    data = read_optional(path)
    if data is None:
        return None, MISSING
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        return None, INVALID
    if root is None or crl.issuer != root.subject or not crl.is_signature_valid(root.public_key()):
        return None, INVALID
    return crl, ""


def san_set(names: Sequence[x509.GeneralName]) -> set[str]:
    return {f"{type(n).__name__}:{str(n.value).lower()}" for n in names}


def cert_sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return san_set(list(ext.value))

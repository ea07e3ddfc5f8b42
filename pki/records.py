"""The inventory's tables: every certificate the CA issued, create-request digests, enrolment tokens and lockout
failures (SQLAlchemy models; the migrations in pki/migrations create them)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .authority import utcnow

ACTIVE = "active"
SUPERSEDED = "superseded"
REVOKED = "revoked"

# `issued_via` of a certificate the generator found on disk and only recorded (pki/generator.py, a file it did not
# write, say after a run with another inventory): it rotated no key, and the certificate it displaces in the inventory
# may still be in use by whoever holds that key, so its predecessor is never listed as superseded.
RECORDED_VIAS = frozenset({"import"})
# A CA certificate is never listed on a CRL (the root's successor is a new root, not a leaf of it).
NEVER_SUPERSEDED_ROLES = frozenset({"root_ca"})


class Base(DeclarativeBase):
    pass


class UTCDateTime(TypeDecorator[dt.datetime]):
    """SQLite forgets time zones; everything stored is UTC, so give it back as aware UTC.

    (A TypeDecorator: a DateTime subclass's result_processor is replaced by the dialect's own type.)
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if isinstance(value, dt.datetime) and value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
        return value

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


class CertificateRecord(Base):
    __tablename__ = "certificates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    serial: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    common_name: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(1024))
    issuer: Mapped[str] = mapped_column(String(1024))
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    fingerprint_sha256: Mapped[str] = mapped_column(String(64))
    issued_via: Mapped[str] = mapped_column(String(16))
    requester: Mapped[str | None] = mapped_column(String(255), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=ACTIVE)
    issued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revocation_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pem: Mapped[str] = mapped_column(Text)

    def to_dict(self, now: dt.datetime | None = None) -> dict[str, Any]:
        now = now or utcnow()
        return {
            "serial": self.serial,
            "name": self.name,
            "common_name": self.common_name,
            "role": self.role,
            "subject": self.subject,
            "issuer": self.issuer,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "days_left": round((self.not_after - now).total_seconds() / 86400, 2),
            "fingerprint_sha256": self.fingerprint_sha256,
            "issued_via": self.issued_via,
            "requester": self.requester,
            "status": self.status,
            "issued_at": self.issued_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "revocation_reason": self.revocation_reason,
        }


class CreateRequestRecord(Base):
    """The digest of the normalised `create` request behind a certificate: an identical retry gets it back."""

    __tablename__ = "create_requests"

    serial: Mapped[str] = mapped_column(String(64), ForeignKey("certificates.serial"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    digest: Mapped[str] = mapped_column(String(64))


class EnrolmentToken(Base):
    """A single-use enrolment token; only its SHA-256 is stored, never the token itself."""

    __tablename__ = "enrolment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    requester: Mapped[str | None] = mapped_column(String(255), nullable=True)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    used_serial: Mapped[str | None] = mapped_column(String(64), nullable=True)


class LockoutFailure(Base):
    """One wrong passphrase or token, counted against a requester key (pki/lockout.py owns the rules)."""

    __tablename__ = "lockout_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255), index=True)
    # Seconds since the epoch (wall clock): counts outlive a restart and are shared by every CA process.
    failed_at: Mapped[float] = mapped_column(Float, index=True)

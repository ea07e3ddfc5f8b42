"""The inventory: every certificate the CA has issued, in SQLite by default (any SQLAlchemy URL works)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from sqlalchemy import DateTime, Integer, String, Text, create_engine, event, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .authority import cert_pem, common_name, fingerprint_sha256, serial_hex, utcnow

ACTIVE = "active"
SUPERSEDED = "superseded"
REVOKED = "revoked"


class Base(DeclarativeBase):
    pass


class UTCDateTime(DateTime):
    """SQLite forgets time zones; everything stored is UTC, so give it back as aware UTC."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        parent = super().result_processor(dialect, coltype)

        def process(value: Any) -> Any:
            if parent is not None:
                value = parent(value)
            if isinstance(value, dt.datetime) and value.tzinfo is None:
                value = value.replace(tzinfo=dt.UTC)
            return value

        return process


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


def make_engine(url: str) -> Engine:
    """An engine with SQLite tuned for several writers: WAL, a busy timeout, BEGIN IMMEDIATE."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below take over
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Take the write lock up front so concurrent writers queue instead of deadlocking.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Inventory:
    """Every issued certificate; exactly one `active` row per entity name."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def record_issued(
        self,
        cert: x509.Certificate,
        *,
        name: str,
        role: str,
        via: str,
        requester: str | None = None,
        session: Session | None = None,
    ) -> CertificateRecord:
        """Add `cert` as the entity's current certificate; earlier active ones become superseded.

        Recording the same serial twice is a no-op that returns the existing row.
        """
        if session is None:
            with self.session() as own:
                return self.record_issued(cert, name=name, role=role, via=via, requester=requester, session=own)
        serial = serial_hex(cert)
        existing = session.scalar(select(CertificateRecord).where(CertificateRecord.serial == serial))
        if existing is not None:
            return existing
        session.execute(
            update(CertificateRecord)
            .where(CertificateRecord.name == name, CertificateRecord.status == ACTIVE)
            .values(status=SUPERSEDED)
        )
        row = CertificateRecord(
            serial=serial,
            name=name,
            common_name=common_name(cert),
            role=role,
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            fingerprint_sha256=fingerprint_sha256(cert),
            issued_via=via,
            requester=requester,
            status=ACTIVE,
            issued_at=utcnow(),
            pem=cert_pem(cert).decode(),
        )
        session.add(row)
        session.flush()
        return row

    def current(self, name: str) -> CertificateRecord | None:
        with self.session() as session:
            return session.scalar(
                select(CertificateRecord).where(CertificateRecord.name == name, CertificateRecord.status == ACTIVE)
            )

    def by_serial(self, serial: str) -> CertificateRecord | None:
        with self.session() as session:
            return session.scalar(select(CertificateRecord).where(CertificateRecord.serial == serial.lower()))

    def list(self, name: str | None = None, status: str | None = None) -> list[CertificateRecord]:
        query = select(CertificateRecord).order_by(CertificateRecord.id)
        if name:
            query = query.where(CertificateRecord.name == name)
        if status:
            query = query.where(CertificateRecord.status == status)
        with self.session() as session:
            return list(session.scalars(query))

    def revoked_serials(self) -> list[tuple[int, dt.datetime]]:
        """(serial, revocation time) of every revoked certificate: the CRL's content."""
        query = select(CertificateRecord.serial, CertificateRecord.revoked_at).where(
            CertificateRecord.status == REVOKED
        )
        with self.session() as session:
            return [(int(serial, 16), when or utcnow()) for serial, when in session.execute(query)]

    def denied_names(self) -> list[str]:
        """Names whose latest certificate is revoked and that hold no active one: the ACL denies them."""
        with self.session() as session:
            revoked = set(session.scalars(select(CertificateRecord.name).where(CertificateRecord.status == REVOKED)))
            active = set(session.scalars(select(CertificateRecord.name).where(CertificateRecord.status == ACTIVE)))
        return sorted(revoked - active)

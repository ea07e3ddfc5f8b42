"""The inventory: every certificate the CA has issued, in SQLite by default (any SQLAlchemy URL works).

Its pieces: the tables (pki/records.py), the engine and migrated database (pki/database.py), the write path
for issued certificates with its group commit (pki/group_commit.py), and what the broker is told from it
(pki/revocation_list.py). The names are importable from here as before.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable

from cryptography import x509
from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from . import migrate
from .authority import serial_hex, utcnow
from .database import INVENTORY_WRITE_LOCK, READ_ONLY_OPTION, Database, make_engine
from .group_commit import (
    _RECORD,
    IssuanceRecorder,
    IssuedAs,
    TokenAlreadyUsed,
    _insert_issued,
    _issued_values,
    _PendingIssue,
)
from .records import (
    ACTIVE,
    NEVER_SUPERSEDED_ROLES,
    RECORDED_VIAS,
    REVOKED,
    SUPERSEDED,
    Base,
    CertificateRecord,
    CreateRequestRecord,
    EnrolmentToken,
    LockoutFailure,
    UTCDateTime,
)
from .revocation_list import collectors, crl_entries, denied_names

__all__ = [
    "ACTIVE",
    "INVENTORY_WRITE_LOCK",
    "NEVER_SUPERSEDED_ROLES",
    "READ_ONLY_OPTION",
    "RECORDED_VIAS",
    "REVOKED",
    "SUPERSEDED",
    "Base",
    "CertificateRecord",
    "CreateRequestRecord",
    "Database",
    "EnrolmentToken",
    "IssuanceRecorder",
    "IssuedAs",
    "Inventory",
    "LockoutFailure",
    "TokenAlreadyUsed",
    "UTCDateTime",
    "_PendingIssue",
    "_issued_values",
    "make_engine",
]


class Inventory(Database):
    """Every issued certificate; exactly one `active` row per entity name."""

    def __init__(self, url: str) -> None:
        super().__init__(url, migrate.INVENTORY, serialize_writes=True)
        self._roles_compiled = _RECORD.roles.compile(dialect=self.engine.dialect)
        self.recorder = IssuanceRecorder(self)

    def record_issued_grouped(
        self,
        cert: x509.Certificate,
        issued: IssuedAs,
        *,
        token_sha256: str | None = None,
        unless: Callable[[], bool] | None = None,
    ) -> bool:
        """`record_issued` by group commit (see IssuanceRecorder); returns once the row is durable.

        `token_sha256`: an enrolment token consumed in the same transaction (TokenAlreadyUsed if it was used
        first). `unless`: checked inside the write transaction; when it returns True nothing is written and
        the result is False.
        """
        values = _issued_values(cert, name=issued.name, role=issued.role, via=issued.via, requester=issued.requester)
        return self.recorder.record(values, token_sha256, unless)

    def close(self) -> None:
        self.recorder.close()
        super().close()

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

        Recording the same serial twice is a no-op that returns the existing row. The rows are written by the same
        statements as the group commit's (`_insert_issued`): one write path for the fact "issued".
        """
        if session is None:
            with self.session() as own:
                return self.record_issued(cert, name=name, role=role, via=via, requester=requester, session=own)
        _insert_issued(session.connection(), [_issued_values(cert, name=name, role=role, via=via, requester=requester)])
        row = session.scalar(select(CertificateRecord).where(CertificateRecord.serial == serial_hex(cert)))
        assert row is not None
        return row

    def current(self, name: str) -> CertificateRecord | None:
        with self.reading() as session:
            return session.scalar(
                select(CertificateRecord).where(CertificateRecord.name == name, CertificateRecord.status == ACTIVE)
            )

    def by_serial(self, serial: str) -> CertificateRecord | None:
        with self.reading() as session:
            return session.scalar(select(CertificateRecord).where(CertificateRecord.serial == serial.lower()))

    def list(self, name: str | None = None, status: str | None = None) -> list[CertificateRecord]:
        query = select(CertificateRecord).order_by(CertificateRecord.id)
        if name:
            query = query.where(CertificateRecord.name == name)
        if status:
            query = query.where(CertificateRecord.status == status)
        with self.reading() as session:
            return list(session.scalars(query))

    def revoked_serials(
        self, session: Session | None = None, superseded_grace: float | None = None, now: dt.datetime | None = None
    ) -> list[tuple[int, dt.datetime, str | None]]:
        """(serial, revocation time, RFC 5280 reason) of every certificate the CRL lists (pki/revocation_list.py)."""
        if session is None:
            with self.session() as own:
                return crl_entries(own, superseded_grace, now)
        return crl_entries(session, superseded_grace, now)

    def denied_names(self, session: Session | None = None) -> list[str]:
        """Identities whose latest certificate is revoked and that hold no active one: the ACL denies them."""
        if session is None:
            with self.session() as own:
                return denied_names(own)
        return denied_names(session)

    def collectors(self, session: Session | None = None) -> list[str]:
        """Entities named by a MAC address with an active certificate: the ACL grants each its reply topic."""
        if session is None:
            with self.session() as own:
                return collectors(own)
        return collectors(session)

    # -- the CA service: lookups, revocation, create replay, enrolment tokens ---------------------------

    def latest(self, name: str) -> CertificateRecord | None:
        """The newest certificate of `name`, whatever its status."""
        with self.reading() as session:
            return session.scalar(
                select(CertificateRecord).where(CertificateRecord.name == name).order_by(CertificateRecord.id.desc())
            )

    def roles(self, name: str) -> set[str]:
        """Every role `name` was ever issued a certificate for.

        Asked on every issuance, so it skips SQLAlchemy's statement machinery (docs/benchmarks.md has what that
        cost): the statement is compiled once for this database and run on
        a pooled DB-API connection (no transaction is opened: one SELECT reads a consistent snapshot).
        """
        compiled = self._roles_compiled
        params = compiled.construct_params({"entity": name})
        args = tuple(params[key] for key in compiled.positiontup or ()) if compiled.positional else params
        conn = self.engine.raw_connection()
        try:
            cursor = conn.cursor()
            try:
                cursor.execute(str(compiled), args)
                return {row[0] for row in cursor.fetchall()}
            finally:
                cursor.close()
        finally:
            conn.close()

    def revocable(self, name: str, now: dt.datetime | None = None) -> list[CertificateRecord]:
        """Certificates of `name` that are not revoked and not expired yet (superseded ones included)."""
        now = now or utcnow()
        with self.reading() as session:
            return list(
                session.scalars(
                    select(CertificateRecord)
                    .where(
                        CertificateRecord.name == name,
                        CertificateRecord.status != REVOKED,
                        CertificateRecord.not_after > now,
                    )
                    .order_by(CertificateRecord.id)
                )
            )

    def revoke(
        self, serials: Iterable[str], reason: str, session: Session, now: dt.datetime | None = None
    ) -> list[str]:
        """Mark certificates revoked (in the caller's transaction, so the CRL write can roll it back)."""
        now = now or utcnow()
        changed = []
        for serial in serials:
            result = session.execute(
                update(CertificateRecord)
                .where(CertificateRecord.serial == serial, CertificateRecord.status != REVOKED)
                .values(status=REVOKED, revoked_at=now, revocation_reason=reason)
            )
            if result.rowcount:  # type: ignore[attr-defined]
                changed.append(serial)
        return changed

    def record_create_digest(self, serial: str, name: str, digest: str, session: Session) -> None:
        session.merge(CreateRequestRecord(serial=serial, name=name, digest=digest))

    def create_digest(self, serial: str) -> str | None:
        with self.reading() as session:
            return session.scalar(select(CreateRequestRecord.digest).where(CreateRequestRecord.serial == serial))

    def add_token(self, token_sha256: str, name: str, expires_at: dt.datetime, requester: str | None) -> None:
        with self.session() as session:
            session.add(
                EnrolmentToken(
                    token_sha256=token_sha256,
                    name=name,
                    created_at=utcnow(),
                    expires_at=expires_at,
                    requester=requester,
                )
            )

    def token(self, token_sha256: str) -> EnrolmentToken | None:
        with self.reading() as session:
            return session.scalar(select(EnrolmentToken).where(EnrolmentToken.token_sha256 == token_sha256))

    def consume_token(
        self, token_sha256: str, serial: str, session: Session | Connection, now: dt.datetime | None = None
    ) -> bool:
        """Mark an unused token used; False when another request used it first (single use under races)."""
        result = session.execute(
            update(EnrolmentToken)
            .where(EnrolmentToken.token_sha256 == token_sha256, EnrolmentToken.used_at.is_(None))
            .values(used_at=now or utcnow(), used_serial=serial)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

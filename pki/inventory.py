"""The inventory: every certificate the CA has issued, in SQLite by default (any SQLAlchemy URL works)."""

from __future__ import annotations

import datetime as dt
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    bindparam,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from . import migrate
from .authority import cert_pem, common_name, fingerprint_sha256, serial_hex, utcnow

log = logging.getLogger(__name__)
# Execution option that marks the read-only engine: its transactions begin DEFERRED, not IMMEDIATE.
READ_ONLY_OPTION = "inventory_read_only"
# The PostgreSQL advisory lock key that serialises the inventory's write transactions (any constant of our own).
INVENTORY_WRITE_LOCK = 0x10CA1AB

ACTIVE = "active"
SUPERSEDED = "superseded"
REVOKED = "revoked"

# Names that may appear in a broker ACL `user` line (no spaces, newlines or wildcards).
_ACL_SAFE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAC_NAME_RE = re.compile(r"[0-9A-Fa-f]{12}")
# `issued_via` of a certificate the generator found on disk and only recorded (pki/lab.py, a file it did not write,
# say after a run with another inventory): it rotated no key, and the certificate it displaces in the inventory
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


class _RecordStatements:
    """The statements behind `Inventory.record_issued`, built once (SQLAlchemy caches their compiled SQL)."""

    def __init__(self) -> None:
        table = CertificateRecord.__table__
        self.insert = insert(table)
        self.serials_known = select(table.c.serial).where(table.c.serial.in_(bindparam("serials", expanding=True)))
        self.supersede_many = (update(table)
                               .where(table.c.name.in_(bindparam("entities", expanding=True)),
                                      table.c.status == ACTIVE)
                               .values(status=SUPERSEDED))
        self.roles = select(table.c.role).where(table.c.name == bindparam("entity")).distinct()


_RECORD = _RecordStatements()


def _issued_values(cert: x509.Certificate, *, name: str, role: str, via: str, requester: str | None) -> dict[str, Any]:
    """The inventory row of a newly issued certificate, as column values."""
    return {
        "serial": serial_hex(cert),
        "name": name,
        "common_name": common_name(cert),
        "role": role,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "fingerprint_sha256": fingerprint_sha256(cert),
        "issued_via": via,
        "requester": requester,
        "status": ACTIVE,
        "issued_at": utcnow(),
        "revoked_at": None,
        "revocation_reason": None,
        "pem": cert_pem(cert).decode(),
    }


def _public_key_der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )


def _as_utc(value: dt.datetime) -> dt.datetime:
    """Core selects bypass UTCDateTime's result processing on some paths: SQLite gives naive UTC back."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def make_engine(url: str, *, serialize_writes: bool = False) -> Engine:
    """An engine for the lab's database: SQLite tuned for several writers (WAL, a busy timeout, BEGIN IMMEDIATE:
    one writer at a time), or a server database (PostgreSQL: `postgresql+psycopg://…`).

    `serialize_writes`: write transactions run one at a time on a server database too (SQLite's always do), as
    the inventory needs: "one active certificate per entity" is a read-then-write rule, which concurrent
    transactions of several CA processes would break under READ COMMITTED. The lock is a transaction-scoped
    advisory lock, so it holds across processes and hosts, and ends with the transaction.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(url, pool_pre_ping=True)
        if serialize_writes and parsed.get_backend_name() == "postgresql":

            @event.listens_for(engine, "begin")
            def _on_pg_begin(conn: Any) -> None:
                if not conn.get_execution_options().get(READ_ONLY_OPTION):
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({INVENTORY_WRITE_LOCK})")

        return engine
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
        # Take the write lock up front so concurrent writers queue instead of deadlocking. Readers (WAL:
        # a snapshot, no lock) begin deferred, so they never wait in SQLite's sleeping busy handler while a
        # writer commits.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY_OPTION) else "BEGIN IMMEDIATE")

    return engine


class Inventory:
    """Every issued certificate; exactly one `active` row per entity name."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url, serialize_writes=True)
        migrate.upgrade(self.engine, migrate.INVENTORY)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_engine = self.engine.execution_options(**{READ_ONLY_OPTION: True})
        self._roles_compiled = _RECORD.roles.compile(dialect=self.engine.dialect)
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)
        self.recorder = IssuanceRecorder(self)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction: a consistent snapshot that takes no write lock."""
        with self._read_sessions.begin() as session:
            yield session

    def record_issued_grouped(
        self,
        cert: x509.Certificate,
        *,
        name: str,
        role: str,
        via: str,
        requester: str | None = None,
        token_sha256: str | None = None,
        unless: Callable[[], bool] | None = None,
    ) -> bool:
        """`record_issued` by group commit (see IssuanceRecorder); returns once the row is durable.

        `token_sha256`: an enrolment token consumed in the same transaction (TokenAlreadyUsed if it was used
        first). `unless`: checked inside the write transaction; when it returns True nothing is written and
        the result is False.
        """
        values = _issued_values(cert, name=name, role=role, via=via, requester=requester)
        return self.recorder.record(values, token_sha256, unless)

    def close(self) -> None:
        self.recorder.close()
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

        Recording the same serial twice is a no-op that returns the existing row. The rows are written by the same
        statements as the group commit's (`_insert_issued`): one write path for the fact "issued".
        """
        if session is None:
            with self.session() as own:
                return self.record_issued(cert, name=name, role=role, via=via, requester=requester, session=own)
        _insert_issued(session.connection(), [_issued_values(cert, name=name, role=role, via=via,
                                                              requester=requester)])
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
        """(serial, revocation time, RFC 5280 reason) of every certificate the CRL lists: the CRL's content.

        Revoked certificates with the reason given to `revoke`; with `superseded_grace` (seconds), also every
        unexpired superseded certificate whose successor has a new key and was issued at least that long ago,
        reason `superseded` (so a stolen old key dies with key rotation), dated when its grace ended. The CA
        service's successors (`sign`, `create`, renewal) and the generator's reissues (`cli`: always a new key)
        count alike; running processes switch to renewed files well inside the grace (lab/rotation.py). A
        re-signed key (`sign` without a CSR, the same public key) supersedes nothing on the CRL: the key is
        still in use. Nor does a certificate the generator only recorded (RECORDED_VIAS), nor a root.
        """
        if session is None:
            with self.session() as own:
                return self.revoked_serials(own, superseded_grace, now)
        table = CertificateRecord.__table__
        query = select(table.c.serial, table.c.revoked_at, table.c.revocation_reason).where(table.c.status == REVOKED)
        entries = [(int(serial, 16), when or utcnow(), reason) for serial, when, reason in session.execute(query)]
        if superseded_grace is None:
            return entries
        now = now or utcnow()
        grace = dt.timedelta(seconds=superseded_grace)
        old = session.execute(select(table.c.name, table.c.id, table.c.serial, table.c.pem).where(
            table.c.status == SUPERSEDED, table.c.not_after > now,
            table.c.role.not_in(list(NEVER_SUPERSEDED_ROLES)))).all()
        if not old:
            return entries
        issued: dict[str, list[tuple[int, dt.datetime, str, str]]] = {}
        names = sorted({row.name for row in old})
        for start in range(0, len(names), 500):
            for name, row_id, issued_at, via, pem in session.execute(
                select(table.c.name, table.c.id, table.c.issued_at, table.c.issued_via, table.c.pem)
                .where(table.c.name.in_(names[start:start + 500])).order_by(table.c.id)
            ):
                issued.setdefault(name, []).append((row_id, _as_utc(issued_at), via, pem))
        keys: dict[int, bytes] = {}  # row id -> public key, parsed only for rows past the grace

        def key_of(row_id: int, pem: str) -> bytes:
            if row_id not in keys:
                keys[row_id] = _public_key_der(pem)
            return keys[row_id]

        for name, row_id, serial, pem in old:
            later = [s for s in issued.get(name, []) if s[0] > row_id]
            if not later or later[0][1] + grace > now:  # no successor, or the first one is still inside the grace
                continue
            # The key rotated with the first later certificate for another key (re-signs of this key in between
            # keep it in use); the grace runs from then.
            key = key_of(row_id, pem)
            rotated = next((s for s in later if key_of(s[0], s[3]) != key), None)
            if rotated is None or rotated[2] in RECORDED_VIAS or rotated[1] + grace > now:
                continue
            entries.append((int(serial, 16), rotated[1] + grace, "superseded"))
        return entries

    def denied_names(self, session: Session | None = None) -> list[str]:
        """Identities whose latest certificate is revoked and that hold no active one: the ACL denies them.

        The broker's user name is the certificate CN, so a revoked certificate's CN is denied as well as its
        entity name (they differ only for `create` requests with their own `cn`); nothing an active
        certificate still uses is ever denied.
        """
        if session is None:
            with self.session() as own:
                return self.denied_names(own)
        rows = session.execute(
            select(CertificateRecord.name, CertificateRecord.common_name, CertificateRecord.status).where(
                CertificateRecord.status.in_((REVOKED, ACTIVE))
            )
        ).all()
        active_names = {name for name, _cn, status in rows if status == ACTIVE}
        active_cns = {cn for _name, cn, status in rows if status == ACTIVE}
        denied: set[str] = set()
        for name, cn, status in rows:
            if status == REVOKED and name not in active_names:
                denied.update(v for v in (name, cn) if v not in active_cns and _ACL_SAFE_RE.fullmatch(v))
        return sorted(denied)

    def collectors(self, session: Session | None = None) -> list[str]:
        """Entities named by a MAC address (12 hex digits) with an active certificate: the ACL grants each its
        reply topic with colons, `ssl/AA:BB:CC:DD:EE:01`."""
        if session is None:
            with self.session() as own:
                return self.collectors(own)
        names = session.execute(select(CertificateRecord.name).where(CertificateRecord.status == ACTIVE)).scalars()
        return sorted({name for name in names if _MAC_NAME_RE.fullmatch(name)})

    # -- the CA service: lookups, revocation, create replay, enrolment tokens ---------------------------

    def latest(self, name: str) -> CertificateRecord | None:
        """The newest certificate of `name`, whatever its status."""
        with self.reading() as session:
            return session.scalar(
                select(CertificateRecord).where(CertificateRecord.name == name).order_by(CertificateRecord.id.desc())
            )

    def roles(self, name: str) -> set[str]:
        """Every role `name` was ever issued a certificate for.

        Asked on every issuance, so it skips SQLAlchemy's statement machinery (a tenth of a millisecond per
        call, a tenth of the CA's CPU under load): the statement is compiled once for this database and run on
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
            return list(session.scalars(
                select(CertificateRecord).where(
                    CertificateRecord.name == name,
                    CertificateRecord.status != REVOKED,
                    CertificateRecord.not_after > now,
                ).order_by(CertificateRecord.id)
            ))

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
            session.add(EnrolmentToken(token_sha256=token_sha256, name=name, created_at=utcnow(),
                                       expires_at=expires_at, requester=requester))

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


class TokenAlreadyUsed(Exception):
    """The enrolment token was used by another request first (single use under races)."""


class _PendingIssue:
    """One issued certificate waiting for its group commit, and what became of it."""

    __slots__ = ("values", "token_sha256", "unless", "done", "recorded", "error")

    def __init__(self, values: dict[str, Any], token_sha256: str | None, unless: Callable[[], bool] | None) -> None:
        self.values = values
        self.token_sha256 = token_sha256
        self.unless = unless
        self.done = threading.Event()
        self.recorded = False
        self.error: BaseException | None = None


class IssuanceRecorder:
    """Group commit of issued certificates: concurrent issuances share one transaction, so one fsync.

    With `synchronous=FULL` every SQLite commit waits for an fsync, and writers queue for the write lock
    (SQLite's busy handler sleeps between retries, so queued writers also wait longer than they must): one
    commit per certificate capped issuance at about a hundred per second, with seconds at p99. Here callers
    hand their rows to one committer thread and wait. It takes everything queued (up to `max_batch`) and
    writes it in one transaction with a handful of statements (supersede the entities' active rows, insert
    the batch), commits once, then wakes the callers: nobody is answered before their row is durable. While
    one batch commits the next one gathers, so batches grow with the load and an idle CA commits at once.
    """

    def __init__(self, inventory: Inventory, max_batch: int = 512) -> None:
        self.inventory = inventory
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_PendingIssue | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0  # observable: commits made, and the rows they carried
        self.rows = 0

    def record(self, values: dict[str, Any], token_sha256: str | None, unless: Callable[[], bool] | None) -> bool:
        pending = _PendingIssue(values, token_sha256, unless)
        with self._lock:
            if self._closed:  # the inventory is closing: commit this one alone, in the caller's thread
                self._commit([pending])
            else:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="inventory-commit", daemon=True)
                    self._thread.start()
                self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.recorded

    def close(self, timeout: float = 30) -> None:
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)  # after everything already queued
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_PendingIssue]) -> None:
        try:
            with self.inventory.engine.begin() as conn:  # Core, not an ORM session: this runs per batch
                todo = []
                for item in batch:  # per-item checks first: a refused item writes nothing
                    try:
                        if item.unless is not None and item.unless():
                            continue
                        if item.token_sha256 is not None and not self.inventory.consume_token(
                            item.token_sha256, item.values["serial"], conn
                        ):
                            item.error = TokenAlreadyUsed("this enrolment token has already been used")
                            continue
                    except Exception as ex:  # this caller's problem only
                        item.error = ex
                        continue
                    todo.append(item)
                if todo:
                    _insert_issued(conn, [item.values for item in todo])
        except Exception as ex:  # the transaction failed: nothing in the batch is durable
            log.error("inventory group commit of %d certificates failed: %s", len(batch), ex)
            for item in batch:
                if item.error is None:
                    item.error = ex
        else:
            for item in todo:
                item.recorded = True
            self.batches += 1
            self.rows += len(todo)
        finally:
            for item in batch:
                item.done.set()


def _insert_issued(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert issued certificates in a few statements; per entity the last one is active, the rest superseded.

    A serial already recorded is skipped (recording twice is a no-op, as in `Inventory.record_issued`).
    """
    known = set(conn.execute(_RECORD.serials_known, {"serials": [r["serial"] for r in rows]}).scalars())
    fresh: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["serial"] not in known:
            fresh.setdefault(row["serial"], row)
    if not fresh:
        return
    latest = {row["name"]: row["serial"] for row in fresh.values()}
    conn.execute(_RECORD.supersede_many, {"entities": list(latest)})
    conn.execute(_RECORD.insert, [
        {**row, "status": ACTIVE if latest[row["name"]] == row["serial"] else SUPERSEDED} for row in fresh.values()
    ])

"""The one write path for the fact "issued": the inventory rows of new certificates, written by group commit
(IssuanceRecorder) or in the caller's transaction (`Inventory.record_issued`), by the same statements."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from .authority import cert_pem, common_name, fingerprint_sha256, serial_hex, utcnow
from .records import ACTIVE, SUPERSEDED, CertificateRecord

if TYPE_CHECKING:
    from .inventory import Inventory

log = logging.getLogger("pki.inventory")


@dataclass(frozen=True)
class IssuedAs:
    """Whose certificate it is, in which role, how it was issued (`via`) and at whose request."""

    name: str
    role: str
    via: str
    requester: str | None = None


class _RecordStatements:
    """The statements behind `Inventory.record_issued`, built once (SQLAlchemy caches their compiled SQL)."""

    def __init__(self) -> None:
        table = CertificateRecord.__table__
        self.insert = insert(table)
        self.serials_known = select(table.c.serial).where(table.c.serial.in_(bindparam("serials", expanding=True)))
        self.supersede_many = (
            update(table)
            .where(table.c.name.in_(bindparam("entities", expanding=True)), table.c.status == ACTIVE)
            .values(status=SUPERSEDED)
        )
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
    (what one commit per certificate cost: docs/benchmarks.md, "CA: certificate issuance"). Here callers
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
    conn.execute(
        _RECORD.insert,
        [{**row, "status": ACTIVE if latest[row["name"]] == row["serial"] else SUPERSEDED} for row in fresh.values()],
    )

"""Temperature readings on disk, so a restarted dashboard still shows the last hour.

Same database as the certificate inventory (DATABASE_URL), its own table and metadata. Writes come in
batches from the live hub's emitter thread (one transaction per flush, never one per MQTT message), and
retention is bounded twice: by age (24 h by default) and by row count, so a flood cannot fill the disk.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import Float, Index, Integer, String, delete, func, select, text
from sqlalchemy.orm import Mapped, mapped_column

from pki.inventory import Database

from .schema import DASHBOARD, DashboardBase

log = logging.getLogger(__name__)

RETENTION_SECONDS = 24 * 3600
MAX_ROWS = 500_000


class Reading(DashboardBase):
    __tablename__ = "readings"
    __table_args__ = (Index("ix_readings_device_received", "device_id", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    # Server receive time (epoch seconds): one clock for every device, so charts never run backwards.
    received_at: Mapped[float] = mapped_column(Float, index=True)
    temperature: Mapped[float] = mapped_column(Float)
    # What the device said, kept verbatim for display (devices may have wrong clocks).
    device_timestamp: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seq: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ReadingIn(NamedTuple):
    """A reading as one row of `readings` (without its id): what the store writes and the row a query returns."""

    device_id: str
    received_at: float
    temperature: float
    device_timestamp: str | None = None
    seq: int | None = None


READING_COLUMNS = ReadingIn._fields
_READING_SELECT = [Reading.__table__.c[name] for name in READING_COLUMNS]


class ReadingStore(Database):
    """Append readings in batches, read back a time window, prune by age and count."""

    def __init__(self, url: str, retention_seconds: float = RETENTION_SECONDS, max_rows: int = MAX_ROWS) -> None:
        super().__init__(url, DASHBOARD)
        self.retention_seconds = retention_seconds
        self.max_rows = max_rows
        # The INSERT compiled once for this database's driver: at thousands of readings a second, SQLAlchemy's
        # per-row parameter processing was the emitter's largest cost (py-spy, docs/benchmarks.md).
        compiled = Reading.__table__.insert().compile(dialect=self.engine.dialect, column_keys=list(READING_COLUMNS))
        self._insert_sql = str(compiled)
        self._insert_row = (
            operator.attrgetter(*compiled.positiontup)
            if compiled.positional  # type: ignore[misc]
            else ReadingIn._asdict
        )

    def add_many(self, readings: Sequence[ReadingIn]) -> int:
        if not readings:
            return 0
        with self.engine.begin() as conn:
            conn.exec_driver_sql(self._insert_sql, [self._insert_row(r) for r in readings])
        return len(readings)

    def since(self, start: float, limit: int = 200_000) -> list[ReadingIn]:
        """Readings received at or after `start` (epoch seconds), oldest first."""
        query = (
            select(*_READING_SELECT)
            .where(Reading.received_at >= start)
            .order_by(Reading.received_at, Reading.id)
            .limit(limit)
        )
        with self._sessions.begin() as session:
            return [ReadingIn(*row) for row in session.execute(query)]

    def latest(self) -> dict[str, ReadingIn]:
        """The newest reading of every device, however old (a card shows its last value and time)."""
        newest = select(func.max(Reading.id)).group_by(Reading.device_id)
        query = select(*_READING_SELECT).where(Reading.id.in_(newest))
        with self._sessions.begin() as session:
            return {row[0]: ReadingIn(*row) for row in session.execute(query)}

    def count(self) -> int:
        with self._sessions.begin() as session:
            return int(session.scalar(select(func.count(Reading.id))) or 0)

    def prune(self, now: float | None = None) -> int:
        """Delete what is older than the retention, then the oldest rows above MAX_ROWS."""
        now = time.time() if now is None else now
        removed = 0
        with self._sessions.begin() as session:
            result = session.execute(delete(Reading).where(Reading.received_at < now - self.retention_seconds))
            removed += result.rowcount or 0
            cutoff = session.scalar(select(Reading.id).order_by(Reading.id.desc()).offset(self.max_rows).limit(1))
            if cutoff is not None:
                result = session.execute(delete(Reading).where(Reading.id <= cutoff))
                removed += result.rowcount or 0
        if removed:
            log.info("pruned %d old readings", removed)
        return removed

    def ping(self) -> tuple[bool, str | None]:
        """(ok, error) for /healthz: can we reach the database at all?"""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True, None
        except Exception as ex:  # any driver error means "not ok"; the message is enough for an operator
            return False, f"{type(ex).__name__}: {ex}"

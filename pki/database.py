"""The lab database (DATABASE_URL): an engine tuned for several writers, and one component's migrated tables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from . import migrate

# Execution option that marks the read-only engine: its transactions begin DEFERRED, not IMMEDIATE.
READ_ONLY_OPTION = "inventory_read_only"
# The PostgreSQL advisory lock key that serialises the inventory's write transactions (any constant of our own).
INVENTORY_WRITE_LOCK = 0x10CA1AB


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


class Database:
    """One component's tables in the lab database (DATABASE_URL), migrated on open: write transactions, and
    read-only ones that take no write lock."""

    def __init__(self, url: str, component: migrate.Component, *, serialize_writes: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, serialize_writes=serialize_writes)
        migrate.upgrade(self.engine, component)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_engine = self.engine.execution_options(**{READ_ONLY_OPTION: True})
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction: a consistent snapshot that takes no write lock."""
        with self._read_sessions.begin() as session:
            yield session

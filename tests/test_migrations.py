"""Schema migrations (pki/migrate.py): the migrated schema is exactly the models', on SQLite and PostgreSQL; a
database from before migrations (b2eaf49) is upgraded with every row kept; concurrent openers migrate once."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from ca.acme_store import ACME, AcmeBase, AcmeStore
from dashboard.accounts import UserStore
from dashboard.readings import ReadingStore
from dashboard.schema import DASHBOARD, DashboardBase
from pki import migrate
from pki.inventory import Base, Inventory

LEGACY_DUMP = Path(__file__).parent / "data" / "lab-db-b2eaf49.sql"

pytestmark = pytest.mark.databases


def schema_differences(url: str) -> list[object]:
    inventory, readings, users = Inventory(url), ReadingStore(url), UserStore(url)
    AcmeStore(inventory)
    try:
        with inventory.engine.connect() as connection:
            found = []
            for component, metadata in (
                (migrate.INVENTORY, Base.metadata),
                (DASHBOARD, DashboardBase.metadata),
                (ACME, AcmeBase.metadata),
            ):
                # Each component compares only its own tables: the other's share the database.
                def own(name: str | None, type_: str, _parent: object, tables: object = metadata.tables) -> bool:
                    return type_ != "table" or name in tables  # type: ignore[operator]

                context = MigrationContext.configure(
                    connection, opts={"version_table": component.version_table, "include_name": own}
                )
                found += compare_metadata(context, metadata)
            return found
    finally:
        inventory.close()
        readings.close()
        users.close()


def test_a_new_database_is_migrated_to_exactly_the_models(database_url: str) -> None:
    assert schema_differences(database_url) == []
    inventory = Inventory(database_url)
    try:
        with inventory.engine.connect() as connection:
            assert migrate.current(connection, migrate.INVENTORY) == migrate.INVENTORY.head()
            assert migrate.current(connection, DASHBOARD) == DASHBOARD.head()
    finally:
        inventory.close()


def test_a_database_from_before_migrations_keeps_every_row(tmp_path: Path) -> None:
    db = tmp_path / "lab.db"
    with sqlite3.connect(db) as con:
        con.executescript(LEGACY_DUMP.read_text())
        before = {
            t: con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()  # noqa: S608 - our table names
            for t in ("certificates", "create_requests", "enrolment_tokens", "readings")
        }
    assert len(before["certificates"]) == 7 and len(before["readings"]) == 5
    url = f"sqlite:///{db}"
    assert schema_differences(url) == []
    with sqlite3.connect(db) as con:
        after = {t: con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in before}  # noqa: S608
        versions = {
            t: con.execute(f"SELECT version_num FROM {t}").fetchall()  # noqa: S608
            for t in ("inventory_alembic_version", "dashboard_alembic_version")
        }
    assert after == before
    assert versions == {
        "inventory_alembic_version": [(migrate.INVENTORY.head(),)],
        "dashboard_alembic_version": [(DASHBOARD.head(),)],
    }
    # The CA reads the old rows as its own.
    inventory = Inventory(url)
    try:
        assert {r.name for r in inventory.list()} >= {"device001", "device002", "legacy01", "mosquitto"}
        assert inventory.current("device002") is None and inventory.latest("device002").status == "revoked"
    finally:
        inventory.close()


def test_processes_opening_a_new_database_at_once_migrate_it_once(database_url: str) -> None:
    def open_and_close(_: int) -> None:
        Inventory(database_url).close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(open_and_close, range(8)))
    inventory = Inventory(database_url)
    try:
        with inventory.engine.connect() as connection:
            table = migrate.INVENTORY.version_table
            rows = connection.execute(text(f"SELECT version_num FROM {table}")).all()  # noqa: S608 - ours
            assert rows == [(migrate.INVENTORY.head(),)]
            assert {"certificates", "enrolment_tokens"} <= set(inspect(connection).get_table_names())
    finally:
        inventory.close()


def test_the_migrate_command_reports_and_upgrades(database_url: str) -> None:
    assert migrate.main(["--url", database_url, "upgrade"]) == 0
    assert migrate.main(["--url", database_url, "current"]) == 0

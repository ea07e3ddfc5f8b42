"""Schema migrations with Alembic, for SQLite (the embedded default) and PostgreSQL alike.

Each component that owns tables in the shared database (the CA's inventory here, the dashboard's readings) has
its own Alembic script folder and its own version table, and brings its tables to the newest revision when it
opens the database: `upgrade(engine, component)`. Several processes may start at once (CA replicas, a
dashboard): on PostgreSQL the upgrade holds an advisory lock for its transaction, on SQLite the write lock
(`BEGIN IMMEDIATE`, pki/inventory.py), so exactly one runs each migration and the others find it done.

A database made before migrations existed (tables created directly, no version table) is stamped with the
baseline revision, which describes exactly those tables, then upgraded: every row is kept.

By hand: `python -m pki.migrate [--url URL] current|upgrade` (URL: DATABASE_URL from .env by default).
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.engine import Connection, Engine


@dataclass(frozen=True)
class Component:
    """A set of tables with its own migration history."""

    name: str
    script_location: Path
    baseline: str  # the revision that describes the tables as they were before migrations
    baseline_tables: frozenset[str]

    @property
    def version_table(self) -> str:
        return f"{self.name}_alembic_version"

    def config(self, connection: Connection | None = None) -> Config:
        config = Config()
        config.set_main_option("script_location", str(self.script_location))
        config.attributes["connection"] = connection
        config.attributes["version_table"] = self.version_table
        return config

    def head(self) -> str | None:
        return ScriptDirectory.from_config(self.config()).get_current_head()

    @classmethod
    def beside(cls, module_file: str, name: str, baseline_tables: Iterable[str], baseline: str = "0001") -> Component:
        """The component whose Alembic scripts are the `migrations` folder beside `module_file` (its `__file__`)."""
        return cls(name, Path(module_file).resolve().parent / "migrations", baseline, frozenset(baseline_tables))


INVENTORY = Component.beside(__file__, "inventory", {"certificates", "create_requests", "enrolment_tokens"})


def current(connection: Connection, component: Component) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": component.version_table})
    return context.get_current_revision()


def upgrade(engine: Engine, component: Component) -> None:
    """Bring `component`'s tables to the newest revision (a no-op when they are there already)."""
    head = component.head()
    with engine.connect() as connection:
        if current(connection, component) == head:
            return
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # One migrating process at a time; the lock ends with this transaction.
            lock_id = zlib.crc32(component.version_table.encode())
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})
        present = set(inspect(connection).get_table_names())
        config = component.config(connection)
        if component.version_table not in present and component.baseline_tables <= present:
            command.stamp(config, component.baseline)
        command.upgrade(config, "head")


def run_env(target_metadata: MetaData | None = None) -> None:
    """The body of every component's `env.py`: run its migrations on the connection `upgrade` passes in."""
    from alembic import context

    config = context.config
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through pki.migrate (python -m pki.migrate upgrade), not the alembic CLI")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=config.attributes["version_table"],
        render_as_batch=True,
    )
    context.run_migrations()


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError, Settings
    from .inventory import make_engine

    parser = argparse.ArgumentParser(prog="python -m pki.migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="database URL (default: DATABASE_URL from .env, or the SQLite file)")
    parser.add_argument("action", choices=("current", "upgrade"))
    args = parser.parse_args(argv)
    try:
        url = args.url or Settings.from_env().effective_database_url
    except ConfigError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    engine = make_engine(url)
    try:
        components = [INVENTORY, *_other_components()]
        for component in components:
            if args.action == "upgrade":
                upgrade(engine, component)
            with engine.connect() as connection:
                print(f"{component.name}: {current(connection, component) or 'none'} (newest {component.head()})")
    finally:
        engine.dispose()
    return 0


def _other_components() -> list[Component]:
    """Components outside pki that share the database, when they are installed (the dashboard's, ACME's)."""
    found = []
    try:
        from dashboard.schema import DASHBOARD

        found.append(DASHBOARD)
    except ImportError:
        pass
    try:
        from ca.acme_store import ACME

        found.append(ACME)
    except ImportError:
        pass
    return found


if __name__ == "__main__":
    sys.exit(main())

"""The dashboard's own tables in the lab's database (readings, accounts, API tokens), beside the CA's inventory:
their declarative base, and their migration history (dashboard/migrations, run by pki.migrate)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import DeclarativeBase

from pki import migrate


class DashboardBase(DeclarativeBase):
    pass


DASHBOARD = migrate.Component(
    name="dashboard",
    script_location=Path(__file__).resolve().parent / "migrations",
    baseline="0001",
    baseline_tables=frozenset({"readings"}),
)

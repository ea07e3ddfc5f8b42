"""The dashboard's own tables in the lab's database (readings, accounts, API tokens), beside the CA's inventory:
their declarative base, and their migration history (dashboard/migrations, run by pki.migrate)."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase

from pki import migrate


class DashboardBase(DeclarativeBase):
    pass


DASHBOARD = migrate.Component.beside(__file__, "dashboard", {"readings"})

"""Alembic environment of the dashboard's tables: readings, accounts, API tokens (pki/migrate.py runs it)."""

from dashboard import accounts, readings  # noqa: F401 - their models fill the metadata
from dashboard.schema import DashboardBase
from pki.migrate import run_env

run_env(DashboardBase.metadata)

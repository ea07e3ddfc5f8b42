"""Alembic environment of the dashboard's readings table (pki/migrate.py runs it)."""

from dashboard.readings import ReadingsBase
from pki.migrate import run_env

run_env(ReadingsBase.metadata)

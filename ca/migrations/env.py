"""Alembic environment of the ACME tables (pki/migrate.py runs it)."""

from ca.acme_store import AcmeBase
from pki.migrate import run_env

run_env(AcmeBase.metadata)

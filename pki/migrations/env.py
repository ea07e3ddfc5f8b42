"""Alembic environment of the CA's inventory tables (pki/migrate.py runs it)."""

from pki.inventory import Base
from pki.migrate import run_env

run_env(Base.metadata)

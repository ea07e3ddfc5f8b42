"""First start-up of several dashboards at once on a fresh database (compose profile `scale`: dashboard and
dashboard-2 on one PostgreSQL; SQLite, the native default, too): exactly one creates `admin`."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import Flask
from sqlalchemy import func, select

from dashboard import auth
from dashboard.accounts import ADMIN, OPERATOR, DashboardUser, UserStore

from .conftest import LabEnv

pytestmark = pytest.mark.databases

STARTS = 3


def test_dashboards_starting_at_once_create_one_admin(lab_env: LabEnv, caplog: pytest.LogCaptureFixture) -> None:
    # Each start-up its own DASHBOARD_ADMIN_PASSWORD, so a second stored password would show.
    passwords = [f"{lab_env.admin_password}-{i}" for i in range(STARTS)]
    barrier = threading.Barrier(STARTS)

    def start(password: str) -> str:
        app = Flask(__name__)
        app.extensions["lab_settings"] = lab_env.settings(DASHBOARD_ADMIN_PASSWORD=password)
        barrier.wait(timeout=60)
        auth.init_app(app)  # what create_app runs: opens (and migrates) the database, creates admin
        app.extensions["users"].close()
        return threading.current_thread().name

    caplog.set_level(logging.INFO, logger=auth.__name__)
    with ThreadPoolExecutor(STARTS) as pool:
        threads = list(pool.map(start, passwords))  # re-raises a start-up's exception

    store = UserStore(lab_env.settings().effective_database_url)
    try:
        with store.reading() as session:
            assert session.scalar(select(func.count()).select_from(DashboardUser)) == 1
        working = [i for i, password in enumerate(passwords) if store.authenticate(ADMIN, password)]
        assert len(working) == 1
        assert store.get(ADMIN).role == OPERATOR
    finally:
        store.close()
    # Only the start-up that created it says so, and no record carries a password.
    created = [r for r in caplog.records if "created the operator" in r.getMessage()]
    assert [r.threadName for r in created] == [threads[working[0]]]
    assert not any(password in r.getMessage() for r in caplog.records for password in passwords)

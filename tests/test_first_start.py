"""First start-up of several dashboards at once on a fresh database (compose profile `scale`: dashboard and
dashboard-2 on one PostgreSQL; SQLite, the native default, too): exactly one creates `admin`."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import Flask
from sqlalchemy import create_engine, func, select, text

from dashboard import auth
from dashboard.accounts import ADMIN, OPERATOR, DashboardUser, UserError, UserExists, UserStore
from pki.config import ConfigError

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


def test_another_constraint_refusing_the_admin_is_an_error_not_an_existing_admin(lab_env: LabEnv) -> None:
    url = lab_env.settings().effective_database_url
    store = UserStore(url)  # creates the tables
    engine = create_engine(url)
    try:
        with engine.begin() as connection:  # a constraint other than the unique name refuses every insert
            if engine.dialect.name == "sqlite":
                connection.execute(
                    text(
                        "CREATE TRIGGER refuse_users BEFORE INSERT ON dashboard_users "
                        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
                    )
                )
            else:
                connection.execute(text("ALTER TABLE dashboard_users ADD CONSTRAINT refuse_users CHECK (id < 0)"))
        with pytest.raises(UserError) as refused:
            store.add("alice", lab_env.admin_password, OPERATOR)
        assert not isinstance(refused.value, UserExists)
        assert "refused" in str(refused.value) and lab_env.admin_password not in str(refused.value)
        # At start-up: the dashboard stops, naming it, rather than start without an `admin`.
        with pytest.raises(ConfigError, match="refused"):
            store.ensure_admin(lab_env.admin_password)
        assert store.users() == []
    finally:
        engine.dispose()
        store.close()

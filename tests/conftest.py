"""Shared fixtures: an isolated lab environment per test, and a generated lab per session."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from pki.authority import load_certificate
from pki.config import Settings
from pki.generator import LabCertificates

from .pgserver import PostgresServer, PostgresUnavailable
from .support import Broker, ThermometerProcess, free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The compose tests' fixtures (a generated three-device lab, the configuration docker-compose resolves for it) live
# with their helpers; module-scoped, so each module that asks for them sets them up once, and no other does.
pytest_plugins = ["tests.compose_support"]


@dataclass
class LabEnv:
    """One isolated lab: its own certificates folder, data folder, database and passphrase."""

    root: Path
    env: dict[str, str]

    @property
    def certs_dir(self) -> Path:
        return Path(self.env["CERTS_DIR"])

    @property
    def data_dir(self) -> Path:
        return Path(self.env["DATA_DIR"])

    @property
    def root_cert(self) -> Path:
        return self.certs_dir / "root_ca" / "root_ca.crt"

    @property
    def broker_port(self) -> int:
        return int(self.env["BROKER_PORT"])

    @property
    def passphrase(self) -> str:
        return self.env["CA_PASSPHRASE"]

    @property
    def admin_password(self) -> str:
        """The `admin` operator's password (DASHBOARD_ADMIN_PASSWORD), as setup.sh writes it into .env."""
        return self.env["DASHBOARD_ADMIN_PASSWORD"]

    def settings(self, **overrides: str) -> Settings:
        return Settings.from_env({**self.env, **overrides})

    def lab(self, **overrides: str) -> LabCertificates:
        return LabCertificates(self.settings(**overrides))

    def snapshot(self) -> dict[str, tuple[bytes, int, int]]:
        """Every file under the lab root: bytes, mode and mtime, to prove nothing changed."""
        result = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file():
                st = path.stat()
                result[str(path.relative_to(self.root))] = (path.read_bytes(), st.st_mode, st.st_mtime_ns)
        return result


def make_lab_env(root: Path, database_url: str | None = None) -> LabEnv:
    env = {
        "CERTS_DIR": str(root / "certs"),
        "DATA_DIR": str(root / "data"),
        "DATABASE_URL": database_url or f"sqlite:///{root / 'data' / 'lab.db'}",
        "CA_PASSPHRASE": secrets.token_urlsafe(24),
        "DASHBOARD_ADMIN_PASSWORD": secrets.token_urlsafe(18),
        "DEVICES": "device001,device002",
        "LAB_ENV_FILE": str(root / "no.env"),
        "BROKER_PORT": str(free_port()),
    }
    return LabEnv(root, env)


def serial_of(lab: LabEnv, name: str) -> str:
    """The serial (hex) of the certificate `name` holds in the lab's certificates folder."""
    return format(load_certificate((lab.certs_dir / name / f"{name}.crt").read_bytes()).serial_number, "x")


@pytest.fixture(autouse=True)
def _isolated_from_developer_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A developer's .env or exported settings must never leak into a test."""
    for key in list(os.environ):
        if key in {
            "CA_PASSPHRASE",
            "DEVICES",
            "CERT_DAYS",
            "RENEW_BEFORE_DAYS",
            "KEY_TYPE",
            "BROKER_ADDRESS",
            "BROKER_PORT",
            "BROKER_SANS",
            "DASHBOARD_HOST",
            "DASHBOARD_PORT",
            "DATABASE_URL",
            "CERTS_DIR",
            "DATA_DIR",
            "PUBLISH_INTERVAL",
            "RENEW_CHECK_INTERVAL",
            "ENROL_DEVICES",
            "ENROL_TOKEN",
            "ENROL_TOKEN_FILE",
            "CA_URL",
            "DASHBOARD_ADMIN_PASSWORD",
            "DASHBOARD_TLS",
            "DASHBOARD_NAMES",
            "DASHBOARD_IDLE_TIMEOUT",
            "DASHBOARD_SECRET_KEY",
            "DASHBOARD_TOKEN",
            "SUPERSEDED_GRACE_SECONDS",
            "CERT_WATCH_SECONDS",
            "CA_HTTPS_HOST",
            "CA_HTTPS_PORT",
            "ACME_HTTP01_PORT",
            "ACME_ALLOWED_NAMES",
            "ENROL",
            "INGEST_REPLICAS",
            "INGEST_ID",
            "INGEST_EMBEDDED",
            "SOCKETIO_MESSAGE_QUEUE",
            "DASHBOARD_MQTT",
        }:
            monkeypatch.delenv(key)
    monkeypatch.setenv("LAB_ENV_FILE", str(tmp_path / "absent.env"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `databases` (the inventory, CA and readings tests) run on SQLite and on PostgreSQL."""
    if "database_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker("databases"):
        metafunc.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (tests/pgserver.py); skipped where none is installed, except
    under CI, where it must run."""
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as ex:
        if os.environ.get("CI"):
            pytest.fail(f"the PostgreSQL tests must run under CI, but: {ex}")
        pytest.skip(str(ex))
    yield server
    server.stop()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The lab's DATABASE_URL: its own SQLite file, or (parametrized `postgresql`) a new PostgreSQL database."""
    if getattr(request, "param", "sqlite") == "postgresql":
        return request.getfixturevalue("postgres").create_database()
    return f"sqlite:///{tmp_path / 'lab' / 'data' / 'lab.db'}"


@pytest.fixture
def lab_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str) -> LabEnv:
    """A fresh, empty lab whose settings are also exported to this process's environment."""
    lab = make_lab_env(tmp_path / "lab", database_url)
    lab.root.mkdir()
    for key, value in lab.env.items():
        monkeypatch.setenv(key, value)
    return lab


@pytest.fixture
def generated_lab(lab_env: LabEnv) -> LabEnv:
    """A lab whose certificates have been generated once."""
    lab_env.lab().generate()
    return lab_env


@pytest.fixture(scope="session")
def session_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    """One generated lab shared by read-only tests (integration tests use it with the broker)."""
    lab = make_lab_env(tmp_path_factory.mktemp("session-lab"))
    LabCertificates(lab.settings()).generate()
    yield lab


@pytest.fixture(scope="session")
def session_broker(session_lab: LabEnv) -> Iterator[Broker]:
    """A real Mosquitto with the session lab's generated config, shared by tests that do not change it."""
    broker = Broker(session_lab.certs_dir, session_lab.data_dir, session_lab.broker_port).start()
    yield broker
    broker.stop()


@pytest.fixture
def broker(generated_lab: LabEnv) -> Iterator[Broker]:
    """A real Mosquitto of its own, for tests that revoke, restart or reconfigure."""
    broker = Broker(generated_lab.certs_dir, generated_lab.data_dir, generated_lab.broker_port).start()
    yield broker
    broker.stop()


@pytest.fixture
def app(generated_lab: LabEnv) -> Iterator[Flask]:
    """The dashboard app with its CA (no MQTT) over a generated lab; test modules may override it."""
    from .ca_support import close_app, make_app

    app = make_app(generated_lab)
    yield app
    close_app(app)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A client without a session: the seed's scripts and devices (`pass` in the body, or an enrolment token)."""
    return app.test_client()


@pytest.fixture
def viewer_headers(app: Flask) -> dict[str, str]:
    """`Authorization: Bearer` with a viewer API token of this app: what a monitoring script sends."""
    from .ca_support import api_token

    return bearer(api_token(app, "viewer"))


@pytest.fixture
def operator_headers(app: Flask) -> dict[str, str]:
    from .ca_support import api_token

    return bearer(api_token(app, "operator"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def start_thermometer() -> Iterator[Callable[..., ThermometerProcess]]:
    """Start thermometer subprocesses; every one is gone after the test, whatever happened."""
    started: list[ThermometerProcess] = []

    def start(env: dict[str, str], *args: str) -> ThermometerProcess:
        process = ThermometerProcess(env, *args).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()

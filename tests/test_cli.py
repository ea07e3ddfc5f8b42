"""`iotca`, the console script setup.sh installs, as a subprocess against a live lab (broker and dashboard)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from lab.testing import DashboardProcess

from .conftest import LabEnv
from .support import Broker

pytestmark = pytest.mark.integration

IOTCA = Path(sys.executable).parent / "iotca"


@pytest.fixture
def live(broker: Broker, generated_lab: LabEnv, tmp_path: Path) -> Iterator[dict[str, str]]:
    if not IOTCA.exists():
        pytest.fail(f"{IOTCA} is missing: ./setup.sh installs the lab into the venv (pip install --no-deps -e .)")
    dashboard = DashboardProcess(generated_lab.env, tmp_path / "dashboard.log").start()
    env = {**os.environ, **generated_lab.env, "IOTCA_URL": dashboard.url.rstrip("/")}
    try:
        # An operator's API token, made with the CLI itself (printed once, last line).
        made = iotca(env, "users", "token", "cli-tests", "--role", "operator")
        assert made.returncode == 0, made.stdout + made.stderr
        yield {**env, "IOTCA_TOKEN": made.stdout.strip().splitlines()[-1]}
    finally:
        dashboard.stop()


def iotca(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(IOTCA), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def ok_json(env: dict[str, str], *args: str, cwd: Path | None = None) -> Any:
    result = iotca(env, "--json", *args, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def verify(root: Path, crt: Path, purpose: str = "sslclient") -> None:
    result = subprocess.run(
        ["openssl", "verify", "-purpose", purpose, "-CAfile", str(root), str(crt)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_subcommand_against_a_live_lab(live: dict[str, str], generated_lab: LabEnv, tmp_path: Path) -> None:
    root = generated_lab.certs_dir / "root_ca" / "root_ca.crt"
    listed = ok_json(live, "certs")["certificates"]
    assert {"device001", "device002", "mosquitto"} <= {c["name"] for c in listed}
    table = iotca(live, "certs", "--name", "device001")
    assert table.returncode == 0 and "NAME" in table.stdout and "device001" in table.stdout

    created = ok_json(live, "create", "cli01", "--org", "Lab", "--days", "30", "--out", str(tmp_path / "cli01"))
    crt, key = tmp_path / "cli01" / "cli01.crt", tmp_path / "cli01" / "cli01.key"
    assert sorted(created["files"]) == sorted([str(crt), str(key)]) and "key" not in created
    assert key.stat().st_mode & 0o777 == 0o600
    verify(root, crt)

    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=cli02",
            "-keyout",
            str(tmp_path / "cli02.key"),
            "-out",
            str(tmp_path / "cli02.csr"),
        ],
        check=True,
        capture_output=True,
    )
    signed = ok_json(live, "sign", "cli02", "--csr", str(tmp_path / "cli02.csr"), "--out", str(tmp_path))
    assert signed["files"] == [str(tmp_path / "cli02.crt")]
    verify(root, tmp_path / "cli02.crt")

    before = ok_json(live, "certs", "--name", "device001", "--status", "active")["certificates"][0]["serial"]
    renewed = ok_json(live, "renew", "device001", "--out", str(tmp_path / "renewed"))
    assert renewed["serial"] != before and renewed["name"] == "device001"

    token = ok_json(live, "token", "cli03", "--ttl", "600")
    assert token["name"] == "cli03" and len(token["token"]) >= 32

    revoked = ok_json(live, "revoke", "cli01", "--reason", "keyCompromise")
    assert revoked["revoked"] == [created["serial"]]
    crl_file = tmp_path / "crl.der"
    result = iotca(live, "crl", "--der", "--out", str(crl_file))
    assert result.returncode == 0, result.stderr
    crl = x509.load_der_x509_crl(crl_file.read_bytes())
    assert int(created["serial"], 16) in {entry.serial_number for entry in crl}

    status = ok_json(live, "status")
    assert status["healthy"] is True and status["certificates"]["revoked"] >= 1

    users = iotca(live, "users", "add", "cli-viewer", "--role", "viewer")
    assert users.returncode == 0, users.stderr
    listed_users = iotca(live, "users", "list")
    assert listed_users.returncode == 0 and "cli-viewer" in listed_users.stdout


def test_without_a_token_the_inventory_is_refused_with_the_next_step(live: dict[str, str]) -> None:
    anonymous = {k: v for k, v in live.items() if k != "IOTCA_TOKEN"}
    result = iotca(anonymous, "certs")
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "401" in line and "--token" in line


def test_errors_are_one_line_with_the_next_step(live: dict[str, str]) -> None:
    unknown = iotca(live, "renew", "nobody-here")
    assert unknown.returncode == 1 and unknown.stdout == ""
    (line,) = unknown.stderr.strip().splitlines()
    assert line.startswith("iotca: error: ") and "404" in line and "iotca certs" in line

    anonymous = {k: v for k, v in live.items() if k != "IOTCA_TOKEN"}  # an operator's token needs no passphrase
    wrong = iotca({**anonymous, "CA_PASSPHRASE": "not-the-passphrase"}, "revoke", "device002")
    (line,) = wrong.stderr.strip().splitlines()
    assert wrong.returncode == 1 and "403" in line and "CA_PASSPHRASE" in line

    down = iotca({**live, "IOTCA_URL": "http://127.0.0.1:9"}, "status")
    (line,) = down.stderr.strip().splitlines()
    assert down.returncode == 1 and "cannot reach the CA" in line and "./setup.sh" in line

    usage = iotca(live, "revoke")
    assert usage.returncode == 1 and "NAME or --serial" in usage.stderr


def test_the_project_builds_a_wheel_with_the_console_script(tmp_path: Path) -> None:
    """`pip wheel .` works: the runtime dependencies are declared, `iotca` is a console script, and the data the
    packages need (migrations, templates, static files) is inside."""
    from zipfile import ZipFile

    from .conftest import PROJECT_ROOT

    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(PROJECT_ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("iot_ca_lab-*.whl")
    with ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
    assert "iotca = lab.cli:main" in entry_points
    requirements = [line.split("#")[0].strip() for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines()]
    for requirement in filter(None, requirements):
        assert f"Requires-Dist: {requirement}" in metadata, requirement
    assert {
        "pki/migrations/versions/0001_baseline.py",
        "dashboard/templates/index.html",
        "dashboard/static/app.js",
    } <= names
    assert not any(n.startswith("tests/") for n in names)

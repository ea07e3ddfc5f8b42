"""setup.sh as a bootstrap: its help names exactly the commands lab.control runs; .env is written by Python;
without a Docker engine it runs the whole lab natively, with one it builds, generates in the image, then starts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from dotenv import dotenv_values

from dashboard.accounts import UserStore
from lab import control
from lab.testing import processes
from pki.config import PROJECT_ROOT

from .compose_support import compose_binary
from .conftest import make_lab_env
from .support import free_port, wait_for

SETUP = PROJECT_ROOT / "setup.sh"


def test_help_lists_exactly_the_commands_handed_over() -> None:
    result = subprocess.run([str(SETUP), "--help"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0 and result.stdout.startswith("Usage: ./setup.sh")
    listed = set(re.findall(r"^  ([a-z-]+)", result.stdout, re.MULTILINE)) - {"help"}
    assert "(no command)" in result.stdout
    assert listed == set(control.COMMANDS) - {"", "lock-file"}
    # ... and setup.sh hands over each of them (none is left to bash but the bootstrap)
    dispatched = re.search(r'"" \| ([a-z |]+)\) ensure_venv runtime', SETUP.read_text())
    assert dispatched is not None
    assert set(dispatched.group(1).split(" | ")) | {"test", "lock"} == listed


def test_usage_errors_exit_2() -> None:
    unknown = subprocess.run([str(SETUP), "frobnicate"], capture_output=True, text=True, timeout=10)
    assert unknown.returncode == 2 and "unknown command: frobnicate" in unknown.stderr
    assert control.main(["down", "now"]) == 2


def test_setup_sh_keeps_no_env_parser_and_no_step_messages() -> None:
    text = SETUP.read_text()
    assert "$ENV_FILE" not in text and "grep" not in text and "env_value" not in text, "lab.control reads .env"
    for path in (SETUP, *sorted((PROJECT_ROOT / "lab").glob("*.py"))):
        assert not re.search(r"Step [0-9]", path.read_text()), path


def test_env_file_is_created_once_with_random_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CA_PASSPHRASE", raising=False)
    monkeypatch.delenv("DASHBOARD_ADMIN_PASSWORD", raising=False)
    env_file = tmp_path / "lab.env"
    monkeypatch.setenv("LAB_ENV_FILE", str(env_file))
    control.ensure_env_file()
    assert env_file.stat().st_mode & 0o777 == 0o600
    first = dotenv_values(env_file)
    assert len(first["CA_PASSPHRASE"] or "") >= 40 and len(first["DASHBOARD_ADMIN_PASSWORD"] or "") >= 20
    assert first["DEVICES"] == "device001,device002", "the rest comes from .env.example"
    printed = capsys.readouterr()
    assert first["CA_PASSPHRASE"] not in printed.out + printed.err
    assert first["DASHBOARD_ADMIN_PASSWORD"] not in printed.out + printed.err
    control.ensure_env_file()
    assert dotenv_values(env_file) == first
    assert len(re.findall("^DASHBOARD_ADMIN_PASSWORD=", env_file.read_text(), re.MULTILINE)) == 1


def test_existing_values_are_kept_whatever_their_quoting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.dockerlab import ensure_lab_ids

    for key in ("CA_PASSPHRASE", "DASHBOARD_ADMIN_PASSWORD", "LAB_UID", "LAB_GID"):
        monkeypatch.delenv(key, raising=False)
    env_file = tmp_path / "lab.env"
    env_file.write_text(
        "CA_PASSPHRASE='kept # not a comment'\nexport DASHBOARD_ADMIN_PASSWORD=\"mine\"\n"
        "LAB_UID = 4242  # an inline comment\n"
    )
    env_file.chmod(0o600)
    monkeypatch.setenv("LAB_ENV_FILE", str(env_file))
    control.ensure_env_file()
    ensure_lab_ids()
    values = dotenv_values(env_file)
    assert values["CA_PASSPHRASE"] == "kept # not a comment" and values["DASHBOARD_ADMIN_PASSWORD"] == "mine"
    assert values["LAB_UID"] == "4242" and values["LAB_GID"] == str(os.getgid()), "only the missing one is added"
    assert control.setting("CA_PASSPHRASE") == "kept # not a comment"


# -- setup.sh ----------------------------------------------------------------------------------------


def test_setup_sh_parses() -> None:
    assert subprocess.run(["bash", "-n", str(PROJECT_ROOT / "setup.sh")], timeout=10).returncode == 0


def lab_processes(marker: str) -> list[int]:
    """Processes whose environment carries this test's marker (children inherit it)."""
    return processes(lambda proc: marker.encode() in (proc / "environ").read_bytes())


@pytest.mark.integration
def test_setup_without_a_docker_engine_runs_the_whole_lab_natively(tmp_path: Path) -> None:
    if not (PROJECT_ROOT / ".venv" / "bin" / "python").exists():
        pytest.fail("setup.sh needs the project's .venv: run ./setup.sh test, which creates it")
    lab = make_lab_env(tmp_path / "lab")
    marker = f"SETUP_TEST_MARKER={os.getpid()}-{time.monotonic_ns()}"
    dashboard_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")},
        **lab.env,
        "LAB_ENV_FILE": str(tmp_path / "lab.env"),
        "DASHBOARD_PORT": str(dashboard_port),
        "PUBLISH_INTERVAL": "0.2",
        # Whatever this machine has: no engine answers here.
        "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock",
        marker.split("=")[0]: marker.split("=")[1],
    }
    log_path = tmp_path / "setup.log"
    with open(log_path, "wb") as out:
        setup = subprocess.Popen(
            [str(PROJECT_ROOT / "setup.sh")],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    headers: dict[str, str] = {}

    def get(path: str) -> Any:
        assert setup.poll() is None, f"setup.sh exited with {setup.returncode}:\n{log_path.read_text()}"
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{dashboard_port}{path}", headers=headers)
            with opener.open(request, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    try:
        wait_for(lambda: get("/healthz"), timeout=120, interval=0.5, what=f"the dashboard\n{log_path.read_text()}")
        assert get("/api/data") is None, "the dashboard's data needs a login"
        # what `python -m dashboard.users token` does: a viewer API token in the lab's database
        store = UserStore(lab.settings().effective_database_url)
        try:
            headers["Authorization"] = f"Bearer {store.create_token('setup-test', 'viewer')[1]}"
        finally:
            store.close()
        # The first line after the bootstrap's own steps (`==> ...`, when the venv needs work) says the mode.
        first_line = next(line for line in log_path.read_text().splitlines() if not line.startswith(("==> ", "    ")))
        assert first_line.startswith("No Docker engine answers (") and "running the lab natively" in first_line
        assert (tmp_path / "lab.env").exists(), "setup.sh writes the settings file it was given"
        setup_log = log_path.read_text()
        assert "Log in as admin with DASHBOARD_ADMIN_PASSWORD" in setup_log
        written = re.findall(r"^DASHBOARD_ADMIN_PASSWORD=(.+)$", (tmp_path / "lab.env").read_text(), re.MULTILINE)
        assert len(written) == 1 and written[0] not in setup_log, "added once, never printed"

        def readings_from_both() -> bool:
            data = get("/api/data") or {}
            devices = data.get("device_data", {})
            return all(devices.get(d, {}).get("temperature") is not None for d in ("device001", "device002"))

        wait_for(readings_from_both, timeout=60, interval=0.5, what=f"readings\n{log_path.read_text()}")
        assert lab_processes(marker), "the lab's processes carry the marker"

        os.killpg(setup.pid, signal.SIGINT)
        assert setup.wait(timeout=60) == 0, log_path.read_text()
        wait_for(lambda: not lab_processes(marker), timeout=15, what="every lab process to exit")
    finally:
        if setup.poll() is None:
            os.killpg(setup.pid, signal.SIGKILL)
            setup.wait()
        for pid in lab_processes(marker):
            os.kill(pid, signal.SIGKILL)


FAKE_DOCKER = """#!/bin/sh
# Stands in for the Docker CLI: `docker info` answers, the compose plugin is missing.
[ "$1" = info ] && exit 0
echo "docker: '$1' is not a docker command." >&2
exit 1
"""

FAKE_COMPOSE = """#!/bin/sh
# Stands in for docker-compose without an engine: records each call; `config` is the real one.
printf 'LAB_CERTS_DIR=%s %s\\n' "$LAB_CERTS_DIR" "$*" >>"$FAKE_COMPOSE_LOG"
for arg in "$@"; do
    case $arg in
        config) exec "$REAL_COMPOSE" "$@" ;;
        up) exit "${FAKE_UP_STATUS:-0}" ;;
    esac
done
exit 0
"""

# What setup.sh needs from the repository to run Docker mode in a copy of its own.
SETUP_FILES = (
    "setup.sh",
    "docker-compose.yml",
    ".env.example",
    "requirements.txt",
    "requirements-dev.txt",
    "requirements-postgres.txt",
    "requirements.lock",
    "requirements-postgres.lock",
    "requirements-dev.lock",
    "pyproject.toml",
    "generate_ca_and_device_certs.py",
    "pki",
    "lab",
    "ca",
    "mosquitto",
    "postgres",
    "deploy",
)


@pytest.mark.integration
def test_setup_docker_mode_builds_generates_in_the_image_then_starts(tmp_path: Path) -> None:
    """setup.sh's Docker path against a stand-in engine: the order of steps, the settings it writes, the fixes."""
    venv = PROJECT_ROOT / ".venv"
    if not (venv / "bin" / "python").exists():
        pytest.fail("setup.sh needs the project's .venv: run ./setup.sh test, which creates it")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in SETUP_FILES:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, repo / name)
    (repo / ".venv").symlink_to(venv)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("docker", FAKE_DOCKER), ("docker-compose", FAKE_COMPOSE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "compose.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "LAB_"))},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "REAL_COMPOSE": compose_binary(),
        "FAKE_COMPOSE_LOG": str(calls),
        "CA_PASSPHRASE": "a-passphrase-for-this-test",
        "DEVICES": "device001,device003",
        "CERTS_DIR": "lab-certs",
        "DASHBOARD_PORT": str(free_port()),
        "SETUP_HEALTH_WAIT": "1",
    }

    def setup(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(repo / "setup.sh"), *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )

    first = setup()
    mode = next(line for line in first.stdout.splitlines() if not line.startswith(("==> ", "    ")))
    assert mode.startswith("Docker engine found"), first.stdout
    # Nothing answers on the dashboard port: the health wait fails and says where to look.
    assert first.returncode == 1
    assert "did not become healthy" in first.stderr and "docker-compose logs --tail 50" in first.stderr
    settings = (repo / ".env").read_text()
    assert f"LAB_UID={os.getuid()}\n" in settings and f"LAB_GID={os.getgid()}\n" in settings
    (admin_password,) = re.findall(r"^DASHBOARD_ADMIN_PASSWORD=(\S{20,})$", settings, re.MULTILINE)
    assert admin_password not in first.stdout + first.stderr, "the password is written, never printed"
    certs = repo / "lab-certs"
    assert certs.is_dir() and (certs.stat().st_mode & 0o777) == 0o700, "created by setup.sh, not by Docker as root"

    steps = [line.split(" ", 1) for line in calls.read_text().splitlines()]
    assert {prefix for prefix, _ in steps} == {f"LAB_CERTS_DIR={certs}"}
    commands = [command.replace("--env-file .env ", "") for _, command in steps]
    assert all(command != full for command, (_, full) in zip(commands, steps, strict=True)), "--env-file .env"
    order = [
        next((c for c in commands if c.startswith(prefix)), None)
        for prefix in (
            "rm --stop --force device002_thermometer",
            "build",
            "run --rm --no-deps -T ca python generate_ca_and_device_certs.py",
            "up --build -d --remove-orphans",
            "ps",
        )
    ]
    assert None not in order, commands
    assert [commands.index(c) for c in order] == sorted(commands.index(c) for c in order)

    override = repo / "docker-compose.override.yml"
    assert "device003_thermometer:" in override.read_text()
    real = subprocess.run(
        [compose_binary(), "config", "-q"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LAB_CERTS_DIR": str(certs)},
    )
    assert real.returncode == 0, real.stderr

    again = setup("docker", FAKE_UP_STATUS="1")
    assert again.returncode == 1
    assert "BROKER_PORT or DASHBOARD_PORT" in again.stderr, again.stderr
    assert (repo / ".env").read_text().count("LAB_UID=") == 1, "re-running adds nothing twice"
    assert re.findall(r"^DASHBOARD_ADMIN_PASSWORD=(.*)$", (repo / ".env").read_text(), re.MULTILINE) == [
        admin_password
    ], "the admin password is added once and never replaced"

"""setup.sh as a bootstrap: its help names exactly the commands lab.control runs; .env is written by Python."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from dotenv import dotenv_values

from lab import control
from pki.config import PROJECT_ROOT

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

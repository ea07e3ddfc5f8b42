"""What the compose tests share: the real docker-compose run on this repository's files, the resolved
services read back (environment, mounts), the Dockerfiles' instructions, and a generated three-device lab.

This machine has no engine, so the files must be right by construction: the real `docker-compose` (installed by
./setup.sh test) validates and resolves docker-compose.yml and the override lab/compose.py generates, and the
tests hold what it resolves against what the code reads and what the generator writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from lab import compose as lab_compose
from pki.generator import LabCertificates

from .conftest import PROJECT_ROOT, LabEnv, make_lab_env

BASE_FILE = PROJECT_ROOT / "docker-compose.yml"
LAB_UID, LAB_GID = "4321", "8765"


# -- compose -------------------------------------------------------------------------------------


def compose_binary() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed: ./setup.sh test installs it (apt-get install docker-compose)")
    return binary


@dataclass
class ComposeRun:
    """A compose invocation on this repository's files, with a settings file of the test's own."""

    env_file: Path
    certs_dir: Path
    overrides: tuple[Path, ...] = ()

    def args(self) -> list[str]:
        files = [arg for path in (BASE_FILE, *self.overrides) for arg in ("-f", str(path))]
        return [compose_binary(), "--env-file", str(self.env_file), *files]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        # Only what compose needs: the developer's exported settings must not leak in.
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LAB_CERTS_DIR": str(self.certs_dir)}
        return subprocess.run(
            [*self.args(), *args], env=env, capture_output=True, text=True, timeout=60, cwd=self.env_file.parent
        )

    def config(self) -> dict[str, Any]:
        result = self.run("config")
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)


def write_env_file(path: Path, lab: LabEnv, **values: str) -> Path:
    settings = {
        "CA_PASSPHRASE": lab.passphrase,
        "DASHBOARD_ADMIN_PASSWORD": lab.admin_password,
        "LAB_UID": LAB_UID,
        "LAB_GID": LAB_GID,
        "PUBLISH_INTERVAL": "0.2",
        **values,
    }
    path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    return path


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool
    bind: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume["target"]
            read_only = bool(volume.get("read_only"))
        else:
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        result.append(Mount(source, target, read_only, source.startswith("/")))
    return result


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """Where a path inside the container comes from on the host (None: not from a bind mount)."""
    path = PurePosixPath(container_path)
    best: Mount | None = None
    for mount in mounts(service):
        target = PurePosixPath(mount.target)
        if (path == target or target in path.parents) and (best is None or len(mount.target) > len(best.target)):
            best = mount
    if best is None or not best.bind:
        return None
    return Path(best.source) / path.relative_to(best.target)


@pytest.fixture(scope="module")
def compose_lab(tmp_path_factory: pytest.TempPathFactory) -> LabEnv:
    """A generated lab with three devices: the seed's two and one the override adds."""
    lab = make_lab_env(tmp_path_factory.mktemp("compose-lab"))
    lab.env["DEVICES"] = "device001,device002,device003"
    lab.env["PUBLISH_INTERVAL"] = "0.2"
    LabCertificates(lab.settings()).generate()
    return lab


@pytest.fixture(scope="module")
def three_devices(compose_lab: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> ComposeRun:
    """docker-compose.yml plus the override generated for DEVICES=device001,device002,device003."""
    folder = tmp_path_factory.mktemp("compose-three")
    override = folder / "docker-compose.override.yml"
    assert lab_compose.write_override(["device001", "device002", "device003"], override)
    return ComposeRun(write_env_file(folder / "env", compose_lab), compose_lab.certs_dir, (override,))


@pytest.fixture(scope="module")
def resolved(three_devices: ComposeRun) -> dict[str, Any]:
    return three_devices.config()


@pytest.fixture(scope="module")
def services(resolved: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return resolved["services"]


# -- Dockerfiles -----------------------------------------------------------------------------------


def dockerfile_lines(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]


def dockerfile_instruction(path: Path, name: str) -> list[str]:
    """The last CMD/ENTRYPOINT, which must be exec form (a JSON array)."""
    (args,) = [args for instruction, args in dockerfile_lines(path) if instruction == name][-1:]
    value = json.loads(args)
    assert isinstance(value, list), f"{path.name}: {name} must be exec form"
    return value

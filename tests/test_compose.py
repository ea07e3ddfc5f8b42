"""Docker mode without a Docker engine: the compose files, the images' commands and setup.sh.

This machine has no engine, so the files must be right by construction. The tests make that checkable:
the real `docker-compose` (installed by ./setup.sh test) validates and resolves docker-compose.yml and the
override lab/compose.py generates; every path, variable, port and healthcheck the services use is then
held against what the code reads and what the generator writes; and the commands the images run (the
broker's entrypoint, gunicorn, thermometer.py) run here as real processes with the compose settings.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from cryptography import x509

from dashboard.accounts import UserStore
from lab import compose as lab_compose
from lab.testing import child_pids, processes
from pki.authority import subject_alt_names
from pki.broker import (
    DOCKER_DYNSEC_PLUGIN,
    DYNSEC_INITIAL,
    DYNSEC_TOPIC,
    BrokerFiles,
    disconnect_command,
    find_mosquitto,
    render_acl,
    render_config,
)
from pki.config import Settings
from pki.generator import LabCertificates, lab_entities
from pki.profiles import BROKER
from pki.store import CERT_MODE, atomic_write

from .conftest import PROJECT_ROOT, LabEnv, make_lab_env
from .support import Broker, Collector, ThermometerProcess, free_port, wait_for

BASE_FILE = PROJECT_ROOT / "docker-compose.yml"
ENTRYPOINT = PROJECT_ROOT / "mosquitto" / "entrypoint.sh"
DOCKERFILES = {
    # Dockerfile: its build context
    PROJECT_ROOT / "dashboard" / "Dockerfile": PROJECT_ROOT,
    PROJECT_ROOT / "Dockerfile_thermometer": PROJECT_ROOT,
    PROJECT_ROOT / "mosquitto" / "Dockerfile": PROJECT_ROOT / "mosquitto",
    PROJECT_ROOT / "postgres" / "Dockerfile": PROJECT_ROOT / "postgres",
    PROJECT_ROOT / "deploy" / "nginx" / "Dockerfile": PROJECT_ROOT / "deploy" / "nginx",
    PROJECT_ROOT / "deploy" / "redis" / "Dockerfile": PROJECT_ROOT / "deploy" / "redis",
}
SEED_SERVICES = {"mosquitto", "ca", "dashboard", "device001_thermometer", "device002_thermometer"}
SCALE_SERVICES = {"postgres", "redis", "dashboard-2", "nginx"}  # profile `scale`
OPTIONAL_SERVICES = SCALE_SERVICES  # profiles `postgres` (postgres only) and `scale`
IMAGE_USER_SERVICES = {"postgres", "redis"}  # run as their image's own user, owner of nothing of the lab's
LAB_UID, LAB_GID = "4321", "8765"
CONTAINER_BIND = "0.0.0.0"  # noqa: S104 - inside a container, published on 127.0.0.1 only


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


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each published port."""
    result = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            result.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
        else:
            ip, host, container = port.split("/")[0].rsplit(":", 2)
            result.append((ip, int(host), int(container)))
    return result


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


def test_compose_files_are_valid_for_the_real_compose(
    compose_lab: LabEnv, three_devices: ComposeRun, tmp_path: Path
) -> None:
    base = ComposeRun(write_env_file(tmp_path / "env", compose_lab), compose_lab.certs_dir)
    for run in (base, three_devices):
        result = run.run("config", "-q")
        assert result.returncode == 0, result.stderr
    assert set(base.config()["services"]) == SEED_SERVICES | OPTIONAL_SERVICES
    assert set(three_devices.config()["services"]) == SEED_SERVICES | OPTIONAL_SERVICES | {"device003_thermometer"}
    assert base.config()["services"]["postgres"]["profiles"] == ["postgres", "scale"]
    for name in SCALE_SERVICES - {"postgres"}:
        assert base.config()["services"][name]["profiles"] == ["scale"], name


def test_a_missing_passphrase_fails_with_the_fix(compose_lab: LabEnv, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("LAB_UID=1000\n")
    result = ComposeRun(env_file, compose_lab.certs_dir).run("config", "-q")
    assert result.returncode != 0
    assert "CA_PASSPHRASE is not set; run ./setup.sh" in result.stderr


def test_services_wait_for_a_healthy_broker_restart_and_run_as_the_lab_user(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        for mount in mounts(service):
            assert "docker.sock" not in mount.source, f"{name} must not get the Docker socket"
        assert service["read_only"] is True and "ALL" in service["cap_drop"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name
        if name in IMAGE_USER_SERVICES:
            assert "user" not in service, name
            continue
        assert service["user"] == f"{LAB_UID}:{LAB_GID}", name
        healthy = {"condition": "service_healthy"}
        if name == "dashboard":  # the CA first: the dashboard forwards /v1/ssl/* to it
            assert service["depends_on"] == {"mosquitto": healthy, "ca": healthy}, name
        elif name == "dashboard-2":
            assert service["depends_on"] == {"dashboard": healthy, "redis": healthy}, name
        elif name == "nginx":
            assert service["depends_on"] == {"dashboard": healthy, "dashboard-2": healthy}, name
        elif name != "mosquitto":
            assert service["depends_on"] == {"mosquitto": {"condition": "service_healthy"}}, name
    for name in ("mosquitto", "ca", "dashboard", *sorted(SCALE_SERVICES)):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    for name in ("ca", "postgres", "redis", "dashboard-2"):
        assert not services[name].get("ports"), f"{name} is not published"
    # Redis is on the internal network `bus`, with the dashboards only.
    assert sorted(n for n, s in services.items() if "bus" in (s.get("networks") or {})) == [
        "dashboard",
        "dashboard-2",
        "redis",
    ]
    assert list(services["redis"]["networks"]) == ["bus"]
    # Only the CA service mounts certs/root_ca (the CA key); nginx only the dashboard's own folder.
    assert [Path(m.source).name for m in mounts(services["nginx"])] == ["dashboard"]


def test_ports_are_published_on_localhost_and_match_the_settings(
    services: dict[str, dict[str, Any]], compose_lab: LabEnv, tmp_path: Path
) -> None:
    defaults = Settings()
    docker_conf = BrokerFiles(compose_lab.certs_dir, compose_lab.data_dir).docker_conf.read_text()
    listener_port = int(re.search(r"^listener (\d+) ", docker_conf, re.M).group(1))
    assert published(services["mosquitto"]) == [("127.0.0.1", defaults.broker_port, listener_port)]
    gunicorn = dockerfile_instruction(PROJECT_ROOT / "dashboard" / "Dockerfile", "CMD")
    bind = gunicorn[gunicorn.index("--bind") + 1]
    assert published(services["dashboard"]) == [("127.0.0.1", defaults.dashboard_port, int(bind.rsplit(":", 1)[1]))]
    assert environment(services["dashboard"])["DASHBOARD_PORT"] == bind.rsplit(":", 1)[1]
    for name, service in services.items():
        if name.endswith("_thermometer"):
            assert "ports" not in service, name
    # nginx (profile scale) on NGINX_PORT, loopback too; its config listens where the port is published.
    assert published(services["nginx"]) == [("127.0.0.1", 5443, 8443)]
    assert "listen 8443 ssl;" in (PROJECT_ROOT / "deploy" / "nginx" / "nginx.docker.conf").read_text()
    # .env drives the published ports, as it drives the native lab's.
    env_file = write_env_file(tmp_path / "env", compose_lab, BROKER_PORT="18883", DASHBOARD_PORT="15000")
    moved = ComposeRun(env_file, compose_lab.certs_dir).config()["services"]
    assert published(moved["mosquitto"]) == [("127.0.0.1", 18883, listener_port)]
    assert published(moved["dashboard"]) == [("127.0.0.1", 15000, int(bind.rsplit(":", 1)[1]))]


def names_read_by(*entries: str) -> set[str]:
    """Upper-case string literals in the sources an image contains: the environment names the code reads."""
    names: set[str] = set()
    for entry in entries:
        path = PROJECT_ROOT / entry
        for source in [path] if path.is_file() else sorted(path.rglob("*.py")):
            names |= set(re.findall(r"""["']([A-Z][A-Z0-9_]{2,})["']""", source.read_text()))
    return names


def test_every_environment_variable_is_one_the_code_reads(services: dict[str, dict[str, Any]]) -> None:
    dashboard_reads = names_read_by("pki", "lab", "ca", "dashboard", "generate_ca_and_device_certs.py")
    thermometer_reads = names_read_by("pki", "lab", "thermometer.py")
    assert set(environment(services["dashboard"])) <= dashboard_reads
    assert set(environment(services["dashboard-2"])) <= dashboard_reads
    assert environment(services["dashboard-2"]) == {
        **environment(services["dashboard"]),
        "INGEST_ID": "ingest-2",
        "DASHBOARD_MQTT": "0",
    }
    assert not environment(services["nginx"]) and not environment(services["redis"])
    assert set(environment(services["ca"])) <= dashboard_reads
    assert "CA_PASSPHRASE" not in environment(services["dashboard"]), "only the CA service knows the passphrase"
    assert not environment(services["mosquitto"])
    for name, service in services.items():
        if name.endswith("_thermometer"):
            env = environment(service)
            assert set(env) <= thermometer_reads, name
            assert {
                "DEVICE_ID",
                "CA_CERT_PATH",
                "CLIENT_CERT_PATH",
                "CLIENT_KEY_PATH",
                "BROKER_ADDRESS",
                "BROKER_PORT",
            } <= set(env), name
            assert env["DEVICE_ID"] == name.removesuffix("_thermometer")
            assert "CA_PASSPHRASE" not in env, "only the CA may know the passphrase"


def test_the_dashboard_environment_is_valid_settings_for_the_container(
    resolved: dict[str, Any], services: dict[str, dict[str, Any]], compose_lab: LabEnv
) -> None:
    env = environment(services["dashboard"])
    settings = Settings.from_env(env)
    assert settings.ca_passphrase is None
    assert settings.dashboard_host == CONTAINER_BIND
    assert settings.certs_dir == Path("/certs") and host_path(services["dashboard"], "/certs") == compose_lab.certs_dir
    assert settings.data_dir == Path("/data")
    assert settings.effective_database_url == "sqlite:////data/lab.db"
    (data,) = [m for m in mounts(services["dashboard"]) if m.target == "/data"]
    assert not data.bind and data.source in resolved["volumes"], "the database lives in a named volume"
    # The CA service: the passphrase, the same certificates folder, database and data volume (the shared secret).
    ca = Settings.from_env(environment(services["ca"]))
    assert ca.ca_passphrase == compose_lab.passphrase
    assert (ca.certs_dir, ca.data_dir, ca.effective_database_url) == (
        settings.certs_dir,
        settings.data_dir,
        settings.effective_database_url,
    )
    assert host_path(services["ca"], "/certs") == compose_lab.certs_dir
    assert [m.source for m in mounts(services["ca"]) if m.target == "/data"] == [data.source]
    (broker_data,) = [m for m in mounts(services["mosquitto"]) if not m.bind]
    assert broker_data.source in resolved["volumes"] and broker_data.source != data.source


def test_containers_reach_the_broker_by_a_name_in_its_certificate(
    services: dict[str, dict[str, Any]], compose_lab: LabEnv
) -> None:
    cert = x509.load_pem_x509_certificate((compose_lab.certs_dir / "mosquitto" / "mosquitto.crt").read_bytes())
    dns_names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    for name, service in services.items():
        env = environment(service)
        if "BROKER_ADDRESS" in env:
            assert env["BROKER_ADDRESS"] in dns_names, name
            assert env["BROKER_ADDRESS"] == "mosquitto" and env["BROKER_PORT"] == "8883", name


def test_the_broker_certificate_gets_the_same_names_in_both_modes(compose_lab: LabEnv, tmp_path: Path) -> None:
    """The generator runs in the dashboard image in Docker mode: BROKER_ADDRESS must stay in the SANs."""
    host = {"BROKER_ADDRESS": "broker.lan", "BROKER_SANS": "10.1.2.3,mqtt.example.org"}
    env_file = write_env_file(tmp_path / "env", compose_lab, **host)
    container = environment(ComposeRun(env_file, compose_lab.certs_dir).config()["services"]["dashboard"])

    def sans(env: dict[str, str]) -> set[str]:
        broker = next(e for e in lab_entities(Settings.from_env(env)) if e.name == "mosquitto")
        return {str(n.value) for n in subject_alt_names(BROKER, broker.name, broker.dns_names, broker.ip_addresses)}

    assert sans(container) == sans(host)
    assert {"broker.lan", "mqtt.example.org", "mosquitto", "localhost"} <= sans(container)


def test_every_mount_is_a_folder_the_generator_writes(services: dict[str, dict[str, Any]], compose_lab: LabEnv) -> None:
    certs = compose_lab.certs_dir
    ca_key = certs / "root_ca" / "root_ca.key"
    for name, service in services.items():
        for mount in mounts(service):
            if mount.bind:
                assert Path(mount.source).is_dir(), f"{name}: {mount.source} is not generated"
                assert Path(mount.source) == certs or certs in Path(mount.source).parents, name
            if name != "ca":
                assert mount.read_only or not mount.bind, f"{name} must mount its certificates read-only"
    for name, service in services.items():  # only the CA service sees the CA key (resolved through the mounts)
        if name != "ca":
            assert host_path(service, "/certs/root_ca/root_ca.key") != ca_key, f"{name} must not see the CA key"
            assert all(not (m.bind and Path(m.source) == certs / "root_ca") for m in mounts(service)), name
    assert host_path(services["ca"], "/certs/root_ca/root_ca.key") == ca_key
    for device in ("device001", "device002", "device003"):
        service = services[lab_compose.service_name(device)]
        assert [Path(m.source) for m in mounts(service)] == [certs / device], "each device mounts only its folder"
        env = environment(service)
        for key in ("CA_CERT_PATH", "CLIENT_CERT_PATH", "CLIENT_KEY_PATH"):
            path = host_path(service, env[key])
            assert path is not None and path.is_file(), f"{device} {key}={env[key]} is not a generated file"
    assert {Path(m.source) for m in mounts(services["mosquitto"]) if m.bind} == {certs / "mosquitto", certs / "policy"}


def test_the_broker_runs_the_docker_config_the_generator_renders(
    services: dict[str, dict[str, Any]], compose_lab: LabEnv
) -> None:
    broker = services["mosquitto"]
    files = BrokerFiles(compose_lab.certs_dir, compose_lab.data_dir)
    (config_path,) = broker["command"]
    assert host_path(broker, config_path) == files.docker_conf
    text = files.docker_conf.read_text()
    assert text == render_config(files, port=8883, bind_address=CONTAINER_BIND, docker=True)
    data = next(m.target for m in mounts(broker) if not m.bind)
    for key in ("cafile", "certfile", "keyfile", "acl_file", "crlfile"):
        value = re.search(rf"^{key} (\S+)$", text, re.M).group(1)
        path = host_path(broker, value)
        assert path is not None and path.is_file(), f"{key} {value} does not reach a generated file"
    for key in ("pid_file", "persistence_location"):
        value = re.search(rf"^{key} (\S+)$", text, re.M).group(1)
        path = PurePosixPath(value)
        assert path == PurePosixPath(data) or PurePosixPath(data) in path.parents, f"{key} {value} is not in the volume"
    # the dynamic-security plugin (revocation closes connections): the image links it there, its state is in the volume
    assert re.search(rf"^plugin {re.escape(DOCKER_DYNSEC_PLUGIN)}$", text, re.M)
    assert DOCKER_DYNSEC_PLUGIN in (PROJECT_ROOT / "mosquitto" / "Dockerfile").read_text()
    state = PurePosixPath(re.search(r"^plugin_opt_config_file (\S+)$", text, re.M).group(1))
    assert PurePosixPath(data) in state.parents
    healthcheck = broker["healthcheck"]["test"]
    assert healthcheck[1:4] == ["/bin/sh", "/usr/local/bin/lab-mosquitto", "health"]
    assert healthcheck[4] == config_path
    assert dockerfile_instruction(PROJECT_ROOT / "mosquitto" / "Dockerfile", "ENTRYPOINT") == healthcheck[1:3]


def test_the_override_defines_a_device_exactly_like_the_seed_ones(services: dict[str, dict[str, Any]]) -> None:
    def as_device001(service: dict[str, Any], device: str) -> str:
        return json.dumps(service, sort_keys=True).replace(device, "device001")

    seed = json.dumps(services["device001_thermometer"], sort_keys=True)
    assert as_device001(services["device002_thermometer"], "device002") == seed
    assert as_device001(services["device003_thermometer"], "device003") == seed


def test_a_seed_device_left_out_of_devices_is_switched_off(compose_lab: LabEnv, tmp_path: Path) -> None:
    override = tmp_path / "docker-compose.override.yml"
    assert lab_compose.write_override(["device001", "device003"], override)
    run = ComposeRun(write_env_file(tmp_path / "env", compose_lab), compose_lab.certs_dir, (override,))
    assert run.run("config", "-q").returncode == 0
    services = run.config()["services"]
    assert services["device002_thermometer"]["profiles"] == [lab_compose.DISABLED_PROFILE]
    assert "profiles" not in services["device003_thermometer"]
    assert lab_compose.disabled_services(["device001", "device003"]) == ["device002_thermometer"]


def test_the_override_is_written_only_when_needed_and_never_over_a_users_file(tmp_path: Path) -> None:
    override = tmp_path / "docker-compose.override.yml"
    assert lab_compose.write_override(["device001", "device002", "device003"], override)
    assert lab_compose.write_override(["device001", "device002"], override) is False
    assert not override.exists(), "a stale generated override is removed"
    override.write_text("services: {}\n")
    with pytest.raises(lab_compose.ComposeError, match="not generated by lab.compose"):
        lab_compose.write_override(["device001", "device003"], override)
    assert override.read_text() == "services: {}\n"
    with pytest.raises(lab_compose.ComposeError, match="lower-case"):
        lab_compose.render_override(["device001", "Device003"])
    out = subprocess.run(
        [sys.executable, "-m", "lab.compose", "--devices", "device001,bad/id", "--output", str(tmp_path / "x.yml")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "bad/id" in out.stderr and not (tmp_path / "x.yml").exists()


# -- Dockerfiles and .dockerignore -----------------------------------------------------------------


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


def dockerignore_patterns() -> list[str]:
    lines = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our patterns: a match on the path or any parent folder; the last match wins."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        forms = [body] + ([body[3:], "*/" * 8 + body[3:]] if body.startswith("**/") else [])
        for candidate in candidates:
            depth_free = [f for f in forms if f.count("/") <= candidate.count("/")]
            if any(fnmatch.fnmatchcase(candidate, f) for f in depth_free) or (
                body.startswith("**/") and fnmatch.fnmatchcase(candidate.rsplit("/", 1)[-1], body[3:])
            ):
                result = not negate
    return result


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context() -> None:
    patterns = dockerignore_patterns()
    assert not [p for p in patterns if p.startswith("!")], "no exceptions: nothing excluded may come back"
    for path in (
        ".env",
        ".env.local",
        "certs/root_ca/root_ca.key",
        "certs/device001/device001.crt",
        ".venv/bin/python",
        "data/lab.db",
        "tests/test_pki.py",
        "test-output/x.png",
        ".git/config",
        "pki/stray.key",
        "dashboard/leftover.pem",
        "docker-compose.override.yml",
        "pki/__pycache__/x.pyc",
    ):
        assert ignored(path, patterns), f"{path} would be sent to the Docker build"
    for path in (
        "pki/authority.py",
        "lab/mqtt.py",
        "requirements.txt",
        "thermometer.py",
        "dashboard/templates/index.html",
        "mosquitto/acl.template",
    ):
        assert not ignored(path, patterns), f"{path} is needed in the images"


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES), ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_dockerfiles_are_pinned_slim_non_root_and_copy_only_what_exists(dockerfile: Path) -> None:
    context = DOCKERFILES[dockerfile]
    lines = dockerfile_lines(dockerfile)
    (image,) = [args.split()[0] for instruction, args in lines if instruction == "FROM"]
    exact = r"(python:3\.11\.\d+-slim-bookworm|debian:bookworm-\d{8}-slim)(@sha256:[0-9a-f]{64})?"
    assert re.fullmatch(exact, image), f"{image}: a slim base pinned to an exact tag"
    users = [args.strip() for instruction, args in lines if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    copies = [args.split() for instruction, args in lines if instruction in ("COPY", "ADD")]
    # Every image copies something in, but Redis: Debian's package and its command line are the whole image.
    assert (copies or dockerfile.parent.name == "redis") and all(instruction != "ADD" for instruction, _ in lines)
    patterns = dockerignore_patterns() if context == PROJECT_ROOT else []
    for words in copies:
        # `${PIP_CERT}` is an optional build arg (empty by default); the real builds in test_docker_lab.py use it.
        sources = [w for w in words[:-1] if not w.startswith(("--", "${"))]
        for source in sources:
            matches = list(context.glob(source.rstrip("/")))
            assert matches, f"{dockerfile.name}: COPY {source} does not exist in {context}"
            for match in matches:
                assert not ignored(str(match.relative_to(context)), patterns), f"{source} is in .dockerignore"
    runs = " ".join(args for instruction, args in lines if instruction == "RUN")
    if "pip install" in runs:
        assert "--no-cache-dir" in runs
    for tool in ("gcc", "build-essential", "make ", "git "):
        assert tool not in runs, f"{dockerfile.name} installs {tool.strip()}"
    if "apt-get install" in runs:
        assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    assert dockerfile_instruction(dockerfile, "ENTRYPOINT" if "ENTRYPOINT" in dict(lines) else "CMD")


def test_the_nginx_image_config_is_the_rendered_template() -> None:
    """deploy/nginx/nginx.docker.conf is what `python -m lab.scale docker-conf` writes from the one template."""
    from lab.scale import NGINX_DOCKER_CONF, render_docker_nginx_conf

    assert NGINX_DOCKER_CONF.read_text() == render_docker_nginx_conf(), "run: python -m lab.scale docker-conf"
    nginx = PROJECT_ROOT / "deploy" / "nginx" / "Dockerfile"
    copies = [args.split()[0] for instruction, args in dockerfile_lines(nginx) if instruction == "COPY"]
    assert copies == [NGINX_DOCKER_CONF.name]


def test_the_broker_image_runs_the_same_mosquitto_as_the_native_lab() -> None:
    runs = " ".join(
        args
        for instruction, args in dockerfile_lines(PROJECT_ROOT / "mosquitto" / "Dockerfile")
        if instruction == "RUN"
    )
    pinned = re.search(r"'mosquitto=([0-9.]+)-\*'", runs).group(1)
    binary = find_mosquitto()
    assert binary is not None, "mosquitto is not installed: ./setup.sh test installs it"
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10).stdout
    assert re.search(r"mosquitto version (\S+)", out).group(1) == pinned


def test_the_images_run_the_lab_entry_points() -> None:
    thermometer = dockerfile_instruction(PROJECT_ROOT / "Dockerfile_thermometer", "CMD")
    assert thermometer == ["python", "thermometer.py"]
    gunicorn = dockerfile_instruction(PROJECT_ROOT / "dashboard" / "Dockerfile", "CMD")
    assert gunicorn[0] == "gunicorn" and gunicorn[-1] == "dashboard:create_app()"
    assert gunicorn[gunicorn.index("--workers") + 1] == "1", "one worker: the MQTT bridge lives in the process"
    assert "--reload" not in gunicorn


# -- the images' commands, run here -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_broker(compose_lab: LabEnv) -> Iterator[Broker]:
    broker = Broker(compose_lab.certs_dir, compose_lab.data_dir, compose_lab.broker_port).start()
    yield broker
    broker.stop()


def container_env(service: dict[str, Any], lab: LabEnv, **changes: str) -> dict[str, str]:
    """The service's environment with its container paths mapped to where the mounts come from on this host."""
    env = environment(service)
    for key, value in env.items():
        if value.startswith("/"):
            mapped = host_path(service, value)
            env[key] = str(mapped) if mapped is not None else str(lab.root / value.lstrip("/"))
    # Outside Docker there is no `mosquitto` host name; the broker certificate also names localhost.
    env.update(
        BROKER_ADDRESS="localhost", BROKER_PORT=str(lab.broker_port), LAB_ENV_FILE=str(lab.root / "no.env"), **changes
    )
    return env


@pytest.mark.integration
def test_a_device_container_command_publishes_with_the_override_settings(
    services: dict[str, dict[str, Any]], compose_lab: LabEnv, compose_broker: Broker
) -> None:
    env = container_env(services["device003_thermometer"], compose_lab)
    assert env["CLIENT_KEY_PATH"] == str(compose_lab.certs_dir / "device003" / "device003.key")
    watcher = Collector(compose_lab.certs_dir, "dashboard", compose_lab.broker_port).connect()
    device = ThermometerProcess(env)
    try:
        watcher.subscribe("iot/thermometer/device003/temperature")
        device.start()
        reading = json.loads(watcher.expect("iot/thermometer/device003/temperature", timeout=20).payload)
        assert reading["device_id"] == "device003"
        assert device.terminate() == 0
    finally:
        device.stop()
        watcher.close()


@pytest.mark.integration
def test_the_dashboard_container_command_serves_the_healthcheck(
    services: dict[str, dict[str, Any]], compose_lab: LabEnv, compose_broker: Broker
) -> None:
    port = free_port()
    command = dockerfile_instruction(PROJECT_ROOT / "dashboard" / "Dockerfile", "CMD")
    command = [sys.executable, "-m", "gunicorn", *command[1:]]
    command[command.index("--bind") + 1] = f"127.0.0.1:{port}"
    service = services["dashboard"]
    env = {**os.environ, **container_env(service, compose_lab, DATABASE_URL=f"sqlite:///{compose_lab.root}/dash.db")}
    healthcheck = [
        sys.executable if word == "python" else word.replace(":5000/", f":{port}/")
        for word in service["healthcheck"]["test"][1:]
    ]
    log = compose_lab.root / "gunicorn.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        def healthy() -> bool:
            assert server.poll() is None, log.read_text()
            # in the container's environment (CERTS_DIR says where the root certificate is)
            return subprocess.run(healthcheck, capture_output=True, timeout=10, env=env).returncode == 0

        wait_for(healthy, timeout=60, interval=0.5, what=f"the dashboard healthcheck\n{log.read_text()}")
        # 0.0.0.0 in the container: HTTPS only, with the dashboard certificate, verified against the lab's root
        context = ssl.create_default_context(cafile=str(compose_lab.certs_dir / "root_ca" / "root_ca.crt"))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )

        def connected() -> bool:
            with opener.open(f"https://127.0.0.1:{port}/healthz", timeout=5) as response:
                return json.loads(response.read())["mqtt"]["connected"]

        wait_for(connected, timeout=20, interval=0.3, what="the dashboard's MQTT connection")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(timeout=20) == 0, log.read_text()
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()


# -- the broker's entrypoint ---------------------------------------------------------------------------


@pytest.mark.integration
def test_the_broker_entrypoint_reloads_on_revocation_and_stops_on_sigterm(generated_lab: LabEnv) -> None:
    files = BrokerFiles(generated_lab.certs_dir, generated_lab.data_dir)
    port = generated_lab.broker_port
    log_path = generated_lab.root / "entrypoint.log"
    env = {**os.environ, "POLL_SECONDS": "0.2", "TMPDIR": str(generated_lab.root)}
    health = ["sh", str(ENTRYPOINT), "health", str(files.conf)]
    files.dynsec_file.unlink()  # a new data volume: the entrypoint writes the plugin's state file
    with open(log_path, "wb") as out:
        entry = subprocess.Popen(
            ["sh", str(ENTRYPOINT), str(files.conf)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    watcher = device = ca = None
    try:
        wait_for(
            lambda: subprocess.run(health, capture_output=True, timeout=10).returncode == 0,
            timeout=15,
            what=f"the healthcheck\n{log_path.read_text()}",
        )
        (broker_pid,) = [c for c in child_pids(entry.pid) if b"mosquitto" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert json.loads(files.dynsec_file.read_text()) == json.loads(DYNSEC_INITIAL)
        watcher = Collector(generated_lab.certs_dir, "dashboard", port).connect()
        watcher.subscribe("iot/thermometer/#")
        ca = Collector(generated_lab.certs_dir, "ca-1", port).connect()
        device = Collector(generated_lab.certs_dir, "device001", port).connect()
        device.publish("iot/thermometer/device001/temperature", "20.5")
        watcher.expect("iot/thermometer/device001/temperature")

        # What the CA does when it revokes: the ACL (and CRL) replaced by rename. Nobody signals the broker.
        atomic_write(files.acl, render_acl(["device001"]).encode(), CERT_MODE)
        wait_for(lambda: "Reloading config" in log_path.read_text(), timeout=10, what="Mosquitto reloading")
        device.publish("iot/thermometer/device001/temperature", "21.5")
        assert watcher.nothing("iot/thermometer/device001/temperature", within=1.5), "the revoked device still writes"
        # ...and the CA has the plugin close its connection (ca/revocation.py)
        ca.publish(DYNSEC_TOPIC, disconnect_command("device001"))
        wait_for(device.disconnected.is_set, timeout=2, what="the broker to close device001's connection")

        entry.send_signal(signal.SIGTERM)
        assert entry.wait(timeout=15) == 0, log_path.read_text()
        assert not Path(f"/proc/{broker_pid}").exists(), "Mosquitto outlived its entrypoint"
        assert "terminating" in log_path.read_text()
        assert subprocess.run(health, capture_output=True, timeout=10).returncode == 1
    finally:
        for client in (device, watcher, ca):
            if client is not None:
                client.close()
        if entry.poll() is None:
            entry.kill()
            entry.wait()
        for pid in child_pids(entry.pid):
            os.kill(pid, signal.SIGKILL)


def test_the_broker_entrypoint_names_the_fix_when_it_cannot_read_its_config(tmp_path: Path) -> None:
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), str(tmp_path / "missing.conf")], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 1
    assert "LAB_UID/LAB_GID" in result.stderr and "./setup.sh" in result.stderr


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

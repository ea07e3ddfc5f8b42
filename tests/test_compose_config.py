"""Docker mode without a Docker engine: the configuration the real docker-compose resolves.

docker-compose.yml plus the override lab/compose.py generates, resolved by the real `docker-compose`; every
service, variable, mount, port and healthcheck held against what the code reads and what the generator writes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from cryptography import x509

from lab import compose as lab_compose
from pki.authority import subject_alt_names
from pki.broker import DOCKER_DYNSEC_PLUGIN, BrokerFiles, render_config
from pki.config import Settings
from pki.generator import lab_entities
from pki.profiles import BROKER

from .compose_support import (
    LAB_GID,
    LAB_UID,
    ComposeRun,
    dockerfile_instruction,
    environment,
    host_path,
    mounts,
    write_env_file,
)
from .conftest import PROJECT_ROOT, LabEnv

SEED_SERVICES = {"mosquitto", "ca", "dashboard", "device001_thermometer", "device002_thermometer"}
SCALE_SERVICES = {"postgres", "redis", "dashboard-2", "nginx"}  # profile `scale`
OPTIONAL_SERVICES = SCALE_SERVICES  # profiles `postgres` (postgres only) and `scale`
IMAGE_USER_SERVICES = {"postgres", "redis"}  # run as their image's own user, owner of nothing of the lab's
CONTAINER_BIND = "0.0.0.0"  # noqa: S104 - inside a container, published on 127.0.0.1 only


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
            assert service["depends_on"] == {"mosquitto": healthy, "ca": healthy, "redis": healthy}, name
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

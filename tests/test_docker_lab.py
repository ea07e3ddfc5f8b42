"""The Docker Compose lab, for real: `./setup.sh docker` in a real Docker Engine, then what a user checks.

The lab runs from a copy of this checkout in a temporary folder (its own `.env` with free ports, its own
certificates), as compose project `iotcalabtest`, so nothing of the checkout or of another lab is touched. The
engine is the one that answers, or a private dockerd (tests/dockerhost.py). The tests run in file order on one
lab: each step builds on the one before, as a user's session would. Every part's duration is printed and written
to `test-output/docker-lab-timings.json`.

Where no engine can run (not root, no kernel support) the tests are skipped with the reason; under CI (`CI` set)
they fail instead, so a green CI means the lab ran.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .docker_support import PROJECT, DockerLab, ca_requests_served, started_lab, unavailable
from .dockerhost import Engine, EngineUnavailable
from .support import free_port, s_client, wait_for
from .test_identity import assert_intermediate_tls_only

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    for tool in ("docker-compose", "mosquitto_pub", "openssl"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (./setup.sh test installs it)")
    try:
        found = Engine.find_or_start()
    except EngineUnavailable as ex:
        unavailable(str(ex))
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture(scope="module")
def lab(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerLab]:
    with started_lab(engine, tmp_path_factory, PROJECT) as started:
        yield started


def test_every_service_is_up_and_healthy(lab: DockerLab) -> None:
    def all_healthy() -> dict[str, str] | None:
        states = {}
        for service, container in lab.containers().items():
            state = container["State"]
            states[service] = state.get("Health", {}).get("Status") or state["Status"]
        return states if states and all(s in ("healthy", "running") for s in states.values()) else None

    with lab.timed("checks"):
        states = wait_for(all_healthy, timeout=90, interval=1, what=f"healthy containers:\n{lab.compose_logs()}")
    assert set(states) == {"mosquitto", "ca", "dashboard", "device001_thermometer", "device002_thermometer"}
    assert states["mosquitto"] == states["ca"] == states["dashboard"] == "healthy"
    # Published on loopback only, as the native lab binds; the CA service not at all (the dashboard forwards).
    for service in ("mosquitto", "dashboard"):
        bindings = lab.containers()[service]["HostConfig"]["PortBindings"]
        assert {b["HostIp"] for ports in bindings.values() for b in ports} == {"127.0.0.1"}, (service, bindings)
    assert not lab.containers()["ca"]["HostConfig"]["PortBindings"]
    # Only the CA service has the CA key and the passphrase: the dashboard's /certs/root_ca is its own folder.
    probe = (
        "import os; print(os.path.exists('/certs/root_ca/root_ca.key'), 'CA_PASSPHRASE' in os.environ, "
        "os.path.exists('/certs/root_ca/root_ca.crt'))"
    )
    for service, expected in (("ca", "True True True"), ("dashboard", "False False True")):
        seen = lab.compose("exec", "-T", service, "python", "-c", probe)
        assert seen.stdout.strip() == expected, (service, seen.stdout, seen.stderr)


def test_the_broker_and_the_dashboard_containers_offer_only_intermediate_tls(lab: DockerLab) -> None:
    """gunicorn in the dashboard image and Mosquitto in its own: TLS 1.3, and on TLS 1.2 ECDHE + AEAD only."""
    with lab.timed("checks"):
        for port in (lab.dashboard_port, lab.broker_port):
            assert_intermediate_tls_only(port, lab.root / "certs")


def test_readings_of_both_thermometer_containers_reach_the_dashboard(lab: DockerLab) -> None:
    with lab.timed("checks"):
        lab.wait_readings_of_both_devices(timeout=60)


def test_create_returns_a_certificate_that_verifies_against_the_root(lab: DockerLab, tmp_path: Path) -> None:
    with lab.timed("checks"):
        status, body = lab.post_json(
            "/v1/ssl/create", {"name": "dockertest", "days": 30, "pass": lab.passphrase, "cn": "dockertest"}
        )
        assert status == 201, body
        (tmp_path / "leaf.crt").write_text(body["crt"])
        verify = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(lab.root / "certs" / "root_ca" / "root_ca.crt"),
                str(tmp_path / "leaf.crt"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert verify.returncode == 0 and ": OK" in verify.stdout, verify.stdout + verify.stderr
        assert body["ca"] == (lab.root / "certs" / "root_ca" / "root_ca.crt").read_text()


def test_setup_status_lists_the_containers(lab: DockerLab) -> None:
    with lab.timed("checks"):
        result = lab.setup("status", check=False)
    for service in ("mosquitto", "dashboard", "device001_thermometer", "device002_thermometer"):
        assert re.search(rf"{PROJECT}_{service}_1\s.*Up", result.stdout), (service, result.stdout)


def test_down_and_up_again_keeps_certificates_and_readings(lab: DockerLab) -> None:
    before = lab.certificate_bytes()
    assert {"root_ca/root_ca.crt", "device001/device001.key", "mosquitto/mosquitto.crt"} <= set(before)
    history_before = {d: len(v["history"]) for d, v in lab.get_json("/api/data")["device_data"].items()}
    stopped_at = time.time()
    with lab.timed("down"):
        down = lab.setup("down")
    assert "Stopping the Docker lab" in down.stdout
    assert lab.containers() == {}
    with lab.timed("up again (./setup.sh docker)"):
        lab.setup("docker")
    assert lab.certificate_bytes() == before
    with lab.timed("checks"):
        data = lab.get_json("/api/data")["device_data"]
    for device in ("device001", "device002"):
        assert history_before[device] > 0
        older = [second for second, _mean in data[device]["history"] if second <= stopped_at]
        assert older, f"{device}: no reading from before `down` in the dashboard"


def test_revoking_device001_shuts_it_out_of_the_broker_container(lab: DockerLab) -> None:
    containers = lab.containers()
    broker_id, device_id = containers["mosquitto"]["Id"], containers["device001_thermometer"]["Id"]
    with lab.timed("checks"):
        # A valid certificate from the CA gets in: the broker container is reachable with mutual TLS.
        accepted = lab.mosquitto_pub("dockertest")
        assert accepted.returncode == 0, accepted.stderr
        status, body = lab.post_json("/v1/ssl/revoke", {"name": "device001", "pass": lab.passphrase})
        assert status == 200, body
        revoked_at = time.monotonic()

        # Within 2 s the broker closed the live connection and the dashboard shows device001 revoked and offline.
        def closed_and_shown() -> bool:
            device = lab.get_json("/api/data")["device_data"]["device001"]
            logged = lab.engine.docker("logs", broker_id).stderr + lab.engine.docker("logs", broker_id).stdout
            return (device.get("status"), device.get("certificate")) == (
                "offline",
                "revoked",
            ) and "device001 been disconnected by administrative action" in logged

        wait_for(
            closed_and_shown,
            timeout=max(0.1, revoked_at + 2 - time.monotonic()),
            interval=0.1,
            what="the broker container to close device001's connection and the dashboard to show it revoked",
        )
        # The thermometer says so once and waits for a new certificate (ON_REVOKED=wait): no restart loop.
        wait_for(
            lambda: (
                "the CA revoked its certificate"
                in lab.engine.docker("logs", device_id).stderr + lab.engine.docker("logs", device_id).stdout
            ),
            timeout=15,
            interval=0.5,
            what="device001's container to log its revocation",
        )

        # New connections with its certificate are refused, within 5 s of the reply.
        refusal = wait_for(
            lambda: (r := lab.mosquitto_pub("device001")).returncode != 0 and r,
            timeout=5,
            interval=0.25,
            what="the broker container refusing device001",
        )
        print(
            f"docker lab: device001 refused {time.monotonic() - revoked_at:.2f} s after the revoke reply: "
            f"{refusal.stderr.strip()}"
        )
        # Refused because it is revoked: the broker's TLS alert says so (its log says only "verify failed").
        handshake = s_client(lab.broker_port, lab.root / "certs", "-tls1_2")
        assert "certificate revoked" in handshake.stdout + handshake.stderr, handshake.stderr[-2000:]
        # Its readings stop; device002's go on.
        stopped = lab.readings()
        time.sleep(4)
        later = lab.readings()
        state = lab.containers()["device001_thermometer"]
    assert later["device001"] == stopped["device001"], (stopped, later)
    assert later["device002"] > stopped["device002"], (stopped, later)
    assert (state["RestartCount"], state["State"]["Status"]) == (0, "running"), "restarted in a loop"
    logs = lab.engine.docker("logs", device_id)
    assert (logs.stdout + logs.stderr).count("the CA revoked its certificate") == 1
    assert lab.mosquitto_pub("dockertest").returncode == 0


def test_a_third_device_comes_up_through_the_generated_override(lab: DockerLab) -> None:
    env_file = lab.root / ".env"
    env_file.write_text(
        env_file.read_text().replace("DEVICES=device001,device002", "DEVICES=device001,device002,device003")
    )
    with lab.timed("up with device003"):
        lab.setup("docker")
    override = (lab.root / "docker-compose.override.yml").read_text()
    assert "device003_thermometer:" in override
    with lab.timed("checks"):
        wait_for(
            lambda: lab.readings().get("device003", 0) > 1,
            timeout=60,
            interval=1,
            what=f"readings from device003:\n{lab.compose_logs()}",
        )
    assert lab.containers()["device003_thermometer"]["State"]["Status"] == "running"


# The compose profile `scale` (README, Docker mode): postgres, redis, two CA replicas, two dashboards, nginx. One
# bring-up, after the default lab's tests (which it stops first: two labs at once would share two cores).
SCALE_PROJECT = "iotcalabscale"
SCALE_SERVICES = {
    "mosquitto",
    "postgres",
    "redis",
    "ca",
    "dashboard",
    "dashboard-2",
    "nginx",
    "device001_thermometer",
    "device002_thermometer",
}


@pytest.fixture(scope="module")
def scale_lab(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerLab]:
    # The default lab's containers stop first (its fixture's teardown removes them at the end of the module).
    running = engine.docker("ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()
    if running:
        engine.docker("stop", "-t", "5", *running)
    password = secrets.token_urlsafe(18)
    nginx_port = free_port()
    settings = (
        f"COMPOSE_PROFILES=scale\nCA_REPLICAS=2\nNGINX_PORT={nginx_port}\n"
        "SOCKETIO_MESSAGE_QUEUE=redis://redis:6379/0\n"
        f"POSTGRES_PASSWORD={password}\nDATABASE_URL=postgresql+psycopg://lab:{password}@postgres:5432/lab\n"
    )
    with started_lab(engine, tmp_path_factory, SCALE_PROJECT, settings, web_port=nginx_port) as started:
        yield started


def test_scale_profile_every_service_is_healthy_and_only_the_ca_has_the_key(scale_lab: DockerLab) -> None:
    def all_healthy() -> list[dict[str, Any]] | None:
        found = scale_lab.container_list()
        healthy = [
            c
            for c in found
            if c["State"].get("Health", {}).get("Status", c["State"]["Status"]) in ("healthy", "running")
        ]
        return found if found and len(healthy) == len(found) else None

    with scale_lab.timed("checks"):
        found = wait_for(all_healthy, timeout=120, interval=1, what=f"healthy containers:\n{scale_lab.compose_logs()}")
    services = sorted(c["Config"]["Labels"]["com.docker.compose.service"] for c in found)
    assert set(services) == SCALE_SERVICES and services.count("ca") == 2, services
    for container in found:
        service = container["Config"]["Labels"]["com.docker.compose.service"]
        if not service.endswith("_thermometer"):
            assert container["State"]["Health"]["Status"] == "healthy", service
        assert container["HostConfig"]["ReadonlyRootfs"] and "ALL" in container["HostConfig"]["CapDrop"], service
        bound = {b["HostIp"] for ports in (container["HostConfig"]["PortBindings"] or {}).values() for b in ports}
        assert bound <= {"127.0.0.1"}, (service, bound)
        if service in ("nginx", "mosquitto", "dashboard"):
            assert bound == {"127.0.0.1"}, service
        else:
            assert not bound, f"{service} is not published"
        # Only the CA replicas see the CA key: nginx mounts the dashboard's folder, redis and postgres nothing of it.
        sources = [m["Source"] for m in container["Mounts"] if m["Type"] == "bind"]
        if service == "ca":
            assert str(scale_lab.root / "certs") in sources
        elif service == "nginx":
            assert sources == [str(scale_lab.root / "certs" / "dashboard")]
        elif service in ("redis", "postgres"):
            assert sources == []
    assert (
        scale_lab.engine.docker(
            "inspect",
            "-f",
            "{{.Config.User}}",
            next(c["Id"] for c in found if c["Config"]["Labels"]["com.docker.compose.service"] == "redis"),
        ).stdout.strip()
        == "redis"
    )


def test_scale_profile_two_ca_replicas_answer_through_nginx_on_postgresql(scale_lab: DockerLab, tmp_path: Path) -> None:
    cas = [c for c in scale_lab.container_list() if c["Config"]["Labels"]["com.docker.compose.service"] == "ca"]
    claimed = []
    for container in cas:
        logged = scale_lab.engine.docker("logs", container["Id"])
        claimed += re.findall(r"claimed the CA identity (ca-\d+)", logged.stdout + logged.stderr)
    assert sorted(claimed) == ["ca-1", "ca-2"], claimed
    # The database is PostgreSQL: the CA's DATABASE_URL, and the tables in the postgres container.
    url = scale_lab.engine.docker("exec", cas[0]["Id"], "printenv", "DATABASE_URL").stdout.strip()
    assert url.startswith("postgresql+psycopg://lab:") and url.endswith("@postgres:5432/lab")
    tables = scale_lab.compose(
        "exec",
        "-T",
        "postgres",
        "psql",
        "-U",
        "postgres",
        "-d",
        "lab",
        "-Atc",
        "select tablename from pg_tables where schemaname = 'public'",
    )
    assert {"certificates", "create_requests"} <= set(tables.stdout.split()), tables.stdout + tables.stderr
    # create through nginx (HTTPS with the dashboard certificate), a new route cookie each time (either dashboard),
    # until both replicas served some; every certificate has its own serial and verifies against the root.
    serials: list[str] = []
    root_ca = scale_lab.root / "certs" / "root_ca" / "root_ca.crt"
    with scale_lab.timed("checks"):
        for n in range(30):
            request = urllib.request.Request(  # noqa: S310 - https to the lab's nginx on loopback
                scale_lab.url("/v1/ssl/create"),
                method="POST",
                headers={"Content-Type": "application/json", "Cookie": f"iotlab_route={secrets.token_hex(4)}"},
                data=json.dumps({"name": f"scale{n}", "days": 30, "pass": scale_lab.passphrase}).encode(),
            )
            with scale_lab.opener().open(request, timeout=30) as response:
                assert response.status == 201
                body = json.loads(response.read())
            (tmp_path / "leaf.crt").write_text(body["crt"])
            verify = subprocess.run(
                ["openssl", "x509", "-noout", "-serial", "-in", str(tmp_path / "leaf.crt")],
                capture_output=True,
                text=True,
                check=True,
            )
            serials.append(verify.stdout.strip())
            served = [ca_requests_served(scale_lab, c) for c in cas]
            if n >= 3 and all(served):
                break
    assert len(set(serials)) == len(serials) >= 4, serials
    assert all(served), f"creates answered per replica: {served} after {len(serials)} requests"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(root_ca), str(tmp_path / "leaf.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    print(f"docker lab: scale: {len(serials)} creates through nginx, per CA replica {served}")


def test_scale_profile_readings_reach_the_browser_through_nginx(scale_lab: DockerLab) -> None:
    with scale_lab.timed("checks"):
        scale_lab.wait_readings_of_both_devices(timeout=90, where=" through nginx")

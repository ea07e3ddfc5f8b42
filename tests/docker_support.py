"""The Docker lab harness of tests/test_docker_lab.py: the lab's handle (DockerLab), its bring-up and teardown
(started_lab), and the helpers its tests read the containers with. The fixtures and the tests stay in that module,
so the lab comes up once per module (module-scoped fixtures, `--dist loadscope`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lab.testing import mosquitto_tls_args

from .dockerhost import Engine, ensure_base_images
from .support import free_port, lab_identity, wait_for

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT = "iotcalabtest"
TIMINGS_FILE = PROJECT_ROOT / "test-output" / "docker-lab-timings.json"


@dataclass
class DockerLab:
    """A lab started with `./setup.sh docker` in `root`, reachable on loopback ports."""

    root: Path
    engine: Engine
    env: dict[str, str]
    passphrase: str
    broker_port: int
    dashboard_port: int
    timings: dict[str, float] = field(default_factory=dict)
    token: str = ""
    project: str = PROJECT

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[part] = round(self.timings.get(part, 0) + time.monotonic() - started, 1)
            print(f"docker lab: {part}: {self.timings[part]:.1f} s", flush=True)

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """`argv` in the lab's folder with its environment, output captured; the caller checks the exit code."""
        return subprocess.run(
            argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def setup(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = self.run(["./setup.sh", *args], timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"./setup.sh {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n{self.compose_logs()}"
            )
        return result

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run(["docker-compose", "--env-file", ".env", *args], timeout)

    def compose_logs(self) -> str:
        with contextlib.suppress(Exception):
            return self.compose("logs", "--tail", "40", timeout=60).stdout[-6000:]
        return ""

    def container_list(self) -> list[dict[str, Any]]:
        """docker inspect of each of this project's containers (a scaled service has several)."""
        ids = self.engine.docker(
            "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"
        ).stdout.split()
        return json.loads(self.engine.docker("inspect", *ids).stdout) if ids else []

    def containers(self) -> dict[str, dict[str, Any]]:
        """{service: docker inspect of its container} for this project's containers."""
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in self.container_list()}

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.dashboard_port}{path}"  # Docker mode serves HTTPS only

    def opener(self) -> urllib.request.OpenerDirector:
        """No proxy (loopback); HTTPS verified against the lab's root, as a user's browser would after import."""
        context = ssl.create_default_context(cafile=str(self.root / "certs" / "root_ca" / "root_ca.crt"))
        return urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )

    def api_token(self) -> str:
        """A viewer API token for the console's reads, made in the dashboard container as an operator would."""
        if not self.token:
            made = self.compose(
                "exec", "-T", "dashboard", "python", "-m", "dashboard.users", "token", "docker-lab", "--role", "viewer"
            )
            assert made.returncode == 0, made.stdout + made.stderr
            self.token = made.stdout.strip().splitlines()[-1]
        return self.token

    def get_json(self, path: str) -> Any:
        request = urllib.request.Request(self.url(path), headers={"Authorization": f"Bearer {self.api_token()}"})  # noqa: S310
        with self.opener().open(request, timeout=10) as response:
            return json.loads(response.read())

    def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """The seed's API: `pass` in the body, no session or token."""
        opener = self.opener()
        request = urllib.request.Request(  # noqa: S310
            self.url(path),
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with opener.open(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as ex:
            return ex.code, json.loads(ex.read() or b"{}")

    def readings(self) -> dict[str, int]:
        """Readings the dashboard ingested per device since it started."""
        return {name: int(d.get("readings") or 0) for name, d in self.get_json("/api/data")["device_data"].items()}

    def wait_readings_of_both_devices(self, timeout: float, where: str = "") -> None:
        """Readings of device001 and device002 in /api/data within `timeout` s, then growing (`where`: the path
        the page is read through, for the message)."""
        first = wait_for(
            lambda: {"device001", "device002"} <= set(r := self.readings()) and r,
            timeout=timeout,
            interval=1,
            what=f"both devices in /api/data{where}",
        )
        wait_for(
            lambda: all(self.readings()[d] > first[d] for d in ("device001", "device002")),
            timeout=30,
            interval=1,
            what=f"readings of both devices growing{where}",
        )

    def mosquitto_pub(self, name: str) -> subprocess.CompletedProcess[str]:
        """Publish one reading with `certs/<name>/<name>.crt` to the broker container's published port."""
        return subprocess.run(
            [
                "mosquitto_pub",
                *mosquitto_tls_args(lab_identity(self.root / "certs", name), self.broker_port, host="127.0.0.1"),
                "-q",
                "1",
                "-t",
                f"iot/thermometer/{name}/temperature",
                "-m",
                json.dumps({"device_id": name, "timestamp": "2026-01-01T00:00:00Z", "temperature": 21.5}),
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )

    def certificate_bytes(self) -> dict[str, str]:
        """sha256 of every certificate and key file under certs/ (the CRL, re-signed on schedule, aside)."""
        certs = self.root / "certs"
        return {
            str(p.relative_to(certs)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(certs.rglob("*"))
            if p.is_file() and p.suffix in (".crt", ".key")
        }


def copy_checkout(target: Path) -> None:
    """The files of this checkout (tracked, plus untracked ones git does not ignore), as a fresh clone has them."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = PROJECT_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    # The checkout's virtual environment: setup.sh finds its requirements installed and installs nothing.
    (target / ".venv").symlink_to(PROJECT_ROOT / ".venv")


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the Docker lab test must run under CI, but: {reason}")
    pytest.skip(f"no Docker Engine for the lab test: {reason}")


@contextlib.contextmanager
def started_lab(
    engine: Engine,
    tmp_path_factory: pytest.TempPathFactory,
    project: str,
    settings: str = "",
    web_port: int | None = None,
) -> Iterator[DockerLab]:
    """`./setup.sh docker` in a fresh copy of the checkout as compose project `project`, `settings` added to its
    .env; `web_port` is where the tests reach the dashboards (default DASHBOARD_PORT); `down -v` at the end."""
    root = tmp_path_factory.mktemp(project)
    passphrase = secrets.token_urlsafe(24)
    dashboard_port = free_port()
    lab = DockerLab(
        root=root,
        engine=engine,
        env={},
        passphrase=passphrase,
        broker_port=free_port(),
        dashboard_port=web_port or dashboard_port,
        project=project,
    )
    with lab.timed("base images"):
        ensure_base_images(engine, tmp_path_factory.mktemp("base-images"))
    copy_checkout(root)
    (root / ".env").write_text(
        f"CA_PASSPHRASE={passphrase}\nDEVICES=device001,device002\nBROKER_PORT={lab.broker_port}\n"
        f"DASHBOARD_PORT={dashboard_port}\nPUBLISH_INTERVAL=1\n{settings}"
    )
    (root / ".env").chmod(0o600)
    env = {k: v for k, v in engine.env.items() if not k.startswith(("PYTEST", "LAB_", "CERTS_DIR", "DATA_DIR"))}
    # Image builds trust the host's CA bundle (HTTPS here goes through a proxy with its own CA).
    env.setdefault("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    # COLUMNS: without a terminal, docker-compose 1.29 fits `ps` into 80 columns and cuts container names short
    # ("iotcalabtest_mosq..."), which a user at a terminal never sees.
    lab.env = {**env, "COMPOSE_PROJECT_NAME": project, "SETUP_HEALTH_WAIT": "180", "COLUMNS": "250"}
    # Left over by an interrupted earlier run: its containers would hold the names and the volumes old data.
    lab.compose("down", "-v", "--remove-orphans")
    try:
        with lab.timed("build and up (./setup.sh docker)"):
            lab.setup("docker")
        yield lab
    finally:
        with lab.timed("teardown"):
            result = lab.compose("down", "-v", "--remove-orphans", "-t", "5")
            leftover = lab.containers()
        TIMINGS_FILE.parent.mkdir(exist_ok=True)
        # The scale profile's lab ends first, the default one last: each adds its own entry.
        recorded = json.loads(TIMINGS_FILE.read_text()) if TIMINGS_FILE.exists() else {}
        recorded = recorded if all(isinstance(v, dict) for v in recorded.values()) else {}
        TIMINGS_FILE.write_text(json.dumps({**recorded, project: lab.timings}, indent=2) + "\n")
        assert result.returncode == 0, result.stderr
        assert leftover == {}, f"containers left after down -v: {list(leftover)}"
        volumes = engine.docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}")
        assert volumes.stdout.split() == []


def ca_requests_served(scale_lab: DockerLab, container: dict[str, Any]) -> float:
    """The CA replica's own count of answered create requests (its /v1/metrics, asked inside its container)."""
    probe = (
        "import urllib.request as u; from ca.internal import SECRET_HEADER, internal_secret; "
        "from pki.config import Settings; r = u.Request('http://127.0.0.1:5100/v1/metrics', "
        "headers={SECRET_HEADER: internal_secret(Settings.from_env())}); "
        "print(u.build_opener(u.ProxyHandler({})).open(r, timeout=5).read().decode())"
    )
    text = scale_lab.engine.docker("exec", container["Id"], "python", "-c", probe).stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if "ca_request_duration_seconds_count{" in line and 'operation="create"' in line
    )

"""Docker mode of `./setup.sh` (`docker`, and `down` / `status` for the containers): compose, images, health.

The order of `up`: the settings docker-compose.yml interpolates (LAB_UID/LAB_GID in .env, LAB_CERTS_DIR,
LAB_PIP_CERT), docker-compose.override.yml from DEVICES (lab/compose.py), the images, the certificates (the
generator inside the CA service's image, next to the CA's inventory), `compose up`, then the dashboard's /healthz.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from pki.config import PROJECT_ROOT, ConfigError, Settings

from . import compose as compose_override
from . import packages
from .control import (
    GENERATOR,
    Failure,
    append_settings,
    dashboard_url,
    ensure_env_file,
    env_file,
    error,
    explain_generator_exit,
    file_values,
    info,
    local_host_for,
    log,
    login_hint,
    setting,
    warn,
)

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
DOCKER_INFO_TIMEOUT = 10
# How long `./setup.sh docker` waits for the dashboard's /healthz before giving up (seconds).
HEALTH_WAIT_SECONDS = float(os.environ.get("SETUP_HEALTH_WAIT") or 120)
# No .pem/.crt suffix: .dockerignore keeps every such file out of the build context, rightly.
PIP_CA_COPY = PROJECT_ROOT / ".docker-build" / "pip-ca-bundle"


class DockerEngine:
    """The Docker engine `docker` talks to (DOCKER_HOST or the default socket), asked once per run."""

    def __init__(self) -> None:
        self._reachable: bool | None = None
        self.error = ""
        self.compose: list[str] = []

    def reachable(self) -> bool:
        if self._reachable is None:
            self._reachable = False
            if not shutil.which("docker"):
                self.error = "the docker command is not installed"
                return False
            try:
                result = subprocess.run(
                    ["docker", "info"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    timeout=DOCKER_INFO_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                self.error = f"no answer within {DOCKER_INFO_TIMEOUT}s"
                return False
            self._reachable = result.returncode == 0
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            self.error = lines[-1] if lines else f"no answer within {DOCKER_INFO_TIMEOUT}s"
        return self._reachable

    def pick_compose(self, install: bool = False) -> bool:
        """`docker compose` when the plugin works, else docker-compose (installed when missing if asked to)."""
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
        if plugin:
            self.compose = ["docker", "compose"]
        elif shutil.which("docker-compose"):
            self.compose = ["docker-compose"]
        elif install:
            packages.ensure_commands(["docker-compose"])
            self.compose = ["docker-compose"]
        else:
            return False
        return True

    def name(self) -> str:
        return " ".join(self.compose)

    def run(self, *args: str, quiet: bool = False, env: dict[str, str] | None = None) -> int:
        """The picked compose on this lab's files (docker-compose.yml, then the override) and settings file."""
        env_args = ["--env-file", str(env_file())] if env_file().exists() else []
        output = subprocess.DEVNULL if quiet else None
        return subprocess.run(
            [*self.compose, *env_args, *args],
            cwd=PROJECT_ROOT,
            stdout=output,
            stderr=output,
            env={**os.environ, **(env or {})},
        ).returncode


def export_compose_settings() -> Path:
    """What docker-compose.yml interpolates besides .env. LAB_CERTS_DIR is the certificates folder (CERTS_DIR) as
    an absolute path: compose would take a bare `certs/x` for a volume name."""
    certs_dir = Path(setting("CERTS_DIR", "certs"))
    certs_dir = certs_dir if certs_dir.is_absolute() else PROJECT_ROOT / certs_dir
    os.environ["LAB_CERTS_DIR"] = str(certs_dir)
    return certs_dir


def prepare_build_args() -> None:
    """The optional build args of the Python images (docker-compose.yml, x-build-args). PIP_CERT (environment or
    .env), as pip itself reads it, names a CA bundle: it is copied into the build context, where the Dockerfiles
    can COPY it, so pip inside the build trusts a proxy that inspects HTTPS."""
    bundle = setting("PIP_CERT")
    PIP_CA_COPY.unlink(missing_ok=True)
    os.environ["LAB_PIP_CERT"] = ""
    if not bundle:
        return
    if not os.access(bundle, os.R_OK) or not Path(bundle).is_file():
        raise Failure(
            f"PIP_CERT={bundle} is not a readable file.",
            f"Point PIP_CERT (in {env_file()} or the environment) at your CA bundle, or unset it "
            "(README, Docker mode).",
        )
    PIP_CA_COPY.parent.mkdir(exist_ok=True)
    shutil.copyfile(bundle, PIP_CA_COPY)
    os.environ["LAB_PIP_CERT"] = str(PIP_CA_COPY.relative_to(PROJECT_ROOT))
    info(f"image builds trust the CA bundle in PIP_CERT ({bundle})")


def ensure_lab_ids() -> None:
    """LAB_UID/LAB_GID in .env, once. Every container runs as that uid:gid (docker-compose.yml) because the keys
    are 0600 in 0700 folders owned by you: any other uid could not read them."""
    uid, gid = str(os.getuid()), str(os.getgid())
    written = file_values()
    missing = {
        key: value for key, value in (("LAB_UID", uid), ("LAB_GID", gid)) if not written.get(key, "").strip().isdigit()
    }
    if missing:
        shown = " ".join(f"{key}={value}" for key, value in missing.items())
        log(f"Adding {shown} to {env_file()} (the containers run as you, the owner of the certificates)")
        if not append_settings(
            "Added by setup.sh: containers run as this uid:gid, the owner of the certificates folder.", missing
        ):
            warn(f"using {shown} for this run only")
            os.environ.update(missing)
    value = setting("LAB_UID", uid)
    if value != uid:
        warn(
            f"LAB_UID={value} (in {env_file()} or the environment) is not your uid ({uid}): the containers may be "
            f"unable to read the certificates; set LAB_UID={uid} LAB_GID={gid} there unless you mean it (README, "
            "Docker mode)"
        )
    if value == "0":
        info("running as root: the containers run as uid 0 as well, so they can read root's 0600 keys")


def write_compose_override(engine: DockerEngine) -> None:
    """docker-compose.override.yml from DEVICES, so that every device has its container; then stop the seed
    devices that DEVICES leaves out."""
    if compose_override.main([]) != 0:
        raise Failure(f"could not write {compose_override.OVERRIDE_FILE.name} (see above).")
    try:
        disabled = compose_override.disabled_services(Settings.from_env().devices)
    except ConfigError as ex:
        raise Failure(str(ex), code=2) from ex
    if disabled:
        info(f"not in DEVICES, so not started: {' '.join(disabled)}")
        engine.run("rm", "--stop", "--force", *disabled, quiet=True)


def generate_certs(engine: DockerEngine, certs_dir: Path) -> int:
    """The generator, run in the CA service's container (the only one that mounts the CA key). In Docker mode the
    CA's inventory lives in the dashboard-data volume, and the generator must use that one: it rewrites the CRL
    and the ACL from the inventory's revocations, so a generator with another inventory would undo revocations."""
    # A bind-mount source that does not exist is created by Docker, owned by root: create it as you.
    try:
        certs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as ex:
        raise Failure(f"cannot create the certificates folder {certs_dir}: {ex}") from ex
    log(f"Certificates: {GENERATOR} in the CA service's image ({engine.name()} run --rm --no-deps ca)")
    code = engine.run("run", "--rm", "--no-deps", "-T", "ca", "python", GENERATOR)
    if code not in (0, 2):
        error(
            f"the generator container failed with exit code {code} (see above).",
            f"'Permission denied' under /certs: LAB_UID/LAB_GID in {env_file()} must be the owner of {certs_dir}",
            "(id -u, id -g); with rootless Docker or Podman set LAB_UID=0 LAB_GID=0 there (README, Docker mode).",
        )
    else:
        explain_generator_exit(code)
    return code


def profiles() -> set[str]:
    """The compose profiles this lab runs: COMPOSE_PROFILES (environment or .env), as compose reads it."""
    return {name.strip() for name in setting("COMPOSE_PROFILES").split(",") if name.strip()}


def start_database(engine: DockerEngine) -> None:
    """With a PostgreSQL profile, the `postgres` service before the generator (which records the certificates it
    issues in DATABASE_URL's inventory): `run --no-deps` would not start it, and a server still starting refuses."""
    if not profiles() & {"postgres", "scale"}:
        return
    log(f"Starting the database: {engine.name()} up -d postgres")
    if engine.run("up", "-d", "postgres"):
        raise Failure(f"{engine.name()} up -d postgres failed (see above).")
    deadline = time.monotonic() + HEALTH_WAIT_SECONDS
    while engine.run(
        "exec", "-T", "postgres", "pg_isready", "-q", "-h", "127.0.0.1", "-U", "lab", "-d", "lab", quiet=True
    ):
        if time.monotonic() > deadline:
            raise Failure(
                f"PostgreSQL did not accept connections within {HEALTH_WAIT_SECONDS:.0f}s.",
                f"Look at: {engine.name()} logs postgres (POSTGRES_PASSWORD in {env_file()}).",
            )
        time.sleep(1)


def scale_args() -> list[str]:
    """`--scale ca=<CA_REPLICAS>`: one `ca` container per identity the generator issued (ca/slots.py)."""
    replicas = setting("CA_REPLICAS", "1").strip() or "1"
    if not replicas.isdigit() or int(replicas) < 1:
        raise Failure(f"CA_REPLICAS={replicas} (in {env_file()} or the environment) must be a number from 1.", code=2)
    return ["--scale", f"ca={int(replicas)}"]


def wait_for_health(url: str, seconds: float, cafile: Path) -> bool:
    """Poll `url` until it answers 2xx (no proxy: it is local); an https URL is verified against `cafile`."""
    deadline = time.monotonic() + seconds
    while True:
        context = ssl.create_default_context(cafile=str(cafile) if cafile.exists() else None)
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(url, timeout=3) as response:
                if 200 <= response.status < 300:
                    return True
        except (OSError, ssl.SSLError):  # not up yet, whatever the reason
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(1)


def explain_unreachable(engine: DockerEngine) -> None:
    error(
        f"the Docker engine is not reachable (docker info: {engine.error}).",
        "Start it: sudo systemctl start docker (Linux), or open Docker Desktop (macOS, Windows/WSL).",
        'If it runs but you may not use it: sudo usermod -aG docker "$USER", then log in again.',
        "Or run the same lab without Docker: ./setup.sh native",
    )


def up(engine: DockerEngine, args: Sequence[str]) -> int:
    """`./setup.sh docker ARGS`: build, generate, `compose up --build -d ARGS`, wait for the dashboard."""
    if not engine.reachable():
        explain_unreachable(engine)
        return 1
    engine.pick_compose(install=True)
    ensure_env_file()
    ensure_lab_ids()
    certs_dir = export_compose_settings()
    write_compose_override(engine)
    prepare_build_args()
    log(f"Building the images: {engine.name()} build")
    if engine.run("build"):
        raise Failure(
            f"{engine.name()} build failed (see above).",
            "The first build downloads the base images (python:3.11-slim, debian:bookworm-slim), Debian's mosquitto",
            "package and the Python wheels: check that the Docker engine reaches the network "
            "(proxy, DNS), then re-run;",
            "./setup.sh native runs the same lab without images.",
        )
    start_database(engine)
    code = generate_certs(engine, certs_dir)
    if code:
        return code
    args = [*scale_args(), *args]
    log(f"Starting the lab: {engine.name()} up --build -d --remove-orphans {' '.join(args)}")
    if engine.run("up", "--build", "-d", "--remove-orphans", *args):
        raise Failure(
            f"{engine.name()} up failed (see above).",
            "'port is already allocated' / 'address already in use': something else uses BROKER_PORT or "
            "DASHBOARD_PORT;",
            f"stop it (./setup.sh down stops a native lab) or choose other ports in {env_file()}, then re-run.",
        )
    url = dashboard_url(docker=True)
    log(f"Waiting up to {HEALTH_WAIT_SECONDS:.0f}s for the dashboard ({url}healthz)")
    if not wait_for_health(f"{url}healthz", HEALTH_WAIT_SECONDS, certs_dir / "root_ca" / "root_ca.crt"):
        engine.run("ps")
        raise Failure(
            f"the dashboard did not become healthy within {HEALTH_WAIT_SECONDS:.0f}s.",
            f"Look at: {engine.name()} logs --tail 50 (mosquitto 'cannot read': LAB_UID/LAB_GID, README, Docker mode);",
            "stop with ./setup.sh down",
        )
    log(f"The lab is up. Dashboard: {url}")
    if "scale" in profiles():
        host = local_host_for(setting("DASHBOARD_HOST", "127.0.0.1"))
        info(f"nginx in front of dashboard and dashboard-2: https://{host}:{setting('NGINX_PORT', '5443')}/")
    login_hint()
    broker = f"{local_host_for(setting('BROKER_BIND', '127.0.0.1'))}:{setting('BROKER_PORT', '8883')}"
    info(f"Broker: mqtts://{broker} (mutual TLS; certificates in {certs_dir})")
    info(f"Logs: {engine.name()} logs -f; status: ./setup.sh status; stop: ./setup.sh down")
    return 0


def _usable(engine: DockerEngine) -> bool:
    if not (COMPOSE_FILE.exists() and engine.reachable()):
        return False
    if not engine.pick_compose():
        warn("Docker answers but neither 'docker compose' nor docker-compose is installed")
        return False
    export_compose_settings()
    return True


def down(engine: DockerEngine) -> bool:
    """`compose down` when a Docker engine answers (the data volumes are kept); True when it ran."""
    if not _usable(engine):
        return False
    log(f"Stopping the Docker lab: {engine.name()} down --remove-orphans (the data volumes are kept)")
    # `down` needs no passphrase, but docker-compose.yml insists on one being set.
    engine.run("down", "--remove-orphans", env={"CA_PASSPHRASE": setting("CA_PASSPHRASE", "not-needed-to-stop")})
    return True


def status(engine: DockerEngine) -> None:
    """The containers with their health, when a Docker engine answers."""
    if _usable(engine):
        info(f"docker:    {engine.name()} ps (STATUS shows each container's health)")
        engine.run("ps", env={"CA_PASSPHRASE": setting("CA_PASSPHRASE", "not-needed-for-status")})

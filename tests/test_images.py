"""Docker mode without a Docker engine: the Dockerfiles, .dockerignore and what the images run."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

from pki.broker import find_mosquitto

from .compose_support import dockerfile_instruction, dockerfile_lines
from .conftest import PROJECT_ROOT

DOCKERFILES = {
    # Dockerfile: its build context
    PROJECT_ROOT / "dashboard" / "Dockerfile": PROJECT_ROOT,
    PROJECT_ROOT / "Dockerfile_thermometer": PROJECT_ROOT,
    PROJECT_ROOT / "mosquitto" / "Dockerfile": PROJECT_ROOT / "mosquitto",
    PROJECT_ROOT / "postgres" / "Dockerfile": PROJECT_ROOT / "postgres",
    PROJECT_ROOT / "deploy" / "nginx" / "Dockerfile": PROJECT_ROOT / "deploy" / "nginx",
    PROJECT_ROOT / "deploy" / "redis" / "Dockerfile": PROJECT_ROOT / "deploy" / "redis",
}


# -- Dockerfiles and .dockerignore -----------------------------------------------------------------


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

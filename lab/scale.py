"""Dashboard replicas: the Redis server they share and nginx in front of them, as local processes.

Used by the tests (tests/test_scale.py) and the benchmarks (bench/telemetry.py --dashboards 2); settings come
from the environment like everywhere else (SOCKETIO_MESSAGE_QUEUE, INGEST_ID), so a compose file can run the
same shape with the images' own redis and nginx. Both servers bind 127.0.0.1 only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template

from lab.processes import stop_process
from pki.config import PROJECT_ROOT

NGINX_TEMPLATE = PROJECT_ROOT / "deploy" / "nginx" / "nginx.conf.template"
NGINX_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
NGINX_DOCKER_CONF = PROJECT_ROOT / "deploy" / "nginx" / "nginx.docker.conf"
# Mozilla's "intermediate" TLS 1.2 suites (ECDHE + AEAD), as gunicorn and Mosquitto offer (tests/test_identity.py).
INTERMEDIATE_CIPHERS = (
    "        ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
    "ECDHE-RSA-CHACHA20-POLY1305;\n        ssl_prefer_server_ciphers off;\n"
)


@dataclass(frozen=True)
class NginxTLS:
    """nginx's own certificate and key, and how it verifies the dashboards behind it."""

    certificate: str
    key: str
    upstream_ca: str
    upstream_name: str


DOCKER_TLS = NginxTLS(
    "/certs/dashboard/dashboard.crt", "/certs/dashboard/dashboard.key", "/certs/dashboard/root_ca.crt", "dashboard"
)


def render_nginx_conf(
    listen: str, upstreams: Sequence[str], prefix: Path | str, tls: NginxTLS | None = None, error_log: str = ""
) -> str:
    """nginx.conf for `listen` (host:port) in front of `upstreams` (host:port each), state under `prefix`; with
    `tls`, HTTPS on both sides (nginx terminates the client's TLS and verifies the dashboards')."""
    if not upstreams:
        raise ValueError("at least one dashboard upstream is needed")
    servers = "".join(f"        server {address} max_fails=1 fail_timeout=5s;\n" for address in upstreams)
    server_tls = upstream_tls = ""
    if tls is not None:
        server_tls = (
            f"        ssl_certificate {tls.certificate};\n        ssl_certificate_key {tls.key};\n"
            f"        ssl_protocols TLSv1.2 TLSv1.3;\n{INTERMEDIATE_CIPHERS}"
        )
        upstream_tls = (
            f"            proxy_ssl_trusted_certificate {tls.upstream_ca};\n"
            "            proxy_ssl_verify on;\n"
            f"            proxy_ssl_name {tls.upstream_name};\n"
            "            proxy_ssl_session_reuse on;\n"
        )
    return Template(NGINX_TEMPLATE.read_text()).substitute(
        listen=listen,
        upstreams=servers.rstrip("\n"),
        prefix=str(prefix),
        error_log=error_log or f"{prefix}/error.log",
        server_tls=server_tls.rstrip("\n"),
        upstream_tls=upstream_tls.rstrip("\n"),
        upstream_scheme="https" if tls is not None else "http",
    )


def render_docker_nginx_conf() -> str:
    """deploy/nginx/nginx.docker.conf: the compose profile `scale`'s nginx (docker-compose.yml), HTTPS on 8443 in
    front of the services `dashboard` and `dashboard-2`, with the dashboard's certificate (certs/dashboard, no CA
    key), state in the container's /tmp, errors on stderr (`docker compose logs nginx`)."""
    return render_nginx_conf(
        "8443 ssl",
        ["dashboard:5000", "dashboard-2:5000"],
        "/tmp",
        tls=DOCKER_TLS,  # noqa: S108
        error_log="stderr",
    )


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on 127.0.0.1:{port} after {timeout} s")


class LocalServer:
    """A child process that listens on 127.0.0.1:`port`; `stop` ends it (SIGTERM, then SIGKILL)."""

    name = "server"

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = Path(folder)
        self.port = port
        self.log = self.folder / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> LocalServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        _wait_listening(self.port, self.process, self.name, self.log)
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process)


class RedisServer(LocalServer):
    """redis-server from the OS package: no persistence (the bus and the Socket.IO queue are pub/sub only)."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
            "--protected-mode",
            "yes",
        ]


class NginxServer(LocalServer):
    """nginx from the OS package with the rendered deploy/nginx config, as the current user."""

    name = "nginx"

    def __init__(self, folder: Path, port: int, upstreams: Sequence[str], host: str = "127.0.0.1") -> None:
        super().__init__(folder, port)
        self.host = host
        self.upstreams = list(upstreams)
        self.conf = self.folder / "nginx.conf"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        for name in NGINX_TEMP_DIRS:
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(render_nginx_conf(f"{self.host}:{self.port}", self.upstreams, self.folder))
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        return [binary, "-p", str(self.folder), "-c", str(self.conf), "-e", str(self.folder / "error.log")]


def main(argv: list[str] | None = None) -> int:
    """`python -m lab.scale nginx --listen HOST:PORT --upstream HOST:PORT ... [--prefix DIR]`: render
    deploy/nginx for these dashboards into DIR and run nginx in the foreground (Ctrl-C stops it).
    `python -m lab.scale docker-conf`: rewrite deploy/nginx/nginx.docker.conf (compose profile `scale`)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m lab.scale", description=main.__doc__)
    parser.add_argument("command", choices=["nginx", "docker-conf"])
    parser.add_argument("--listen", default="127.0.0.1:5000", help="where nginx listens (default 127.0.0.1:5000)")
    parser.add_argument("--upstream", action="append", help="a dashboard's HOST:PORT (repeat)")
    parser.add_argument(
        "--prefix", type=Path, default=PROJECT_ROOT / "data" / "nginx", help="nginx's state folder (default data/nginx)"
    )
    args = parser.parse_args(argv)
    if args.command == "docker-conf":
        NGINX_DOCKER_CONF.write_text(render_docker_nginx_conf())
        print(f"wrote {NGINX_DOCKER_CONF.relative_to(PROJECT_ROOT)}")
        return 0
    if not args.upstream:
        parser.error("nginx needs at least one --upstream")
    host, port = args.listen.rsplit(":", 1)
    server = NginxServer(args.prefix.resolve(), int(port), args.upstream, host=host)
    argv_nginx = server.argv()
    print(f"nginx on http://{args.listen}/ in front of {', '.join(args.upstream)} ({server.conf})", flush=True)
    os.execv(argv_nginx[0], argv_nginx)  # noqa: S606 - nginx from the OS package, arguments ours
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())

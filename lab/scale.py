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
from pathlib import Path
from string import Template

from lab.processes import stop_process
from pki.config import PROJECT_ROOT

NGINX_TEMPLATE = PROJECT_ROOT / "deploy" / "nginx" / "nginx.conf.template"
NGINX_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render_nginx_conf(listen: str, upstreams: Sequence[str], prefix: Path) -> str:
    """nginx.conf for `listen` (host:port) in front of `upstreams` (host:port each), state under `prefix`."""
    if not upstreams:
        raise ValueError("at least one dashboard upstream is needed")
    servers = "".join(f"        server {address} max_fails=1 fail_timeout=5s;\n" for address in upstreams)
    return Template(NGINX_TEMPLATE.read_text()).substitute(listen=listen, upstreams=servers.rstrip("\n"),
                                                          prefix=str(prefix))


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str, log: Path,
                    timeout: float = 15) -> None:
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
        return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.folder), "--protected-mode", "yes"]


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
    deploy/nginx for these dashboards into DIR and run nginx in the foreground (Ctrl-C stops it)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m lab.scale", description=main.__doc__)
    parser.add_argument("command", choices=["nginx"])
    parser.add_argument("--listen", default="127.0.0.1:5000", help="where nginx listens (default 127.0.0.1:5000)")
    parser.add_argument("--upstream", action="append", required=True, help="a dashboard's HOST:PORT (repeat)")
    parser.add_argument("--prefix", type=Path, default=PROJECT_ROOT / "data" / "nginx",
                        help="nginx's state folder (default data/nginx)")
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    server = NginxServer(args.prefix.resolve(), int(port), args.upstream, host=host)
    argv_nginx = server.argv()
    print(f"nginx on http://{args.listen}/ in front of {', '.join(args.upstream)} ({server.conf})", flush=True)
    os.execv(argv_nginx[0], argv_nginx)  # noqa: S606 - nginx from the OS package, arguments ours
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())

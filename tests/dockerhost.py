"""A Docker Engine for the tests, and the base images the lab's Dockerfiles name, built locally.

`Engine.find_or_start()` uses the engine that already answers (`docker info` with the caller's environment) and
then touches nothing of the host but its own containers, images and networks. Only where none answers and we are
root does it start a private `dockerd` on `<tmp>/docker.sock` (own data root, exec root and PID file; never the
default socket, so `./setup.sh`'s mode detection is unchanged); `stop()` ends that daemon by its PID and puts
back the host state it created: the `docker0` and compose bridges, its iptables chains and rules, forwarding.

`ensure_base_images()` builds what the Dockerfiles' FROM lines name, since no registry is reachable from CI:
`debian:bookworm-…-slim` from `debootstrap --variant=minbase` on the mirror apt uses, and a stand-in for
`python:3.11.…-slim-bookworm` (Debian's python3 in a venv providing `python` and `pip`). They are kept by tag,
and the private daemon's data root is kept between runs, so a second run skips this.

Also a script, for a person debugging the Docker lab test: `python -m tests.dockerhost images`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lab.testing import stop_process

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Where a private daemon keeps its images between runs (its overlay2 layers need a real file system, not tmpfs).
CACHE_ROOT = Path(os.environ.get("LAB_DOCKER_CACHE", "/var/cache/iot-ca-lab/docker"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# The tag of the image the fresh-machine check starts from: Debian minbase plus python3, as a user's machine.
FRESH_IMAGE = "iot-ca-lab/fresh-debian:bookworm"
LOCK_WAIT_SECONDS = 1200
Log = Callable[[str], None]


class EngineUnavailable(RuntimeError):
    """No Docker Engine answers and none can be started here (the reason says why)."""


def base_image_names() -> tuple[str, str]:
    """(the Debian image, the Python image) that the lab's Dockerfiles build FROM."""
    debian = _from_line(PROJECT_ROOT / "mosquitto" / "Dockerfile")
    python = _from_line(PROJECT_ROOT / "Dockerfile_thermometer")
    if _from_line(PROJECT_ROOT / "dashboard" / "Dockerfile") != python:
        raise AssertionError("dashboard/Dockerfile and Dockerfile_thermometer should build FROM the same image")
    return debian, python


def _from_line(dockerfile: Path) -> str:
    match = re.search(r"^FROM\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
    if not match:
        raise AssertionError(f"{dockerfile} has no FROM line")
    return match.group(1)


def apt_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 `URIs:` or a `deb` line for bookworm)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        with contextlib.suppress(OSError):
            text = source.read_text()
            for match in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", text, re.MULTILINE):
                return match.group(1)
            for stanza in re.split(r"\n\s*\n", text):
                uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
                suites = re.search(r"^Suites:(.*)$", stanza, re.MULTILINE)
                if uris and suites and "bookworm" in suites.group(1).split() and "security" not in uris.group(1):
                    return uris.group(1)
    return DEFAULT_MIRROR


@dataclass
class HostState:
    """What a private dockerd changes on the host, as it was before it started."""

    links: set[str]
    forwarding: str
    iptables: dict[str, str]

    @classmethod
    def capture(cls) -> HostState:
        return cls(
            links=_links(),
            forwarding=Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
            iptables={
                tool: _run([f"{tool}-save"]).stdout
                for tool in ("iptables", "ip6tables")
                if shutil.which(f"{tool}-save")
            },
        )

    def restore(self) -> None:
        for link in sorted(_links() - self.links):
            subprocess.run(["ip", "link", "delete", link], capture_output=True, check=False)
        for tool, before in self.iptables.items():
            # Empty every table the daemon touched (its chains, its rules, FORWARD's DROP policy), then load
            # what was there before, which on a fresh machine is nothing at all.
            for table, builtin in _tables(_run([f"{tool}-save"]).stdout).items():
                _run([tool, "-t", table, "-F"])
                _run([tool, "-t", table, "-X"])
                for chain in builtin:
                    _run([tool, "-t", table, "-P", chain, "ACCEPT"])
            if before.strip():
                _run([f"{tool}-restore"], input=before)
        forwarding = Path("/proc/sys/net/ipv4/ip_forward")
        if forwarding.read_text().strip() != self.forwarding:
            forwarding.write_text(self.forwarding + "\n")


def _tables(dump: str) -> dict[str, list[str]]:
    """{table: its built-in chains} of an iptables-save dump (built-in chains have a policy, others `-`)."""
    tables: dict[str, list[str]] = {}
    table = None
    for line in dump.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            tables[table] = []
        elif line.startswith(":") and table is not None:
            name, policy = line[1:].split()[:2]
            if policy != "-":
                tables[table].append(name)
    return tables


def _links() -> set[str]:
    return {entry.name for entry in Path("/sys/class/net").iterdir()}


def _run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]


@dataclass
class Engine:
    """A Docker Engine the tests may use: `env` is the environment every docker/compose call gets."""

    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    host_state: HostState | None = None
    log: Log = field(default=print)
    lock: IO[str] | None = None

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def docker(
        self, *args: str, check: bool = True, timeout: float = 600, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
        return result

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False, timeout=60).returncode == 0

    @classmethod
    def find_or_start(cls, log: Log = print, start_timeout: float = 60) -> Engine:
        env = dict(os.environ)
        if shutil.which("docker") is None:
            raise EngineUnavailable("the docker command is not installed (./setup.sh test installs docker.io)")
        with contextlib.suppress(subprocess.TimeoutExpired):
            if subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=15).returncode == 0:
                log("using the Docker Engine that already answers (docker info)")
                return cls(env=env, log=log)
        if os.geteuid() != 0:
            raise EngineUnavailable("no Docker Engine answers, and starting one needs root")
        dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else None)
        if dockerd is None:
            raise EngineUnavailable("no Docker Engine answers and dockerd is not installed (apt-get install docker.io)")
        # One private daemon at a time on the image cache (two on one data root corrupt it): another test run
        # on this machine waits here until its daemon is gone.
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        lock = open(CACHE_ROOT.parent / f"{CACHE_ROOT.name}.lock", "w")  # noqa: SIM115 - held while the daemon runs
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise EngineUnavailable(
                        f"another test run kept its dockerd on {CACHE_ROOT} for {LOCK_WAIT_SECONDS} s"
                    ) from None
                time.sleep(1)
        # A short path: the socket's path must fit in sun_path (108 bytes).
        workdir = Path(tempfile.mkdtemp(prefix="labdk-", dir="/tmp"))
        socket_path = workdir / "docker.sock"
        env["DOCKER_HOST"] = f"unix://{socket_path}"
        state = HostState.capture()
        argv = [
            dockerd,
            "--host",
            env["DOCKER_HOST"],
            "--data-root",
            str(CACHE_ROOT),
            "--exec-root",
            str(workdir / "exec"),
            "--pidfile",
            str(workdir / "docker.pid"),
        ]
        log_file = open(workdir / "dockerd.log", "wb")  # noqa: SIM115 - the daemon writes it while it runs
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()
        engine = cls(env=env, process=process, workdir=workdir, host_state=state, log=log, lock=lock)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = (workdir / "dockerd.log").read_text(errors="replace")[-1500:]
                engine.stop()
                raise EngineUnavailable(f"dockerd exited {process.returncode} at start (no kernel support?):\n{tail}")
            if engine.docker("info", check=False, timeout=15).returncode == 0:
                log(f"started a private dockerd (PID {process.pid}) on {socket_path}, images in {CACHE_ROOT}")
                return engine
            time.sleep(0.5)
        engine.stop()
        raise EngineUnavailable(f"dockerd did not answer within {start_timeout:.0f} s")

    def stop(self) -> None:
        """Stop a daemon started here (by its PID), then restore the host state it changed. Else nothing."""
        if self.process is None:
            return
        stop_process(self.process, timeout=30)
        # Its managed containerd and shims run in the daemon's session: nothing of it may outlive the test.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None
        if self.host_state is not None:
            self.host_state.restore()
        if self.workdir is not None:
            subprocess.run(["umount", "-R", str(self.workdir)], capture_output=True, check=False)
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.lock is not None:
            self.lock.close()  # releases the flock: the next run may start its daemon
            self.lock = None


@contextlib.contextmanager
def engine(log: Log = print) -> Iterator[Engine]:
    found = Engine.find_or_start(log=log)
    try:
        yield found
    finally:
        found.stop()


def ensure_base_images(engine: Engine, workdir: Path) -> None:
    """Build the Dockerfiles' base images locally, unless images with those tags exist already."""
    debian, python = base_image_names()
    if not engine.has_image(debian):
        build_debian(engine, debian, workdir)
    else:
        engine.log(f"base image {debian}: present")
    if not engine.has_image(python):
        build_from(
            engine,
            python,
            workdir,
            f"""FROM {debian}
RUN apt-get -o Acquire::Retries=5 update \\
    && apt-get -o Acquire::Retries=5 install -y --no-install-recommends python3 python3-venv ca-certificates \\
    && rm -rf /var/lib/apt/lists/* \\
    && python3 -m venv /usr/local/python
ENV PATH=/usr/local/python/bin:$PATH
CMD ["python"]
""",
        )
    else:
        engine.log(f"base image {python}: present")


def build_debian(engine: Engine, tag: str, workdir: Path) -> None:
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        raise EngineUnavailable("debootstrap is not installed (./setup.sh test installs it)")
    rootfs = workdir / "rootfs"
    mirror = apt_mirror()
    engine.log(f"base image {tag}: debootstrap --variant=minbase bookworm from {mirror}")
    started = time.monotonic()
    for attempt in (1, 2):  # a download that breaks half-way fails the whole bootstrap: try once more
        shutil.rmtree(rootfs, ignore_errors=True)
        result = _run([debootstrap, "--variant=minbase", "bookworm", str(rootfs), mirror], timeout=900)
        if result.returncode == 0:
            break
        engine.log(f"debootstrap failed (attempt {attempt}): {result.stdout[-300:]}")
    else:
        raise RuntimeError(f"debootstrap failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / leftover).glob("*"):
            if entry.is_file():
                entry.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        ["docker", "import", "-c", 'CMD ["bash"]', "-", tag],
        stdin=tar.stdout,
        env=engine.env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert tar.stdout is not None
    tar.stdout.close()
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    if imported.returncode != 0:
        raise RuntimeError(f"docker import failed: {imported.stderr[-2000:]}")
    engine.log(f"base image {tag}: imported in {time.monotonic() - started:.0f} s")


def build_from(engine: Engine, tag: str, workdir: Path, dockerfile: str) -> None:
    context = workdir / re.sub(r"[^A-Za-z0-9]+", "-", tag)
    context.mkdir(parents=True, exist_ok=True)
    (context / "Dockerfile").write_text(dockerfile)
    engine.log(f"base image {tag}: docker build")
    started = time.monotonic()
    engine.docker("build", "-t", tag, str(context), timeout=900)
    engine.log(f"base image {tag}: built in {time.monotonic() - started:.0f} s")


def ensure_fresh_image(engine: Engine, workdir: Path) -> str:
    """Debian minbase plus python3 (what a user's machine has before the README's two commands)."""
    debian, _ = base_image_names()
    if not engine.has_image(FRESH_IMAGE):
        build_from(
            engine,
            FRESH_IMAGE,
            workdir,
            f"""FROM {debian}
RUN apt-get -o Acquire::Retries=5 update && apt-get -o Acquire::Retries=5 install -y --no-install-recommends python3 \\
    && rm -rf /var/lib/apt/lists/*
""",
        )
    return FRESH_IMAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["images"]:
        print("usage: python -m tests.dockerhost images   (build the base images in the engine the tests use)")
        return 2
    with engine() as found, tempfile.TemporaryDirectory() as tmp:
        ensure_base_images(found, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())

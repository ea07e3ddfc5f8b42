"""`./setup.sh COMMAND`, after the bootstrap: `python -m lab.control COMMAND [ARGS]`.

setup.sh only finds Python, makes `.venv` and installs the locked dependencies; then it `exec`s this module,
which does the rest: the settings file, the system packages, the certificates, the lab itself (natively or
with Docker Compose), `down`, `status`, the tests and the locks. `.env` is read here with python-dotenv, as
`pki.config` reads it for every process of the lab: one parser. The split of the commands:

- `lab.control` (this module): the lab's own life cycle on this machine, for `./setup.sh`.
- `lab.cli` (`iotca`): a client of the running CA's API (certificates, tokens, users), for operators and scripts.
- `lab.dockerlab`: Docker mode (compose, images, health); `lab.packages`: system packages.

Exit codes: 0 success, 1 failure, 2 usage error (or a wrong CA passphrase from the generator).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dotenv import dotenv_values

from pki.config import PROJECT_ROOT, TRUE_VALUES, lab_environ

from . import packages
from .packages import MissingPackages, find_command

GENERATOR = "generate_ca_and_device_certs.py"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
# What `./setup.sh lock` makes: lock file -> the requirements files it is compiled from.
LOCKS = {
    "requirements.lock": ("requirements.txt",),
    "requirements-postgres.lock": ("requirements.txt", "requirements-postgres.txt"),
    "requirements-dev.lock": ("requirements-dev.txt",),
}
STOP_RUNNER_TIMEOUT = 30.0  # the native runner stops its children in order (thermometers publish `offline` first)
STOP_TIMEOUT = 10.0  # then what is left gets SIGTERM, and SIGKILL after this long


class Failure(Exception):
    """A step failed: the first line is the error, the others what to do; `code` is the exit status."""

    def __init__(self, *lines: str, code: int = 1) -> None:
        super().__init__(lines[0])
        self.lines = lines
        self.code = code


def log(text: str) -> None:
    print(f"==> {text}", flush=True)


def info(text: str) -> None:
    print(f"    {text}", flush=True)


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def error(*lines: str) -> None:
    print(f"error: {lines[0]}", *(f"       {line}" for line in lines[1:]), sep="\n", file=sys.stderr, flush=True)


# -- settings (.env) ---------------------------------------------------------------------------------


def env_file() -> Path:
    """The settings file: LAB_ENV_FILE (tests use a temporary one), else .env; as pki.config reads it."""
    return Path(os.environ.get("LAB_ENV_FILE") or ".env")  # relative to PROJECT_ROOT: main() goes there


def setting(key: str, default: str = "") -> str:
    """What every process of the lab sees for `key` (environment over .env); empty counts as unset."""
    return lab_environ(env_file()).get(key) or default


def file_values() -> dict[str, str]:
    """What the settings file itself says (not the environment): KEY -> value ("" for a bare KEY=)."""
    path = env_file()
    return {k: v or "" for k, v in dotenv_values(path).items()} if path.exists() else {}


def append_settings(comment: str, values: dict[str, str]) -> bool:
    """Append KEY=VALUE lines under a comment (the file keeps its mode and any link); False when it failed."""
    block = "".join(f"# {line}\n" for line in comment.splitlines())
    block += "".join(f"{key}={value}\n" for key, value in values.items())
    try:
        with open(env_file(), "a", encoding="utf-8") as handle:
            handle.write("\n" + block)
    except OSError as ex:
        warn(f"could not write to {env_file()}: {ex}")
        return False
    return True


def ensure_env_file() -> None:
    """Create .env from .env.example with a fresh random CA_PASSPHRASE (mode 0600, never printed). An existing
    .env is never rewritten: it holds the passphrase of the CA key; only missing keys are appended."""
    path = env_file()
    if path.exists() or path.is_symlink():
        if not setting("CA_PASSPHRASE"):
            warn(f"CA_PASSPHRASE is empty in {path} (and not set in the environment): set it there")
        if path.exists() and path.stat().st_mode & 0o077:
            warn(f"{path} is readable by other users; it holds the CA passphrase: chmod 600 {path}")
    else:
        try:
            lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            warn(f"{ENV_EXAMPLE.name} is missing: {path} gets only CA_PASSPHRASE (defaults for the rest)")
            lines = []
        log(f"Creating {path} with a new random CA passphrase (mode 0600; keep it: it unlocks the CA key)")
        passphrase = f"CA_PASSPHRASE={secrets.token_urlsafe(32)}"
        out = [
            f"# Created by setup.sh from {ENV_EXAMPLE.name} on {time.strftime('%Y-%m-%d %H:%M:%S %z')}.",
            "# CA_PASSPHRASE below encrypts the root CA key: losing or changing it means a new CA.",
        ]
        pattern = re.compile(r"\s*(export\s+)?CA_PASSPHRASE\s*=")
        index = next((i for i, line in enumerate(lines) if pattern.match(line)), None)
        if index is None:
            lines.append(passphrase)
        else:
            lines[index] = passphrase
        try:  # O_EXCL: never overwrite a .env that appeared meanwhile
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as ex:
            raise Failure(f"could not create {path}: {ex}") from ex
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(out + lines) + "\n")
    ensure_admin_password()


def ensure_admin_password() -> None:
    """DASHBOARD_ADMIN_PASSWORD in .env, once: a random password for the dashboard's first operator, `admin`
    (never printed; an existing value, even one you changed, is never overwritten)."""
    if "DASHBOARD_ADMIN_PASSWORD" in file_values():
        return
    log(f"Adding DASHBOARD_ADMIN_PASSWORD to {env_file()}: the dashboard's operator 'admin' logs in with it")
    if not append_settings(
        "Added by setup.sh: the password of the dashboard operator admin (created at the first "
        "start;\npython -m dashboard.users passwd admin changes it later, this value is then only "
        "a leftover).",
        {"DASHBOARD_ADMIN_PASSWORD": secrets.token_urlsafe(18)},
    ):
        warn(f"set DASHBOARD_ADMIN_PASSWORD in {env_file()} to log in to the dashboard")


def login_hint() -> None:
    """How to log in to the dashboard (the password itself is never printed)."""
    info(
        f"Log in as admin with DASHBOARD_ADMIN_PASSWORD from {env_file()} (grep DASHBOARD_ADMIN_PASSWORD "
        f"{env_file()}); more users and API tokens: .venv/bin/python -m dashboard.users --help"
    )


def local_host_for(host: str) -> str:
    """A host to connect to for a service bound to `host` ("0.0.0.0" and friends mean every interface)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]", "*") else host  # noqa: S104 - a comparison


def dashboard_url(docker: bool = False) -> str:
    """Where the dashboard answers; HTTPS with DASHBOARD_TLS=1, and always in Docker mode."""
    tls = docker or setting("DASHBOARD_TLS", "0").strip().lower() in TRUE_VALUES
    host = local_host_for(setting("DASHBOARD_HOST", "127.0.0.1"))
    return f"{'https' if tls else 'http'}://{host}:{setting('DASHBOARD_PORT', '5000')}/"


def lock_file() -> str:
    """The lock the runtime install needs: with the PostgreSQL driver for a postgresql DATABASE_URL."""
    return "requirements-postgres.lock" if setting("DATABASE_URL").startswith("postgresql") else "requirements.lock"


# -- certificates --------------------------------------------------------------------------------------


def explain_generator_exit(code: int) -> None:
    if code == 2:
        error(
            "the generator exited 2: wrong CA passphrase, bad setting or bad option (see above;",
            "README.md, Troubleshooting, says what to do).",
        )
    elif code:
        error(f"the generator exited {code} (see above).")


def run_generator(args: Sequence[str] = ()) -> int:
    """The certificate generator; returns its exit code (explained if not 0)."""
    log(f"Certificates: {GENERATOR}{' ' + ' '.join(args) if args else ''}")
    code = subprocess.run([sys.executable, str(PROJECT_ROOT / GENERATOR), *args], cwd=PROJECT_ROOT).returncode
    explain_generator_exit(code)
    return code


# -- commands --------------------------------------------------------------------------------------------


def cmd_certs(args: list[str]) -> int:
    ensure_env_file()
    return run_generator(args)


def cmd_native(args: list[str]) -> int:
    ensure_env_file()
    packages.ensure_commands(["mosquitto"])
    code = run_generator()
    if code:
        return code
    os.environ.setdefault("MOSQUITTO_BIN", find_command("mosquitto") or "mosquitto")
    log(f"Starting the lab natively (Ctrl-C stops everything); dashboard at {dashboard_url()}")
    login_hint()
    from .native import main as native_main

    return native_main(args)


def cmd_auto(args: list[str]) -> int:
    from . import dockerlab

    engine = dockerlab.DockerEngine()
    if engine.reachable():
        print(
            "Docker engine found (docker info answers): running the lab in containers; "
            "./setup.sh native runs it without Docker.",
            flush=True,
        )
        return dockerlab.up(engine, [])
    print(
        f"No Docker engine answers ({engine.error}): running the lab natively; start Docker and run "
        "./setup.sh docker for containers.",
        flush=True,
    )
    return cmd_native(args)


def cmd_docker(args: list[str]) -> int:
    from . import dockerlab

    return dockerlab.up(dockerlab.DockerEngine(), args)


def stop_native(pid_file: Path) -> None:
    """Stop the processes of a native run listed in `pid_file`: the runner first (it stops its children in
    order), then SIGTERM to whatever is left and SIGKILL after STOP_TIMEOUT; the file is removed."""
    from .supervisor import pid_alive, read_pids

    entries = [(pid, name) for pid, name in read_pids(pid_file) if pid > 1]
    runner = next((pid for pid, name in entries if name == "runner"), None)
    if runner is not None and pid_alive(runner):
        log(f"Asking the native lab runner (PID {runner}) to stop everything")
        signal_all([runner], signal.SIGTERM)
        wait_gone([runner], STOP_RUNNER_TIMEOUT)
    alive = [pid for pid, _ in entries if pid_alive(pid)]
    if not alive:
        info(f"no process of {pid_file} is still running")
    else:
        log(f"Stopping the native lab (PIDs {' '.join(map(str, alive))})")
        signal_all(alive, signal.SIGTERM)
        for pid in wait_gone(alive, STOP_TIMEOUT):
            warn(f"PID {pid} ignored SIGTERM for {STOP_TIMEOUT:.0f} s: sending SIGKILL")
            signal_all([pid], signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until none of `pids` runs, at most `timeout` seconds; returns those still running."""
    from .supervisor import pid_alive

    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if pid_alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def pid_file() -> Path:
    data_dir = Path(setting("DATA_DIR", "data"))
    return (data_dir if data_dir.is_absolute() else PROJECT_ROOT / data_dir) / "lab.pids"


def cmd_down(args: list[str]) -> int:
    from . import dockerlab

    stopped = dockerlab.down(dockerlab.DockerEngine())
    if pid_file().exists():
        stop_native(pid_file())
        stopped = True
    if not stopped:
        print(f"Nothing is running: no Docker lab and no {pid_file()} from a native run.")
    return 0


def port_listens(host: str, port: str) -> bool:
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except (OSError, ValueError):
        return False


def cmd_status(args: list[str]) -> int:
    from . import dockerlab
    from .supervisor import pid_alive, read_pids

    log(f"Certificates: {GENERATOR} --check")
    code = subprocess.run([sys.executable, str(PROJECT_ROOT / GENERATOR), "--check"], cwd=PROJECT_ROOT).returncode
    if code == 0:
        info("certificates: all present and valid")
    else:
        info(f"certificates: --check exited {code}: the table above says what needs attention and what to do")
    log("Services")
    broker_port = setting("BROKER_PORT", "8883")
    where = "listening on" if port_listens("127.0.0.1", broker_port) else "nothing listens on"
    info(f"broker:    {where} 127.0.0.1:{broker_port}")
    host, port = local_host_for(setting("DASHBOARD_HOST", "127.0.0.1")), setting("DASHBOARD_PORT", "5000")
    if port_listens(host, port):
        info(f"dashboard: listening, {dashboard_url()}")
    else:
        info(f"dashboard: nothing listens on {host}:{port}")
    dockerlab.status(dockerlab.DockerEngine())
    if pid_file().exists():
        info(f"native:    processes from {pid_file()}:")
        for pid, name in read_pids(pid_file()):
            info(f"           {pid} {name} ({'running' if pid_alive(pid) else 'not running'})")
    return code


def version_of(command: Sequence[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown version"
    found = re.search(r"[0-9]+(\.[0-9]+)+", result.stdout + result.stderr)
    return found.group(0) if found else "unknown version"


def cmd_test(args: list[str]) -> int:
    # curl: the EST tests use it as a real client (RFC 7030's own examples do). redis-server and nginx: the
    # dashboard-replica tests run two dashboards over a real Redis behind a real nginx (tests/test_scale.py).
    packages.ensure_commands(
        ["mosquitto", "mosquitto_pub", "chromium", "docker-compose", "curl", "redis-server", "nginx"]
    )
    # Playwright's bundled driver (node) needs libatomic1; the Docker lab test needs an engine (docker.io) and
    # debootstrap for its base images; the database tests a PostgreSQL server; the ACME test runs Debian's certbot.
    # On systems without apt those tests skip (they fail under CI).
    packages.ensure_debian_packages(["libatomic1", "openssl", "docker.io", "debootstrap", "postgresql", "certbot"])
    mosquitto, chromium = find_command("mosquitto") or "mosquitto", find_command("chromium") or "chromium"
    log(
        f"Using mosquitto {version_of([mosquitto, '-h'])} ({mosquitto}), "  # -h prints the version, exits 3
        f"Chromium {version_of([chromium, '--version'])} ({chromium})"
    )
    # Where the tests find them, also off PATH (Debian keeps mosquitto in /usr/sbin).
    os.environ.setdefault("MOSQUITTO_BIN", mosquitto)
    os.environ.setdefault("CHROMIUM_PATH", chromium)
    log(f"Running the test suite: pytest{' ' + ' '.join(args) if args else ''}")
    sys.stdout.flush()
    os.chdir(PROJECT_ROOT)
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *args])  # noqa: S606 - pytest becomes this process


def cmd_lock(args: list[str]) -> int:
    """The locks from the requirements files, with uv (a dev dependency): every transitive dependency pinned with
    its hashes, for every platform. Run it after changing a requirements file, and commit the locks."""
    uv = Path(sys.executable).parent / "uv"
    if not uv.exists():
        raise Failure(f"{uv} is missing: it comes with requirements-dev.txt (re-run ./setup.sh lock)")
    for lock, inputs in LOCKS.items():
        log(f"Locking {' '.join(inputs)} -> {lock}")
        command = [
            str(uv),
            "pip",
            "compile",
            "--quiet",
            "--universal",
            "--python-version",
            "3.11",
            "--generate-hashes",
            "--custom-compile-command",
            "./setup.sh lock",
            "-o",
            lock,
            *inputs,
        ]
        if subprocess.run(command, cwd=PROJECT_ROOT).returncode != 0:
            raise Failure(f"uv pip compile failed for {lock} (see above).")
    log(f"Done: commit {', '.join(LOCKS)}")
    return 0


def cmd_lock_file(args: list[str]) -> int:
    print(lock_file())
    return 0


# The commands `./setup.sh` hands over (its usage text lists them; tests/test_setup.py checks that both name the
# same ones). "" is `./setup.sh` alone; `lock-file` is setup.sh's own question, not a user's command.
COMMANDS = {
    "": cmd_auto,
    "test": cmd_test,
    "lock": cmd_lock,
    "certs": cmd_certs,
    "native": cmd_native,
    "docker": cmd_docker,
    "down": cmd_down,
    "status": cmd_status,
    "lock-file": cmd_lock_file,
}
TAKES_ARGS = ("test", "certs", "native", "docker")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command not in COMMANDS:
        error(f"unknown command: {command} (./setup.sh --help lists them)")
        return 2
    if rest and command not in TAKES_ARGS:
        error(f"{command or './setup.sh'} takes no arguments")
        return 2
    os.chdir(PROJECT_ROOT)
    try:
        return COMMANDS[command](rest)
    except MissingPackages as ex:
        error(*str(ex).splitlines())
        return 1
    except Failure as ex:
        error(*ex.lines)
        return ex.code


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: lab.dockerlab imports lab.control (its Failure and all).
    from lab import control

    sys.exit(control.main())

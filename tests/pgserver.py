"""A real PostgreSQL server for the tests, started and stopped by them (as they do Mosquitto).

Debian's server binaries (`apt-get install postgresql`, which `./setup.sh test` does) run from a temporary data
folder, listening on a Unix socket in that folder only (no TCP port at all), with trust authentication: nothing
outside this machine's root, and the test run itself, can reach it. PostgreSQL refuses to run as root, so as
root it runs as the `postgres` user the package creates. Each test gets a database of its own.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

POSTGRES_ROOT = Path("/usr/lib/postgresql")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (the reason says what to install)."""


def server_bindir() -> Path:
    versions = sorted(
        (p for p in POSTGRES_ROOT.glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        raise PostgresUnavailable("PostgreSQL's server is not installed (apt-get install postgresql)")
    return versions[-1]


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = server_bindir()
        # Short: the socket path (<root>/.s.PGSQL.5432) must fit in 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="labpg-", dir="/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._names = itertools.count(1)
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root needs runuser (util-linux) to start PostgreSQL")
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self._as_user, *argv], capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def start(self) -> PostgresServer:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "lab",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        options = f"-c listen_addresses='' -k {self.root} -c max_connections=200"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "start",
        )
        self._psql("postgres", "CREATE DATABASE lab")
        return self

    def url(self, schema: str) -> str:
        return f"postgresql+psycopg://lab@/lab?host={self.root}&options=-csearch_path%3D{schema}"

    def create_database(self) -> str:
        """A new empty database of its own (a schema of the `lab` database: as separate as a database for the
        lab's tables, and made in milliseconds); its SQLAlchemy URL."""
        name = f"test_{next(self._names)}"
        self._psql("lab", f'CREATE SCHEMA "{name}"')
        return self.url(name)

    def _psql(self, database: str, sql: str) -> None:
        self._run(
            str(self.bindir / "psql"),
            "-h",
            str(self.root),
            "-U",
            "lab",
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            sql,
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [*self._as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)

"""Certificates and keys on disk: one folder per entity, atomic writes, restrictive modes, a lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

KEY_MODE = 0o600
CERT_MODE = 0o644
KEY_DIR_MODE = 0o700
ROOT_CA_DIR = "root_ca"
POLICY_DIR = "policy"
LOCK_FILE = ".lock"


def atomic_write(path: Path, data: bytes, mode: int = CERT_MODE) -> bool:
    """Write via a temp file in the same folder, fsync, rename; returns False if the bytes were already there.

    A reader never sees a half-written file, and a crash leaves the old file in place.
    """
    path = Path(path)
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return True


def remove_temp_files(certs_dir: Path) -> list[Path]:
    """Delete what `atomic_write` leaves behind when its process is killed before the rename (a certificate or a
    private key in `.<name>.<random>.tmp`). Call it holding the lock every writer of `certs_dir` takes."""
    removed = []
    for path in [*Path(certs_dir).glob(".*.tmp"), *Path(certs_dir).glob("*/.*.tmp")]:
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as ex:  # some filesystems refuse fsync on a directory
        if ex.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def ensure_dir(path: Path, mode: int = KEY_DIR_MODE) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if (path.stat().st_mode & 0o777) != mode:
        os.chmod(path, mode)
    return path


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise writers (two generator runs, the generator and the CA service) on one file lock."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class CertsLayout:
    """Where everything lives under the certificates folder (see the README's certificate layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_dir = root / ROOT_CA_DIR
        self.ca_cert = self.ca_dir / "root_ca.crt"
        self.ca_key = self.ca_dir / "root_ca.key"
        self.crl = self.ca_dir / "crl.pem"
        self.lock = root / LOCK_FILE

    def __repr__(self) -> str:
        return f"CertsLayout({self.root!r})"

    def entity_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith(".") or name in (ROOT_CA_DIR, POLICY_DIR):
            raise ValueError(f"{name!r} cannot be an entity folder name")
        return self.root / name

    def cert(self, name: str) -> Path:
        return self.entity_dir(name) / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.entity_dir(name) / f"{name}.key"

    def ca_copy(self, name: str) -> Path:
        """The root certificate distributed next to an entity's own pair."""
        return self.entity_dir(name) / "root_ca.crt"


class WriterLock:
    """What every writer of a certificates folder holds: a lock for the threads of this process, then the file lock
    for the other processes (the generator, other CA replicas)."""

    def __init__(self, lock_path: Path) -> None:
        self.path = lock_path
        self._threads = threading.Lock()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._threads, exclusive_lock(self.path):
            yield


def read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class FileSnapshot:
    """A small file's bytes, read again only when its inode, size or mtime changed.

    For files read on every request (the root certificate, the broker ACL): a stat is much cheaper than
    open + read + close, and every writer here replaces files by rename (`atomic_write`), which changes the
    inode, so a new version is never missed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._key: tuple[int, int, int] | None = None
        self._data: bytes | None = None

    def read(self) -> bytes | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._key:
            # Read after the stat: if the file is replaced in between, the next call sees a new key.
            self._data, self._key = read_optional(self.path), key
        return self._data

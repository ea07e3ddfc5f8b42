"""The CA's internal HTTP port: how the dashboard forwards `/v1/ssl/*` and why the CA may believe it.

The dashboard authenticates its callers (sessions, API tokens, CSRF, the Host check: dashboard/auth.py) and
forwards each `/v1/ssl/*` request to a CA replica's internal port (CA_INTERNAL_PORT, plain HTTP on 127.0.0.1
natively, on the compose network in Docker, never published). It sends the body unchanged and two facts the CA
cannot see for itself: the operator the dashboard proved (if any) and the address the dashboard's client
connected from (the lockout counts per address). The CA believes them only from a caller that knows the
internal secret, a random key that only the dashboard and the CA read (`data/ca-internal.secret`, 0600, made
by whichever starts first; `CA_INTERNAL_SECRET` overrides it). Without it every request on the internal port
is refused (401): a local process gets nothing from the CA port that it could not get from the dashboard's.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from pki.config import Settings, lab_environ
from pki.store import KEY_MODE, atomic_write, read_optional

SECRET_FILE = "ca-internal.secret"  # noqa: S105 - a file name, not a secret
SECRET_HEADER = "X-IoTCA-Internal"  # noqa: S105 - a header name
OPERATOR_HEADER = "X-IoTCA-Operator"
SOURCE_HEADER = "X-IoTCA-Source"
DEFAULT_INTERNAL_PORT = 5100
# The POST operations under /v1/ssl/: the dashboard forwards each to the same path here (ca/http.py).
OPERATIONS = ("sign", "create", "revoke", "tokens")


def secret_path(settings: Settings) -> Path:
    return settings.data_dir / SECRET_FILE


def internal_secret(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """CA_INTERNAL_SECRET, else the data folder's secret, created (0600, atomically) when missing."""
    env = lab_environ() if environ is None else environ
    configured = (env.get("CA_INTERNAL_SECRET") or "").strip()
    if configured:
        return configured
    path = secret_path(settings)
    existing = _stored(path)
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = secrets.token_urlsafe(32)
    # Two processes starting at once: O_EXCL lets exactly one write it; the other reads the winner's.
    try:
        fd = os.open(path.with_suffix(".new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
    except FileExistsError:
        return _wait_for(path)
    try:
        os.close(fd)
        atomic_write(path, candidate.encode(), KEY_MODE)
    finally:
        path.with_suffix(".new").unlink(missing_ok=True)
    return candidate


def _stored(path: Path) -> str:
    """The secret in `path`, or "" while there is none."""
    return (read_optional(path) or b"").decode().strip()


def _wait_for(path: Path, attempts: int = 200) -> str:
    for _ in range(attempts):
        value = _stored(path)
        if value:
            return value
        time.sleep(0.01)
    raise RuntimeError(f"{path} is being created by another process that never finished; remove {path}.new")


def secret_matches(presented: str | None, secret: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), secret.encode())


def ca_urls(environ: Mapping[str, str] | None = None) -> list[str]:
    """CA_URLS (comma-separated), else one replica on 127.0.0.1:CA_INTERNAL_PORT."""
    env = lab_environ() if environ is None else environ
    urls = [u.strip().rstrip("/") for u in (env.get("CA_URLS") or "").split(",") if u.strip()]
    return urls or [f"http://127.0.0.1:{internal_port(env)}"]


def internal_port(environ: Mapping[str, str] | None = None) -> int:
    """CA_INTERNAL_PORT (default 5100): the port of this replica's internal API (the runner gives each its own)."""
    env = lab_environ() if environ is None else environ
    raw = (env.get("CA_INTERNAL_PORT") or "").strip()
    return int(raw) if raw.isdigit() else DEFAULT_INTERNAL_PORT

"""The files the broker reads: its config, the topic ACL and the CRL; written atomically, then a reload.

Templates live in `mosquitto/`; the rendered copies go under the certificates folder:
`certs/mosquitto/mosquitto.conf` (native paths), `certs/mosquitto/mosquitto.docker.conf` (container paths)
and `certs/policy/{acl,crl.pem}`, the part the CA service rewrites when it revokes.

The CRL exists twice: `certs/policy/crl.pem` is the published one (`GET /v1/ssl/crl`), and
`certs/mosquitto/crl.pem` is the one the broker enforces. Both are only ever replaced by a CRL that parsed and
verified against the root (`write_crl`), but only the published one is anybody else's business: whatever
happens to it (damaged, emptied, deleted), a broker reload keeps enforcing the last good CRL, because Mosquitto
2.0.11 runs with no revocation check at all when its crlfile is unreadable at a reload (it refuses to start
without one, which fails closed). `crl_needs_refresh` sees a damaged copy and the CA rewrites both.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterable
from pathlib import Path
from string import Template
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .authority import CertificateAuthority, utcnow
from .config import PROJECT_ROOT, Settings
from .identity import mac_as_written
from .store import CERT_MODE, POLICY_DIR, atomic_write, ensure_dir
from .tls import TLS12_CIPHERS, TLS13_CIPHERSUITES

log = logging.getLogger(__name__)

TEMPLATES = PROJECT_ROOT / "mosquitto"
# The CRL is valid for CRL_LIFETIME and rewritten once less than CRL_REFRESH_BEFORE is left:
# an expired CRL locks every client out (Mosquitto #1826), so it must never get close.
CRL_LIFETIME = dt.timedelta(days=30)
CRL_REFRESH_BEFORE = dt.timedelta(days=20)

# Where the certificate folders are mounted inside the broker container (docker-compose.yml).
DOCKER_CERTS = "/mosquitto/certs"
DOCKER_POLICY = "/mosquitto/policy"
DOCKER_DATA = "/mosquitto/data"
# The CA role's lines in the ACL (acl.template), one block per CA replica identity (`ca_identities`).
CA_BLOCK = """user {name}
topic read ssl/#
topic write ssl/#
topic write $CONTROL/dynamic-security/v1
topic read $CONTROL/dynamic-security/v1/response
topic write iot/thermometer/+/status

"""
# The dynamic-security plugin of Debian's mosquitto package, in the broker image (mosquitto/Dockerfile links it).
DOCKER_DYNSEC_PLUGIN = "/usr/local/lib/mosquitto_dynamic_security.so"
# Where packages install it natively (Debian/Ubuntu multiarch, Fedora, Homebrew); MOSQUITTO_DYNSEC_PLUGIN first.
DYNSEC_PLUGIN_GLOBS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/opt/homebrew/lib/mosquitto_dynamic_security.so",
)
# The plugin's own state file: it defines no clients (every identity keeps the acl_file permissions) and is
# only used to disconnect revoked identities (`disconnect_command`). The plugin rewrites it after each command,
# so it lives in the broker's writable data folder; written here only when missing.
DYNSEC_FILE = "dynamic-security.json"
DYNSEC_INITIAL = (
    '{"defaultACLAccess": {"publishClientSend": false, "publishClientReceive": false, "subscribe": false, '
    '"unsubscribe": true}, "clients": [], "groups": [], "roles": []}\n'
)
# What the telemetry ingest identities may read (and nothing else): every device's readings and presence.
TELEMETRY_TOPICS = "iot/thermometer/+/temperature"
PRESENCE_TOPICS = "iot/thermometer/+/status"
# The control topic of the plugin. Only the CA's identities (`ca_identities`) may write it (mosquitto/acl.template).
DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"


class BrokerConfigError(RuntimeError):
    """The broker's files could not be written safely; the old ones stay in place."""


class BrokerFiles:
    """Where the broker's files live: its config and the policy (ACL, CRL) under the certificates folder, its
    state (persistence, dynamic-security, PID) under the data folder."""

    def __init__(self, certs_dir: Path, data_dir: Path) -> None:
        self.certs_dir, self.data_dir = certs_dir, data_dir
        self.folder = certs_dir / "mosquitto"
        self.policy_dir = certs_dir / POLICY_DIR
        self.conf = self.folder / "mosquitto.conf"
        self.docker_conf = self.folder / "mosquitto.docker.conf"
        self.acl = self.policy_dir / "acl"
        # The published CRL (GET /v1/ssl/crl; what the generator and --check read) ...
        self.crl = self.policy_dir / "crl.pem"
        # ... and the one the broker enforces: the last good one, written only by `write_crl`.
        self.broker_crl = self.folder / "crl.pem"
        self.persistence_dir = data_dir / "mosquitto"
        self.dynsec_file = self.persistence_dir / DYNSEC_FILE
        self.pid_file = data_dir / "mosquitto.pid"

    def __repr__(self) -> str:
        return f"BrokerFiles({self.certs_dir!r}, {self.data_dir!r})"


def render_config(
    files: BrokerFiles,
    *,
    port: int,
    bind_address: str = "127.0.0.1",
    docker: bool = False,
    persistence: bool = True,
) -> str:
    """mosquitto.conf for running natively (absolute host paths) or in the broker container."""
    if docker:
        values = {
            "cafile": f"{DOCKER_CERTS}/root_ca.crt",
            "certfile": f"{DOCKER_CERTS}/mosquitto.crt",
            "keyfile": f"{DOCKER_CERTS}/mosquitto.key",
            "acl_file": f"{DOCKER_POLICY}/acl",
            "crlfile": f"{DOCKER_CERTS}/crl.pem",
            "pid_file": f"{DOCKER_DATA}/mosquitto.pid",
            "persistence_location": f"{DOCKER_DATA}/",
            # The container runs as LAB_UID; if that is 0, root must not switch to `mosquitto` (who cannot
            # read the keys). For any other uid Mosquitto ignores this line.
            "user_line": "user root",
            "dynsec_lines": dynsec_lines(DOCKER_DYNSEC_PLUGIN, f"{DOCKER_DATA}/{DYNSEC_FILE}"),
        }
    else:
        values = {
            "cafile": str(files.folder / "root_ca.crt"),
            "certfile": str(files.folder / "mosquitto.crt"),
            "keyfile": str(files.folder / "mosquitto.key"),
            "acl_file": str(files.acl),
            "crlfile": str(files.broker_crl),
            "pid_file": str(files.pid_file),
            "persistence_location": f"{files.persistence_dir}/",
            # Started as root, Mosquitto switches to the `mosquitto` user, which cannot read the 0600 keys in
            # the 0700 folders: stay root then. Started as anyone else it never switches (no line needed).
            "user_line": "user root" if os.geteuid() == 0 else "",
            "dynsec_lines": dynsec_lines(find_dynsec_plugin(), str(files.dynsec_file)),
        }
    template = Template((TEMPLATES / "mosquitto.conf.template").read_text())
    return template.substitute(
        values,
        port=port,
        bind_address=bind_address,
        persistence="true" if persistence else "false",
        tls12_ciphers=TLS12_CIPHERS,
        tls13_ciphersuites=TLS13_CIPHERSUITES,
    )


def find_dynsec_plugin() -> str | None:
    """The dynamic-security plugin shipped with the system's mosquitto (MOSQUITTO_DYNSEC_PLUGIN first)."""
    explicit = os.environ.get("MOSQUITTO_DYNSEC_PLUGIN")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    for pattern in DYNSEC_PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def dynsec_lines(plugin: str | None, state_file: str) -> str:
    if plugin is None:  # the native runner says so when it starts the broker (lab/native.py)
        return "# (the dynamic-security plugin was not found: revoked connections stay open, denied every topic)"
    return f"plugin {plugin}\nplugin_opt_config_file {state_file}"


def disconnect_command(name: str) -> bytes:
    """The plugin command that closes `name`'s connections now: define the client, then delete it.

    Deleting a client disconnects it ("disconnected by administrative action"), and leaves the plugin with no
    client definitions, so `acl_file` keeps deciding every permission. It does not stop a reconnect (the plugin
    skips its password check for certificate identities): the CRL, reloaded before, refuses that.
    """
    return json.dumps(
        {"commands": [{"command": "createClient", "username": name}, {"command": "deleteClient", "username": name}]}
    ).encode()


def ca_identities(replicas: int) -> list[str]:
    """The broker identities of the CA service replicas: `ca-1` ... `ca-<replicas>` (CA_REPLICAS)."""
    return [f"ca-{n}" for n in range(1, max(1, replicas) + 1)]


def render_acl(
    denied_names: Iterable[str] = (),
    collectors: Iterable[str] = (),
    ca_replicas: int = 1,
    ingest: Iterable[str] = ("ingest-1",),
) -> str:
    """The ACL; `denied_names` (revoked identities) get a `topic deny #` block that beats every pattern.

    `collectors`: identities named by a MAC address (`pki.identity.mac_as_written`); each may also read its reply
    topic as the seed writes it, `ssl/AA:BB:CC:DD:EE:01` (its CN, the `%u` of the patterns, has no colons).
    `ingest`: the telemetry ingest identities (Settings.ingest_identities); each may read telemetry, nothing else.
    """
    denied = set(denied_names)
    blocks = "".join(f"user {name}\ntopic deny #\n\n" for name in sorted(denied))
    grants = "".join(
        f"user {name}\ntopic read ssl/{written}\n\n"
        for name in sorted(set(collectors))
        if name not in denied and (written := mac_as_written(name))
    )
    readers = "".join(
        f"user {name}\ntopic read {TELEMETRY_TOPICS}\ntopic read {PRESENCE_TOPICS}\n\n"
        for name in sorted(set(ingest))
        if name not in denied
    )
    return Template((TEMPLATES / "acl.template").read_text()).substitute(
        revoked_blocks=blocks or "\n",
        collector_blocks=grants or "\n",
        ca_blocks="".join(CA_BLOCK.format(name=name) for name in ca_identities(ca_replicas)),
        ingest_blocks=readers or "\n",
    )


def crl_needs_refresh(
    path: Path, ca: CertificateAuthority, now: dt.datetime | None = None, enforced: Path | None = None
) -> bool:
    """True when the CRL at `path` is unreadable, not this root's, due, or differs from the `enforced` copy."""
    now = now or utcnow()
    try:
        data = path.read_bytes()
        crl = x509.load_pem_x509_crl(data)
        if enforced is not None and enforced.read_bytes() != data:
            return True
    except (OSError, ValueError):
        return True
    if crl.issuer != ca.certificate.subject or not crl.is_signature_valid(ca.certificate.public_key()):
        return True
    next_update = crl.next_update_utc
    return next_update is None or next_update - now < CRL_REFRESH_BEFORE


def crl_revocations(path: Path, ca: CertificateAuthority) -> dict[int, dt.datetime]:
    """Serial -> revocation time listed in the CRL at `path`, if it is a CRL of this root; else {}.

    Lets the generator keep revocations another inventory made (a Docker run's, for instance).
    """
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if crl.issuer != ca.certificate.subject or not crl.is_signature_valid(ca.certificate.public_key()):
        return {}
    return {entry.serial_number: entry.revocation_date_utc for entry in crl}


def current_crl_number(path: Path) -> int:
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except (OSError, ValueError, x509.ExtensionNotFound):
        return 0


def write_crl(
    files: BrokerFiles,
    ca: CertificateAuthority,
    revoked: Iterable[tuple[Any, ...]],
    now: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """Build, check (parses, signed by the root, not expired), then atomically replace the CRL."""
    now = now or utcnow()
    ensure_dir(files.policy_dir, 0o755)
    revoked = list(revoked)
    number = max(current_crl_number(files.crl), current_crl_number(files.broker_crl)) + 1  # never goes back
    crl = ca.build_crl(revoked, crl_number=number, next_update=CRL_LIFETIME, now=now)
    data = crl.public_bytes(serialization.Encoding.PEM)
    check = x509.load_pem_x509_crl(data)
    if not check.is_signature_valid(ca.certificate.public_key()) or check.issuer != ca.certificate.subject:
        raise BrokerConfigError("the new CRL does not verify against the root; the old one was kept")
    if check.next_update_utc is None or check.next_update_utc <= now:
        raise BrokerConfigError("the new CRL would already be expired; the old one was kept")
    if len(list(check)) != len({entry[0] for entry in revoked}):
        raise BrokerConfigError("the new CRL lost entries; the old one was kept")
    # The broker's copy first: what it enforces is never behind what is published.
    ensure_dir(files.folder)
    atomic_write(files.broker_crl, data, CERT_MODE)
    atomic_write(files.crl, data, CERT_MODE)
    return crl


def write_broker_configs(settings: Settings) -> bool:
    """Render mosquitto.conf (native paths) and mosquitto.docker.conf; True when the native one changed.

    Only the generator calls this: the CA service, which may run inside the dashboard container with other
    paths, rewrites the policy (ACL, CRL) alone.
    """
    files = BrokerFiles(settings.certs_dir, settings.data_dir)
    ensure_dir(files.folder)
    ensure_dir(files.persistence_dir)
    native = render_config(files, port=settings.broker_port, bind_address=settings.broker_bind)
    changed = atomic_write(files.conf, native.encode(), CERT_MODE)
    docker = render_config(files, port=8883, bind_address="0.0.0.0", docker=True)  # noqa: S104 - inside the container
    atomic_write(files.docker_conf, docker.encode(), CERT_MODE)
    if not files.dynsec_file.exists():  # the plugin owns it from then on (mosquitto/entrypoint.sh does the same)
        atomic_write(files.dynsec_file, DYNSEC_INITIAL.encode(), CERT_MODE)
    return changed


def write_broker_policy(
    settings: Settings,
    ca: CertificateAuthority,
    revoked: Iterable[tuple[Any, ...]],
    denied_names: Iterable[str],
    *,
    force_crl: bool = False,
    collectors: Iterable[str] = (),
) -> bool:
    """Write the ACL and (when its content changed or it is due) the CRL; True when either changed."""
    files = BrokerFiles(settings.certs_dir, settings.data_dir)
    ensure_dir(files.policy_dir, 0o755)
    acl = render_acl(denied_names, collectors, settings.ca_replicas, ingest=settings.ingest_identities)
    changed = atomic_write(files.acl, acl.encode(), CERT_MODE)
    revoked = list(revoked)
    listed = {entry[0] for entry in revoked}
    if force_crl or crl_needs_refresh(files.crl, ca, enforced=files.broker_crl) or crl_serials(files.crl) != listed:
        write_crl(files, ca, revoked)
        changed = True
    return changed


def crl_serials(path: Path) -> set[int]:
    try:
        return {entry.serial_number for entry in x509.load_pem_x509_crl(path.read_bytes())}
    except (OSError, ValueError):
        return set()


def reload_broker(files: BrokerFiles) -> bool:
    """SIGHUP the native broker so it re-reads the ACL and CRL; False when none runs from this lab.

    In Docker the broker container watches certs/policy itself (no Docker socket anywhere).
    """
    try:
        pid = int(files.pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("not allowed to signal the broker (pid %s) to reload its ACL and CRL", pid)
        return False
    return True


def find_mosquitto() -> str | None:
    """The broker binary: MOSQUITTO_BIN, PATH, then the sbin folders packages install it into."""
    candidates = [os.environ.get("MOSQUITTO_BIN"), shutil.which("mosquitto")]
    candidates += ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def broker_command(files: BrokerFiles) -> list[str]:
    """argv that runs Mosquitto on the rendered config, with its log line-buffered (it is not on a pipe)."""
    binary = find_mosquitto()
    if binary is None:
        raise BrokerConfigError(
            "mosquitto is not installed: ./setup.sh installs it, or install the 'mosquitto' package "
            "(apt-get install mosquitto / brew install mosquitto)"
        )
    stdbuf = shutil.which("stdbuf")
    return [*([stdbuf, "-oL"] if stdbuf else []), binary, "-c", str(files.conf)]

"""Who may hold which identity: the lab's protected CNs and the names of its own services.

The broker identity of a certificate is its subject CN (Mosquitto's user name and client id), and the CN of
everything the CA API issues is the normalised entity name. These rules keep that identity with one entity:

- a protected identity (the lab's own: `root_ca`, `mosquitto`, `dashboard`, `provisioner`, `policy`, the CA
  service `ca` / `ca-<n>`, ingest services `ingest` / `ingest-<n>`; compared case-insensitively) is never
  issued through the API, whatever the field (`name`, `cn`, a CSR's subject or SANs);
- the names clients use to reach the lab's own servers (`localhost`, `mosquitto`, `dashboard`, any loopback
  address, `BROKER_ADDRESS`, `BROKER_SANS`) never appear in the SANs of another certificate.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from .config import Settings
from .profiles import PROTECTED_NAMES

# The CA service replicas and telemetry ingest services: `ca`, `ca-2`, `ingest`, `ingest-3`, ...
_SERVICE_IDENTITY_RE = re.compile(r"(ca|ingest)(-[0-9]+)?", re.IGNORECASE)
# Host names of the lab's own servers, whatever the settings say.
SERVICE_HOST_NAMES = frozenset({"localhost", "mosquitto", "dashboard"})


def is_protected_identity(name: str) -> bool:
    """A CN the lab's own services use; case-insensitive (folders clash on case-insensitive disks)."""
    return name.lower() in PROTECTED_NAMES or bool(_SERVICE_IDENTITY_RE.fullmatch(name))


_MAC_RE = re.compile(r"[0-9A-Fa-f]{12}")


def mac_as_written(name: str) -> str | None:
    """`AABBCCDDEE01` -> `AA:BB:CC:DD:EE:01`: the name a collector writes, and its reply topic `ssl/<that>`.

    The broker's `%u` is the CN (colons removed), so the ACL grants each collector this topic by name.
    """
    if not _MAC_RE.fullmatch(name):
        return None
    return ":".join(name[i : i + 2] for i in range(0, 12, 2))


def reserved_host_names(settings: Settings | None) -> frozenset[str]:
    """Lower-cased DNS names and IP addresses that only the broker and dashboard certificates carry."""
    names = set(SERVICE_HOST_NAMES)
    if settings is not None:
        names.update(n.strip().lower() for n in [settings.broker_address, *settings.broker_sans] if n.strip())
    return frozenset(names)


def is_reserved_san(value: str, settings: Settings | None) -> bool:
    """Whether `value` (a DNS name or an IP address) may not be issued to an API entity."""
    text = value.strip().lower().rstrip(".")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is not None:
        reserved_ips = {ipaddress.ip_address(n) for n in reserved_host_names(settings) if _is_ip(n)}
        return address.is_loopback or address.is_unspecified or address in reserved_ips
    return text in reserved_host_names(settings) or is_protected_identity(text)


def reserved_sans(values: Iterable[str], settings: Settings | None) -> list[str]:
    return [v for v in values if is_reserved_san(v, settings)]


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True

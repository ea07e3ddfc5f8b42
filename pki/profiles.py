"""Certificate profiles as data: what each role's certificate must carry.

The builders in `authority.py` read these; nothing else decides key usage, EKU or SANs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

# RFC 5280 4.1.2.5: devices with a slightly wrong clock must still accept a fresh certificate,
# so every certificate's notBefore is back-dated a few minutes.
BACKDATE = dt.timedelta(minutes=5)
ROOT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 365
DEFAULT_RENEW_BEFORE_DAYS = 30

ROOT_CA_COMMON_NAME = "IoT Lab Root CA"
ORGANIZATION = "IoT CA Lab"


@dataclass(frozen=True)
class Profile:
    """One role's certificate template."""

    role: str
    is_ca: bool = False
    extended_key_usage: tuple[ObjectIdentifier, ...] = ()
    # Fixed SANs every certificate of this role carries, besides those derived from the name.
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    # Whether the common name itself is added as a DNS SAN (when it is a valid host name).
    cn_as_dns: bool = True
    # Roles the generator owns; the CA API refuses to issue these names (HTTP 409).
    protected: bool = False


ROOT_CA = Profile(role="root_ca", is_ca=True, cn_as_dns=False, protected=True)

BROKER = Profile(
    role="broker",
    extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
    dns_names=("localhost", "mosquitto"),
    ip_addresses=("127.0.0.1", "::1"),
    protected=True,
)

DASHBOARD = Profile(
    role="dashboard",
    extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH),
    dns_names=("localhost", "dashboard"),
    ip_addresses=("127.0.0.1",),
    protected=True,
)

DEVICE = Profile(role="device", extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,))

# May request certificates for other names over MQTT and read every reply topic (see the ACL).
PROVISIONER = Profile(role="provisioner", extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,))

# A CA service replica (`ca-<n>`, `python -m ca`): an MQTT client of the broker, nothing more; the generator owns it.
CA_SERVICE = Profile(
    role="ca_service", extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,), cn_as_dns=False, protected=True
)
# The telemetry ingest services (`ingest-<n>`, dashboard/ingest.py): TLS clients that may only read telemetry.
INGEST = Profile(role="ingest", extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,), protected=True)

# Entities issued through the CA API (`v1/ssl/sign`, `v1/ssl/create`): TLS clients only. Only the broker and
# dashboard profiles carry serverAuth, so no certificate the API issues can pose as the lab's broker.
ENTITY = Profile(role="entity", extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,))

# A TLS server certificate for DNS names whose control an ACME order proved (`ca/acme.py`), only for names in the
# operator's allow-list (ACME_ALLOWED_NAMES, default the lab's own server names): the one profile other than the
# broker's and the dashboard's that may name `localhost`, because the operator approved it.
SERVER = Profile(role="server", extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,))

PROFILES = {p.role: p for p in (ROOT_CA, BROKER, DASHBOARD, DEVICE, PROVISIONER, INGEST, ENTITY, SERVER, CA_SERVICE)}

# Entity names the lab's own services use: the API must never re-issue them (`pki.identity` adds the service
# identities `ca`, `ca-<n>`, `ingest`, `ingest-<n>`). `policy` is the folder of the broker's ACL and CRL.
# The words of the CA's own topics as well: an identity named `sign` would read ssl/sign (every request, with its
# passphrase) through the ACL's `pattern read ssl/%u`, and ssl/sign/# through `ssl/%u/#`.
PROTECTED_NAMES = frozenset({"root_ca", "mosquitto", "dashboard", "provisioner", "policy", "sign", "create", "renew"})

"""One value per issuance: what to sign, for whom, with which profile, and what the CA keeps of it.

`CAService` builds an `Issuance` for each operation (a CSR signed, a stored key re-signed, a key created, a device's
renewal, an ACME order) and hands it to its one issuing path, which signs, records the certificate in the inventory
(committed before the certificate leaves the CA or is written anywhere), then writes files where the operation
keeps them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from .authority import PrivateKey, PublicKey, SubjectFields
from .profiles import Profile

# csr: a caller's CSR (the key stays with the caller); resign: the stored key of an entity the CA made, signed again
# (renewal without a CSR); create: a key the CA makes; renew: a device's renewal with a new CSR over MQTT or EST;
# acme: a server certificate for an ACME order.
Kind = Literal["csr", "resign", "create", "renew", "acme"]
# The operations whose key the CA holds: the entity's folder gets the certificate (and the key it made).
WRITES_FILES: frozenset[str] = frozenset({"resign", "create"})


@dataclass(frozen=True)
class Issuance:
    kind: Kind
    name: str  # the entity (its inventory name and folder)
    profile: Profile
    public_key: PublicKey
    cn: str
    days: int
    via: str  # http, mqtt, renew, est, acme, ...
    requester: str
    subject: SubjectFields | None = None
    dns: tuple[str, ...] = ()
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    emails: tuple[str, ...] = ()
    key: PrivateKey | None = None  # create: the key the CA made; resign: the stored key (both in the reply)
    token: str | None = None  # an enrolment token consumed with the record (SHA-256)
    digest: str | None = None  # create: the normalised request's digest, for an identical retry

    @property
    def writes_files(self) -> bool:
        return self.kind in WRITES_FILES

    @property
    def from_csr(self) -> bool:
        return not self.writes_files

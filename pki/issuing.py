"""Issuing: sign (a CSR, or the stored key re-signed), renew, create and ACME server certificates.

`Issuer` is the issuing half of `pki.service.CAService`: each operation validates, authorises (pki/authorisation.py)
and looks up what it needs, then builds one `Issuance` for the one issuing path (pki/issuance.py `IssuingPath`), so a
refused request never writes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.x509.oid import NameOID

from .authorisation import Authoriser
from .authority import (
    CAError,
    PrivateKey,
    SubjectFields,
    generate_private_key,
    load_certificate,
    public_key_matches,
    utcnow,
)
from .config import Settings
from .entity_files import EntityFiles
from .identity import is_reserved_san
from .inventory import REVOKED, Inventory
from .issuance import Issuance, IssuingPath
from .keyholder import KeyHolder, longest_validity
from .profiles import BACKDATE, DEVICE, ENTITY, PROFILES, SERVER, Profile
from .replies import Reply
from .requests import (
    BAD_REQUEST,
    FORBIDDEN,
    NOT_FOUND,
    UNAVAILABLE,
    CreateRequest,
    RenewRequest,
    RequestError,
    SignRequest,
    create_identity,
    normalise_name,
    parse,
    parse_csr,
    refuse_protected,
    refuse_reserved_sans,
)

log = logging.getLogger("pki.service")
R = TypeVar("R", SignRequest, CreateRequest)


def _first_attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attrs = name.get_attributes_for_oid(oid)
    return str(attrs[0].value) if attrs else None


def _subject_of(cert: x509.Certificate) -> SubjectFields:
    subject = cert.subject
    return SubjectFields(
        country=_first_attribute(subject, NameOID.COUNTRY_NAME),
        state=_first_attribute(subject, NameOID.STATE_OR_PROVINCE_NAME),
        locality=_first_attribute(subject, NameOID.LOCALITY_NAME),
        org=_first_attribute(subject, NameOID.ORGANIZATION_NAME),
        unit=_first_attribute(subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        email=_first_attribute(subject, NameOID.EMAIL_ADDRESS),
    )


def _sans_of(cert: x509.Certificate) -> tuple[list[str], list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], [], []
    return (
        san.get_values_for_type(x509.DNSName),
        [str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
        san.get_values_for_type(x509.RFC822Name),
    )


def server_entity_name(dns_name: str) -> str:
    """The inventory name of an ACME server certificate: `acme-<host>` with dots as '_' (an entity name)."""
    return ("acme-" + dns_name.lower().replace(".", "_"))[:64].rstrip("_-")


@dataclass(eq=False)
class Issuer:
    """sign / renew / create / ACME issuance, each ending in the one issuing path."""

    settings: Settings
    inventory: Inventory
    keys: KeyHolder
    gate: Authoriser
    files: EntityFiles
    path: IssuingPath

    def issue_server(self, csr_pem: str, names: list[str], entity: str, days: int, requester: str) -> Reply:
        root = self.keys.root()
        try:
            csr = parse_csr(csr_pem, require_cn=False)
        except ValueError as ex:
            raise RequestError(BAD_REQUEST, f"csr {ex}", "csr") from None
        asked = {n.lower() for n in csr.dns_names} | ({csr.common_name.lower()} if csr.common_name else set())
        if not names or csr.ip_addresses or csr.emails or asked != {n.lower() for n in names}:
            raise RequestError(BAD_REQUEST, "the CSR must name exactly the order's DNS identifiers", "csr")
        ca = self.keys.unlocked()
        if ca is None:
            raise RequestError(UNAVAILABLE, "the CA key is locked: set CA_PASSPHRASE so ACME can issue")
        return self.path.issue(
            ca,
            Issuance(
                "acme",
                entity,
                SERVER,
                csr.public_key,
                cn=names[0],
                dns=tuple(names),
                days=min(days, longest_validity(root)),
                via="acme",
                requester=requester,
            ),
        )

    def _profile_for(self, name: str) -> Profile:
        """Lab devices keep the device profile; everything else the API issues is an `entity`."""
        if name in self.settings.devices or DEVICE.role in self.inventory.roles(name):
            return DEVICE
        return ENTITY

    def _parse_named(self, model: type[R], body: object) -> R:
        """A sign or create body, valid for at most the root's remaining life, for a name that is not protected."""
        request = parse(model, body, max_days=longest_validity(self.keys.root()))
        refuse_protected(request.name)
        return request

    def sign(self, body: object, source: str, via: str, requester: str) -> Reply:
        request = self._parse_named(SignRequest, body)
        csr = request.csr
        if csr is not None:  # a CSR's SANs are checked, not copied blindly
            refuse_reserved_sans([*csr.dns_names, *csr.ip_addresses], self.settings)
        token = None
        if request.token is not None:
            ca, token = self.gate.token(request.token, request.name, source)
        else:
            ca = self.gate.passphrase(request.passphrase, source, request.name)
        # A token enrols a device (client certificate only), whatever the name was before.
        profile = DEVICE if token is not None else self._profile_for(request.name)
        if csr is not None:
            # The key stays with the caller: no file of the entity changes (a lab device keeps a matching key and
            # certificate pair; its old certificate is superseded, and goes on the CRL after the grace).
            return self.path.issue(
                ca,
                Issuance(
                    "csr",
                    request.name,
                    profile,
                    csr.public_key,
                    cn=request.name,
                    dns=tuple(csr.dns_names),
                    ips=tuple(csr.ip_addresses),
                    emails=tuple(csr.emails),
                    days=request.days,
                    via=via,
                    requester=requester,
                    token=token,
                ),
            )
        # No CSR: renewal, i.e. the stored key of an entity the generator or `create` made, re-signed.
        key = self._stored_key(request.name)
        self._refuse_superseded_key(request.name, key)
        current = self._current_certificate(request.name, key)
        subject, dns, ips, emails = None, [], [], []
        if current is not None:
            subject = _subject_of(current)
            dns, ips, emails = self._allowed_sans(current)
        return self.path.issue(
            ca,
            Issuance(
                "resign",
                request.name,
                profile,
                key.public_key(),
                cn=request.name,
                subject=subject,
                dns=tuple(dns),
                ips=tuple(ips),
                emails=tuple(emails),
                days=request.days,
                via=via,
                requester=requester,
                key=key,
            ),
        )

    def renew(self, cn: str, body: object, requester: str) -> Reply:
        """Checks in order (a refusal writes nothing): the name (400/409), the body and its CSR (400), the current
        certificate (404 none, 403 revoked or expired), a new key (400); then sign with the current profile,
        subject, SANs and lifetime. No files are written: the device owns its key and certificate files."""
        root = self.keys.root()
        try:
            name = normalise_name(cn)
        except ValueError as ex:
            raise RequestError(BAD_REQUEST, f"name {ex}", "name") from None
        refuse_protected(name)
        request = parse(RenewRequest, body, max_days=longest_validity(root))
        csr = request.csr
        if csr.common_name != name:
            raise RequestError(
                BAD_REQUEST, f"the CSR's CN must be {name!r}, the CN of the certificate that asks for renewal", "csr"
            )
        record = self.inventory.current(name)
        if record is None:
            latest = self.inventory.latest(name)
            if latest is None:
                raise RequestError(NOT_FOUND, f"no certificate was issued to {name}: enrol it first", "name")
            if latest.status == REVOKED:
                raise RequestError(FORBIDDEN, f"the certificate of {name} is revoked: it cannot be renewed")
            raise RequestError(FORBIDDEN, f"{name} has no current certificate: enrol it again")
        now = utcnow()
        if record.not_after <= now:
            raise RequestError(
                FORBIDDEN,
                f"the certificate of {name} expired on {record.not_after.isoformat()}: "
                "an expired certificate cannot renew; enrol again with a token",
            )
        current = load_certificate(record.pem.encode())
        earlier = (load_certificate(r.pem.encode()) for r in self.inventory.list(name=name))
        if any(public_key_matches(cert, csr.public_key) for cert in earlier):
            raise RequestError(BAD_REQUEST, "the CSR must be for a new key: renewal replaces the key", "csr")
        ca = self.keys.unlocked()
        if ca is None:
            raise RequestError(UNAVAILABLE, "the CA key is locked: set CA_PASSPHRASE so certificates can be renewed")
        # The same lifetime as the current certificate (its notBefore is back-dated by BACKDATE), at most.
        lifetime = current.not_valid_after_utc - current.not_valid_before_utc - BACKDATE
        days = max(1, round(lifetime.total_seconds() / 86400))
        if request.days is not None:
            days = min(days, request.days)
        dns, ips, emails = self._allowed_sans(current)
        reply = self.path.issue(
            ca,
            Issuance(
                "renew",
                name,
                PROFILES.get(record.role, ENTITY),
                csr.public_key,
                cn=name,
                subject=_subject_of(current),
                dns=tuple(dns),
                ips=tuple(ips),
                emails=tuple(emails),
                days=min(days, longest_validity(root)),
                via="renew",
                requester=requester,
            ),
        )
        log.info("renewed %s: serial %s -> %s", name, record.serial, reply.body["serial"])
        return reply

    def _refuse_superseded_key(self, name: str, key: PrivateKey) -> None:
        """Renewal takes only the entity's current certificate: a stored key whose certificate was superseded (the
        entity moved to another key) or revoked is never re-signed (403, nothing changes)."""
        record = self.inventory.current(name)
        if record is not None:
            if not public_key_matches(load_certificate(record.pem.encode()), key):
                raise RequestError(
                    FORBIDDEN,
                    f"the stored key of {name} belongs to a superseded certificate: its "
                    "current certificate has another key; send a csr",
                )
            return
        latest = self.inventory.latest(name)
        if latest is not None and latest.status == REVOKED:
            raise RequestError(
                FORBIDDEN, f"the certificate of {name} is revoked: its key is never re-signed; send a csr for a new key"
            )

    def _allowed_sans(self, cert: x509.Certificate) -> tuple[list[str], list[str], list[str]]:
        """The SANs a renewal carries over: the current certificate's, without any reserved name (`pki.identity`),
        so a certificate issued before the rule existed does not pass a lab server's name on."""
        dns, ips, emails = _sans_of(cert)
        return (
            [d for d in dns if not is_reserved_san(d, self.settings)],
            [i for i in ips if not is_reserved_san(i, self.settings)],
            emails,
        )

    def _stored_key(self, name: str) -> PrivateKey:
        try:
            key = self.files.key(name)
        except CAError:  # includes WrongPassphrase: an encrypted key the CA cannot use
            raise RequestError(NOT_FOUND, f"the stored key of {name} cannot be used: send a csr", "name") from None
        if key is None:
            raise RequestError(NOT_FOUND, f"no stored key for {name}: send a csr, or create the entity first", "name")
        return key

    def _current_certificate(self, name: str, key: PrivateKey) -> x509.Certificate | None:
        """The entity's latest certificate for this key (its subject and SANs carry over into the renewal)."""
        candidates = [self.files.certificate(name)]
        record = self.inventory.current(name)
        if record is not None:
            with contextlib.suppress(CAError):
                candidates.append(load_certificate(record.pem.encode()))
        return next((cert for cert in candidates if cert is not None and public_key_matches(cert, key)), None)

    def create(self, body: object, source: str, via: str, requester: str) -> Reply:
        request = self._parse_named(CreateRequest, body)
        cn, extra_dns = create_identity(request, self.settings)
        ca = self.gate.passphrase(request.passphrase, source, request.name)
        fields = {**request.replay_fields(), "key_type": self.settings.key_type}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        replay = self.path.replay(ca, request.name, digest)
        if replay is not None:
            return replay
        key = generate_private_key(self.settings.key_type)
        subject = SubjectFields(
            country=request.country,
            state=request.state,
            locality=request.locality,
            org=request.org,
            unit=request.unit,
            email=request.email,
        )
        return self.path.issue(
            ca,
            Issuance(
                "create",
                request.name,
                self._profile_for(request.name),
                key.public_key(),
                cn=cn,
                subject=subject,
                dns=tuple(extra_dns),
                emails=(request.email,) if request.email else (),
                days=request.days,
                via=via,
                requester=requester,
                key=key,
                digest=digest,
            ),
        )

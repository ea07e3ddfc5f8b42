"""The certificate authority: keys, the root, issuing leaves, CRLs. Pure cryptography, no I/O."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from .profiles import BACKDATE, ORGANIZATION, ROOT_CA, ROOT_CA_COMMON_NAME, ROOT_CA_DAYS, Profile

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


class CAError(Exception):
    """The CA cannot do what was asked; the message says why and what to do."""


class WrongPassphrase(CAError):
    """The CA key did not decrypt with the given passphrase."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def generate_private_key(key_type: str = "ec") -> PrivateKey:
    """EC P-256 by default; `rsa`/`rsa2048` or `rsa3072` for RSA."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type in ("rsa", "rsa2048"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "rsa3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise CAError(f"unknown key type {key_type!r}; use ec, rsa, rsa2048 or rsa3072")


def key_pem(key: PrivateKey, passphrase: str | None = None) -> bytes:
    """PKCS#8 PEM; encrypted with the best available scheme when a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def load_private_key(data: bytes, passphrase: str | None = None) -> PrivateKey:
    """Load a PEM key; a wrong or missing passphrase raises WrongPassphrase, junk raises CAError."""
    encrypted = b"ENCRYPTED PRIVATE KEY" in data or b"Proc-Type: 4,ENCRYPTED" in data
    if encrypted and not passphrase:
        raise WrongPassphrase("the key is encrypted and no passphrase was given")
    try:
        key = serialization.load_pem_private_key(data, passphrase.encode() if encrypted and passphrase else None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as ex:
        if encrypted:
            raise WrongPassphrase("the passphrase does not decrypt the key") from ex
        raise CAError("not a readable PEM private key") from ex
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError("only EC and RSA keys are supported")
    return key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certificate(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as ex:
        raise CAError("not a readable PEM certificate") from ex


def public_key_matches(cert: x509.Certificate, key: PrivateKey | PublicKey) -> bool:
    """`cert` is for `key`: a private key (is this pair complete?) or a public key (a CSR's: is it a key used before?).

    Compared as DER SubjectPublicKeyInfo, the one encoding both sides have whatever the key type.
    """
    public = key if isinstance(key, PublicKey) else key.public_key()
    fmt, enc = serialization.PublicFormat.SubjectPublicKeyInfo, serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, fmt) == public.public_bytes(enc, fmt)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def serial_hex(cert_or_serial: x509.Certificate | int) -> str:
    serial = cert_or_serial if isinstance(cert_or_serial, int) else cert_or_serial.serial_number
    return format(serial, "x")


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def days_left(cert: x509.Certificate, now: dt.datetime | None = None) -> float:
    return (cert.not_valid_after_utc - (now or utcnow())).total_seconds() / 86400


def is_hostname(value: str) -> bool:
    return bool(_HOSTNAME_RE.match(value))


def _signing_hash(key: PrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA256()


@dataclass(frozen=True)
class SubjectFields:
    """Optional subject attributes for API-created entities (the seed's create body)."""

    country: str | None = None
    state: str | None = None
    locality: str | None = None
    org: str | None = None
    unit: str | None = None
    email: str | None = None

    def attributes(self) -> list[x509.NameAttribute]:
        pairs = [
            (NameOID.COUNTRY_NAME, self.country),
            (NameOID.STATE_OR_PROVINCE_NAME, self.state),
            (NameOID.LOCALITY_NAME, self.locality),
            (NameOID.ORGANIZATION_NAME, self.org),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, self.unit),
        ]
        attrs = [x509.NameAttribute(oid, value) for oid, value in pairs if value]
        if self.email:
            attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, self.email))
        return attrs


@dataclass(frozen=True)
class LeafNames:
    """What a leaf certificate names: its CN, its subject alternative names and the other subject attributes."""

    cn: str
    dns_names: Sequence[str] = ()
    ip_addresses: Sequence[str] = ()
    emails: Sequence[str] = ()
    subject: SubjectFields | None = None


def build_subject(cn: str, fields: SubjectFields | None = None) -> x509.Name:
    attrs = fields.attributes() if fields else [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage_of(*, signs_certificates: bool, key_transport: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_transport,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


# The root's key usage: it signs certificates and CRLs (RFC 5280 4.2.1.3); no leaf ever carries the last two.
CA_KEY_USAGE = _key_usage_of(signs_certificates=True, key_transport=False)


def _key_usage(profile: Profile, public_key: PublicKey) -> x509.KeyUsage:
    if profile.is_ca:
        return CA_KEY_USAGE
    # RSA keys may also carry TLS 1.2 RSA key transport; EC keys sign (ECDHE) only.
    return _key_usage_of(signs_certificates=False, key_transport=isinstance(public_key, rsa.RSAPublicKey))


def subject_alt_names(
    profile: Profile,
    cn: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    emails: Sequence[str] = (),
) -> list[x509.GeneralName]:
    """The SAN list of a leaf: the profile's fixed names, the CN when it is a host name, extras."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()

    def add(kind: str, value: str) -> None:
        key = f"{kind}:{value.lower()}"
        if key in seen:
            return
        seen.add(key)
        if kind == "dns":
            names.append(x509.DNSName(value))
        elif kind == "ip":
            names.append(x509.IPAddress(ipaddress.ip_address(value)))
        else:
            names.append(x509.RFC822Name(value))

    if profile.cn_as_dns and is_hostname(cn):
        add("dns", cn)
    for value in [*profile.dns_names, *dns_names]:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not is_hostname(value):
                raise CAError(f"{value!r} is neither a host name nor an IP address") from None
            add("dns", value)
        else:
            add("ip", value)
    for value in [*profile.ip_addresses, *ip_addresses]:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise CAError(f"{value!r} is not an IP address") from None
        add("ip", value)
    for value in emails:
        add("email", value)
    return names


class CertificateAuthority:
    """A root CA held in memory: load (or create) once, then issue many."""

    def __init__(self, certificate: x509.Certificate, private_key: PrivateKey) -> None:
        if not public_key_matches(certificate, private_key):
            raise CAError("the root CA key does not belong to the root CA certificate")
        self.certificate = certificate
        self.private_key = private_key
        self._ski = x509.SubjectKeyIdentifier.from_public_key(private_key.public_key())
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski)

    # -- creating and loading -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        key_type: str = "ec",
        days: int = ROOT_CA_DAYS,
        common_name_: str = ROOT_CA_COMMON_NAME,
        private_key: PrivateKey | None = None,
        now: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """A new self-signed root (or a re-signed one when `private_key` is the existing key)."""
        key = private_key or generate_private_key(key_type)
        now = now or utcnow()
        name = build_subject(common_name_)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ROOT_CA, key.public_key()), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, _signing_hash(key))
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_data: bytes, key_data: bytes, passphrase: str | None) -> CertificateAuthority:
        """Raises WrongPassphrase before anything else can happen with a wrong passphrase."""
        key = load_private_key(key_data, passphrase)
        return cls(load_certificate(cert_data), key)

    def encrypted_key_pem(self, passphrase: str) -> bytes:
        if not passphrase:
            raise CAError("the CA key must be encrypted: set CA_PASSPHRASE")
        return key_pem(self.private_key, passphrase)

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.certificate)

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    # -- issuing ----------------------------------------------------------------------------------

    def issue(
        self,
        public_key: PublicKey,
        profile: Profile,
        names: LeafNames | str,
        *,
        days: int,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Sign a leaf for `public_key`; its validity never outlives the CA (RFC 5280 6.1.3).

        `names` is a LeafNames, or just the CN for a leaf that names nothing else.
        """
        names = LeafNames(names) if isinstance(names, str) else names
        if profile.is_ca:
            raise CAError("this CA issues leaf certificates only")
        if days < 1:
            raise CAError("days must be at least 1")
        now = now or utcnow()
        not_after = min(now + dt.timedelta(days=days), self.not_after)
        if not_after <= now:
            raise CAError("the root CA has expired; create a new root (delete certs/root_ca and run the generator)")
        builder = (
            x509.CertificateBuilder()
            .subject_name(build_subject(names.cn, names.subject))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(profile, public_key), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
        )
        if profile.extended_key_usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(profile.extended_key_usage)), critical=False)
        sans = subject_alt_names(profile, names.cn, names.dns_names, names.ip_addresses, names.emails)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.private_key, _signing_hash(self.private_key))

    def issued(self, cert: x509.Certificate) -> bool:
        """True when `cert` names this CA as issuer and carries its valid signature."""
        return verify_leaf(self.certificate, cert)

    # -- revocation -------------------------------------------------------------------------------

    def build_crl(
        self,
        revoked: Iterable[tuple[int, dt.datetime] | tuple[int, dt.datetime, str | None]],
        *,
        crl_number: int = 1,
        next_update: dt.timedelta = dt.timedelta(days=7),
        now: dt.datetime | None = None,
    ) -> x509.CertificateRevocationList:
        """A CRL listing (serial, revocation time[, reason]) entries, signed by the root."""
        now = now or utcnow()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - BACKDATE)
            .next_update(now + next_update)
            .add_extension(self._aki, critical=False)
            .add_extension(x509.CRLNumber(crl_number), critical=False)
        )
        for serial, when, *rest in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
            flag = REASON_FLAGS.get(rest[0]) if rest and rest[0] else None
            if flag is not None:
                entry = entry.add_extension(x509.CRLReason(flag), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(self.private_key, _signing_hash(self.private_key))


# RFC 5280 5.3.1 reason codes by the names `revoke` takes; `unspecified` (and anything unknown) gets no reason
# extension at all, as 5.3.1 recommends.
REASON_FLAGS = {
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "caCompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}


def verify_leaf(ca_cert: x509.Certificate, cert: x509.Certificate) -> bool:
    """Whether `cert` was signed by `ca_cert` (name and signature), regardless of dates."""
    if cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True

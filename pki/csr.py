"""The CSR as the CA reads it: the public key, the CN and the SANs it may carry, and nothing else."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from .authority import PublicKey
from .request_values import MAX_CSR, MAX_SANS, validate_dns_name, validate_email

_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


@dataclass(frozen=True)
class CSRInfo:
    """What the CA takes from a CSR: its public key, its CN and the SANs it is allowed to carry.

    Nothing else in the CSR (other extensions, key usage, basic constraints) reaches the certificate.
    """

    pem: str
    public_key: PublicKey
    common_name: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    emails: tuple[str, ...]


def parse_csr(pem: str, *, require_cn: bool = True) -> CSRInfo:
    """Parse and check a PEM CSR; ValueError says what is wrong with it.

    `require_cn=False` (ACME: certbot's CSRs name their hosts in SANs only) allows a subject without CN; then
    `common_name` is "".
    """
    if len(pem) > MAX_CSR:
        raise ValueError(f"is longer than {MAX_CSR} characters")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("utf-8", "replace"))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("is not a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)") from None
    try:
        signature_ok = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("uses an unsupported key or signature algorithm") from None
    if not signature_ok:
        raise ValueError("signature does not verify: the CSR was altered or not signed by its own key")
    if isinstance(public_key, rsa.RSAPublicKey):
        if not 2048 <= public_key.key_size <= 8192:
            raise ValueError("RSA keys must have 2048 to 8192 bits")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _EC_CURVES):
            raise ValueError("EC keys must use P-256, P-384 or P-521")
    else:
        raise ValueError("key must be EC (P-256, P-384, P-521) or RSA")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) > 1 or (require_cn and not cns):
        raise ValueError("subject must contain exactly one CN")
    cn = cns[0].value if cns else ""
    dns: list[str] = []
    ips: list[str] = []
    emails: list[str] = []
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    except (ValueError, TypeError):
        raise ValueError("has extensions that cannot be parsed") from None
    if san is not None:
        if len(san) > MAX_SANS:
            raise ValueError(f"asks for more than {MAX_SANS} subject alternative names")
        for general_name in san:
            if isinstance(general_name, x509.DNSName):
                dns.append(validate_dns_name(general_name.value))
            elif isinstance(general_name, x509.IPAddress) and isinstance(
                general_name.value, ipaddress.IPv4Address | ipaddress.IPv6Address
            ):
                ips.append(str(general_name.value))
            elif isinstance(general_name, x509.RFC822Name):
                try:
                    emails.append(validate_email(general_name.value))
                except ValueError:
                    raise ValueError("e-mail SAN is not a plain e-mail address") from None
            else:
                raise ValueError(
                    f"asks for a {type(general_name).__name__} subject alternative name; "
                    "only DNS names, IP addresses and e-mail addresses are issued"
                )
    return CSRInfo(pem, public_key, str(cn), tuple(dns), tuple(ips), tuple(emails))

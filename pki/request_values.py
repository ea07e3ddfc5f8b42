"""Single values of the v1/ssl requests: entity names (a MAC's colons removed), serials, e-mail and DNS names,
whole numbers sent as strings, subject text; and the rules on names the lab keeps for itself (protected
identities, reserved SANs). ValueError explains what is allowed; RequestError carries the contract's status.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .authority import is_hostname
from .config import Settings
from .identity import is_protected_identity, reserved_sans
from .request_errors import BAD_REQUEST, CONFLICT, RequestError

if TYPE_CHECKING:
    from .requests import CreateRequest


# Entity names become certificate CNs, folder names and MQTT topic levels (`ssl/<name>`), so only
# characters that are safe in all three; colons are dropped first so a collector's MAC address works.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# `cn` of a create request: a name or a DNS name (the seed: "the domain name of the organisation").
# No '/', '+', '#' or spaces: the CN is also the broker's user name in ACL lines and %u patterns.
CN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SERIAL_RE = re.compile(r"[0-9a-f]{1,40}")
EMAIL_RE = re.compile(r"(?P<local>[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64})@(?P<domain>[^@]+)")
_DAYS_STRING_RE = re.compile(r"\s*\+?0*([0-9]{1,7})\s*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

MAX_DAYS_WITHOUT_CA = 36500  # only when validating without a CA (tests, docs); the service passes the CA's life
MAX_PASSPHRASE = 1024
MAX_TOKEN = 256
MAX_CSR = 32 * 1024
MAX_SANS = 32
TOKEN_TTL_DEFAULT = 3600
TOKEN_TTL_MIN = 60
TOKEN_TTL_MAX = 7 * 86400
# RFC 5280 5.3.1 reason codes this CA records; certificateHold is left out (revocation here is final).
REVOCATION_REASONS = (
    "unspecified",
    "keyCompromise",
    "caCompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "privilegeWithdrawn",
)


def normalise_name(value: object) -> str:
    """A MAC (`AA:BB:...`) or entity id -> the entity name; ValueError explains what is allowed."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    name = value.replace(":", "")
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            "must be 1-64 letters, digits, '_' or '-' starting with a letter or digit "
            "(colons, as in a MAC address, are removed first)"
        )
    return name


def readable_name(body: object) -> str | None:
    """The normalised name of a request body when it has a usable one (where MQTT replies go), else None."""
    if not isinstance(body, dict):
        return None
    try:
        return normalise_name(body.get("name"))
    except ValueError:
        return None


def is_protected(name: str) -> bool:
    """The lab's own identities (`pki.identity`); compared case-insensitively."""
    return is_protected_identity(name)


def refuse_protected(name: str, field: str = "name") -> None:
    if is_protected(name):
        raise RequestError(CONFLICT, f"{name!r} is a protected name used by the lab itself", field)


def refuse_reserved_sans(values: Iterable[str], settings: Settings | None, field: str = "csr") -> None:
    """409 when a requested SAN names one of the lab's own servers or identities (`pki.identity`)."""
    reserved = reserved_sans(values, settings)
    if reserved:
        raise RequestError(
            CONFLICT,
            f"{', '.join(sorted(set(reserved)))}: reserved for the lab's own servers "
            "and identities, never issued to another certificate",
            field,
        )


def create_identity(request: CreateRequest, settings: Settings | None) -> tuple[str, tuple[str, ...]]:
    """`create`'s rule for `cn`: the CN is always the entity name; a `cn` that differs becomes a DNS SAN.

    So one entity has one broker identity. A differing `cn` must be a host name (400) that is neither a
    protected identity nor a name of the lab's own servers (409).
    """
    cn = request.cn
    if cn is None or cn == request.name:
        return request.name, ()
    if is_protected(cn):
        raise RequestError(CONFLICT, f"{cn!r} is a protected name used by the lab itself", "cn")
    if not is_hostname(cn):
        raise RequestError(
            BAD_REQUEST,
            "cn differs from name, so it becomes a DNS name (SAN) of the certificate: "
            "it must be a host name like collector01.example.com",
            "cn",
        )
    refuse_reserved_sans([cn], settings, "cn")
    return request.name, (cn,)


def parse_positive_int(value: object, maximum: int, unit: str = "") -> int:
    """A positive whole number given as a JSON number or a numeric string (the seed sends `"days": "360"`)."""
    if isinstance(value, bool):
        raise ValueError("must be a whole number, not true/false")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and (match := _DAYS_STRING_RE.fullmatch(value)):
        number = int(match.group(1))
    else:
        raise ValueError("must be a positive whole number (a number or a numeric string)")
    if number < 1:
        raise ValueError("must be at least 1")
    if number > maximum:
        raise ValueError(f"must be at most {maximum}{unit}")
    return number


def optional_text(value: object, limit: int) -> str | None:
    """Subject attributes: absent, null or blank mean 'not given'; otherwise 1..limit printable characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if not value.strip():
        return None
    if len(value) > limit:
        raise ValueError(f"must be at most {limit} characters")
    if _CONTROL_RE.search(value):
        raise ValueError("must not contain control characters")
    return value


def validate_email(value: str) -> str:
    match = EMAIL_RE.fullmatch(value)
    if len(value) > 128 or not match or not is_hostname(match.group("domain")):
        raise ValueError("must be an e-mail address like ops@example.com (ASCII, at most 128 characters)")
    return value


def validate_dns_name(value: str) -> str:
    if not is_hostname(value):
        raise ValueError(f"DNS name {value!r} is not a host name (no wildcards)")
    return value


def normalise_serial(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string of hex digits")
    serial = value.replace(":", "").strip().lower()
    serial = serial.removeprefix("0x")
    if not SERIAL_RE.fullmatch(serial):
        raise ValueError("must be the certificate serial in hex (as /v1/ssl/certs lists it)")
    return serial.lstrip("0") or "0"

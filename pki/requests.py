"""The v1/ssl request models: what a sign, create, renew, revoke or token request may contain, normalised.

HTTP and MQTT hand the decoded JSON body to `parse`; a bad field becomes a `RequestError` naming it,
with the contract's status code. Nothing here touches the disk or the CA key: validation happens before
anything can change. Error messages never repeat the value of `pass`, `token` or a key.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from . import schemas
from .authority import PublicKey, is_hostname
from .config import Settings
from .identity import is_protected_identity, reserved_sans

# The contract's status codes.
BAD_REQUEST = 400
FORBIDDEN = 403
NOT_FOUND = 404
CONFLICT = 409
TOO_LARGE = 413
UNSUPPORTED_MEDIA_TYPE = 415
TOO_MANY_REQUESTS = 429
UNAVAILABLE = 503

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
    "unspecified", "keyCompromise", "caCompromise", "affiliationChanged", "superseded",
    "cessationOfOperation", "privilegeWithdrawn",
)
_REASON_LOOKUP = {reason.lower(): reason for reason in REVOCATION_REASONS}
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class RequestError(Exception):
    """A request the CA refuses: HTTP status, a message safe to show, and the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message}
        if self.field:
            body["field"] = self.field
        return body

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


# -- single values ------------------------------------------------------------------------------------


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
        raise RequestError(CONFLICT, f"{', '.join(sorted(set(reserved)))}: reserved for the lab's own servers "
                                     "and identities, never issued to another certificate", field)


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
        raise RequestError(BAD_REQUEST, "cn differs from name, so it becomes a DNS name (SAN) of the certificate: "
                                        "it must be a host name like collector01.example.com", "cn")
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


def _max_days(info: ValidationInfo) -> int:
    return int((info.context or {}).get("max_days", MAX_DAYS_WITHOUT_CA))


def _optional_text(value: object, limit: int) -> str | None:
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


# -- the CSR ---------------------------------------------------------------------------------------


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


# -- request models ------------------------------------------------------------------------------------

Name = Annotated[str, WithJsonSchema(schemas.NAME)]
Days = Annotated[int, WithJsonSchema(schemas.days(
    MAX_DAYS_WITHOUT_CA, "Validity in days, a number or a numeric string; at most the CA's remaining life."))]
PASSPHRASE_SCHEMA = schemas.secret(MAX_PASSPHRASE, "The CA passphrase.")
TOKEN_SCHEMA = schemas.secret(MAX_TOKEN, "Single-use enrolment token from POST /v1/ssl/tokens, instead of pass (only "
                                         "together with csr).")
Passphrase = Annotated[StrictStr, Field(min_length=1, max_length=MAX_PASSPHRASE), WithJsonSchema(PASSPHRASE_SCHEMA)]
Token = Annotated[StrictStr, Field(min_length=1, max_length=MAX_TOKEN), WithJsonSchema(TOKEN_SCHEMA)]


def _no_default(schema: dict[str, Any]) -> None:
    """An optional field whose schema does not allow null says nothing of a default (absent means absent)."""
    schema.pop("default", None)


def _not_null(value: object) -> object:
    """`pass` and `token` are absent or strings: an explicit null is refused, so the document can say which
    credential a body carries."""
    if value is None:
        raise ValueError("must be a string")
    return value


class _Request(BaseModel):
    # Unknown fields are ignored (clients may add their own); values are never echoed in errors.
    model_config = ConfigDict(extra="ignore", frozen=True, arbitrary_types_allowed=True, hide_input_in_errors=True)

    operation: ClassVar[str] = ""

    @field_validator("name", mode="before", check_fields=False)
    @classmethod
    def _name(cls, value: object) -> str:
        return normalise_name(value)


class SignRequest(_Request):
    """`ssl/sign`: issue or renew the certificate of `name`; with `csr` the key stays with the caller."""

    operation: ClassVar[str] = "sign"

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["pass"], "not": {"required": ["token"]}},
        {"required": ["token", "csr"], "not": {"required": ["pass"]}, "properties": {"csr": schemas.CSR}},
    ]})

    name: Name
    days: Days
    # Absent or a string (an explicit null is refused), so the schemas are the non-null ones.
    passphrase: Annotated[Passphrase | None, WithJsonSchema(PASSPHRASE_SCHEMA)] = Field(
        default=None, alias="pass", repr=False, json_schema_extra=_no_default)
    token: Annotated[Token | None, WithJsonSchema(TOKEN_SCHEMA)] = Field(
        default=None, repr=False, json_schema_extra=_no_default)
    csr: Annotated[CSRInfo | None, WithJsonSchema({"anyOf": [schemas.CSR, schemas.NULL], "default": None})] = None

    @field_validator("passphrase", "token", mode="before")
    @classmethod
    def _credential(cls, value: object) -> object:
        return _not_null(value)

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, value: object, info: ValidationInfo) -> int:
        return parse_positive_int(value, _max_days(info), " days (the CA's remaining life)")

    @field_validator("csr", mode="before")
    @classmethod
    def _csr(cls, value: object, info: ValidationInfo) -> CSRInfo | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("must be a PEM string")
        info_csr = parse_csr(value)
        name = info.data.get("name")
        if name is not None and info_csr.common_name != name:
            raise ValueError("CN must equal name (after removing colons)")
        return info_csr

    @model_validator(mode="after")
    def _credentials(self) -> SignRequest:
        if self.passphrase is None and self.token is None:
            raise _FieldError("pass", "pass is required (or token, together with csr)")
        if self.passphrase is not None and self.token is not None:
            raise _FieldError("token", "give either pass or token, not both")
        if self.token is not None and self.csr is None:
            raise _FieldError("token", "an enrolment token is accepted only together with csr")
        return self


class CreateRequest(_Request):
    """`ssl/create`: the CA makes the key and signs a certificate with the given subject."""

    operation: ClassVar[str] = "create"

    name: Name
    days: Days
    passphrase: Passphrase = Field(alias="pass", repr=False)
    country: Annotated[str | None, WithJsonSchema(schemas.COUNTRY)] = None
    state: Annotated[str | None, WithJsonSchema(schemas.optional_text(128, "State or province (ST).", "SP"))] = None
    locality: Annotated[str | None, WithJsonSchema(schemas.optional_text(128, "City (L).", "Campinas"))] = None
    org: Annotated[str | None, WithJsonSchema(schemas.optional_text(64, "Organisation (O).", "ACME"))] = None
    unit: Annotated[str | None, WithJsonSchema(schemas.optional_text(64, "Organisational unit (OU).",
                                                                     "Sensors"))] = None
    cn: Annotated[str | None, WithJsonSchema(schemas.CN)] = None
    email: Annotated[str | None, WithJsonSchema(schemas.EMAIL)] = None

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, value: object, info: ValidationInfo) -> int:
        return parse_positive_int(value, _max_days(info), " days (the CA's remaining life)")

    @field_validator("country", mode="before")
    @classmethod
    def _country(cls, value: object) -> str | None:
        text = _optional_text(value, 64)
        if text is None:
            return None
        if not re.fullmatch(r"[A-Za-z]{2}", text):
            raise ValueError("must be a two-letter ISO 3166 country code, e.g. BR")
        return text.upper()

    @field_validator("state", "locality", mode="before")
    @classmethod
    def _long_text(cls, value: object) -> str | None:
        return _optional_text(value, 128)

    @field_validator("org", "unit", mode="before")
    @classmethod
    def _short_text(cls, value: object) -> str | None:
        return _optional_text(value, 64)

    @field_validator("cn", mode="before")
    @classmethod
    def _cn(cls, value: object) -> str | None:
        text = _optional_text(value, 64)
        if text is not None and not CN_RE.fullmatch(text):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-' (a name or a DNS name)")
        return text

    @field_validator("email", mode="before")
    @classmethod
    def _email(cls, value: object) -> str | None:
        text = _optional_text(value, 128)
        return validate_email(text) if text is not None else None

    @property
    def common_name(self) -> str:
        return self.cn or self.name

    def replay_fields(self) -> dict[str, Any]:
        """Everything that defines the certificate (not the passphrase): equal fields, same certificate."""
        return self.model_dump(exclude={"passphrase"})


class RevokeRequest(_Request):
    """`POST /v1/ssl/revoke`: by name (every unexpired certificate of it) or by one serial."""

    operation: ClassVar[str] = "revoke"

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["name"], "properties": {"name": schemas.NAME, "serial": schemas.NULL}},
        {"required": ["serial"], "properties": {"serial": schemas.SERIAL, "name": schemas.NULL}},
    ]})

    name: Annotated[str | None, WithJsonSchema({"anyOf": [schemas.NAME, schemas.NULL], "default": None})] = None
    serial: Annotated[str | None, WithJsonSchema({"anyOf": [schemas.SERIAL, schemas.NULL], "default": None})] = None
    passphrase: Passphrase = Field(alias="pass", repr=False)
    reason: Annotated[str, WithJsonSchema(schemas.reason(REVOCATION_REASONS))] = "unspecified"

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: object) -> str | None:
        return None if value is None else normalise_name(value)

    @field_validator("serial", mode="before")
    @classmethod
    def _serial(cls, value: object) -> str | None:
        return None if value is None else normalise_serial(value)

    @field_validator("reason", mode="before")
    @classmethod
    def _reason(cls, value: object) -> str:
        if value is None:
            return "unspecified"
        if not isinstance(value, str) or value.replace("_", "").lower() not in _REASON_LOOKUP:
            raise ValueError(f"must be one of {', '.join(REVOCATION_REASONS)}")
        return _REASON_LOOKUP[value.replace("_", "").lower()]

    @model_validator(mode="after")
    def _target(self) -> RevokeRequest:
        if self.name is None and self.serial is None:
            raise _FieldError("name", "name or serial is required")
        if self.name is not None and self.serial is not None:
            raise _FieldError("serial", "give name or serial, not both")
        return self


class TokenRequest(_Request):
    """`POST /v1/ssl/tokens`: a single-use enrolment token for `name`, valid `ttl` seconds."""

    operation: ClassVar[str] = "token"

    name: Name
    passphrase: Passphrase = Field(alias="pass", repr=False)
    ttl: Annotated[int | None, WithJsonSchema({"anyOf": [schemas.positive_integer(
        TOKEN_TTL_MIN, TOKEN_TTL_MAX, "Seconds until the token expires."), schemas.NULL],
        "default": TOKEN_TTL_DEFAULT})] = TOKEN_TTL_DEFAULT

    @field_validator("ttl", mode="before")
    @classmethod
    def _ttl(cls, value: object) -> int:
        if value is None:
            return TOKEN_TTL_DEFAULT
        seconds = parse_positive_int(value, TOKEN_TTL_MAX, " seconds")
        if seconds < TOKEN_TTL_MIN:
            raise ValueError(f"must be at least {TOKEN_TTL_MIN} seconds")
        return seconds


class RenewRequest(_Request):
    """`ssl/renew/<CN>`: a CSR for a new key. No passphrase: the certificate that published it is the credential
    (the broker's ACL lets only that CN write its own renew topic); the CN comes from the topic, not the body."""

    operation: ClassVar[str] = "renew"

    csr: Annotated[CSRInfo, WithJsonSchema({
        **schemas.CSR, "description": "PEM PKCS#10 request for a NEW key; its CN must equal the CN in the topic. Only "
                                      "its public key is used: subject, SANs and profile are those of the current "
                                      "certificate."})]
    days: Annotated[int | None, WithJsonSchema({"anyOf": [schemas.days(
        MAX_DAYS_WITHOUT_CA, "Optional, shorter validity in days; default and maximum: the lifetime of the current "
                             "certificate (and the CA's remaining life)."), schemas.NULL], "default": None})] = None

    @field_validator("csr", mode="before")
    @classmethod
    def _csr(cls, value: object) -> CSRInfo:
        if not isinstance(value, str):
            raise ValueError("must be a PEM string")
        return parse_csr(value)

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, value: object, info: ValidationInfo) -> int | None:
        if value is None:
            return None
        return parse_positive_int(value, _max_days(info), " days (the CA's remaining life)")


# `GET /v1/ssl/certs?status=`: the inventory's stored statuses, then the computed validity states.
CERTIFICATE_FILTERS = ("active", "superseded", "revoked", "valid", "expiring", "expired")


class CertificatesQuery(_Request):
    """`GET /v1/ssl/certs?name=&status=`: both optional; an empty value is no filter."""

    operation: ClassVar[str] = "certificates"

    name: Annotated[str | None, WithJsonSchema({"anyOf": [schemas.NAME, {"type": "string", "maxLength": 0}],
                                                "description": "Only this entity (colons removed as in requests)."})
                    ] = None
    status: Annotated[str | None, WithJsonSchema({"type": "string", "enum": [*CERTIFICATE_FILTERS, ""],
                                                  "description": "Stored status (active, superseded, revoked) or "
                                                                 "computed state (valid, expiring, expired)."})] = None

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: object) -> str | None:
        return normalise_name(value) if value else None

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, value: object) -> str | None:
        if not value:
            return None
        if value not in CERTIFICATE_FILTERS:
            raise ValueError(f"must be one of {', '.join(CERTIFICATE_FILTERS)}")
        return str(value)


class _FieldError(ValueError):
    """A cross-field rule broken; carries the field to blame (model validators have no field location)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


M = TypeVar("M", bound=_Request)

_TYPE_MESSAGES = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "string_too_short": "must not be empty",
    "string_too_long": "is too long",
}


def parse(model: type[M], body: object, *, max_days: int | None = None) -> M:
    """Validate a decoded JSON body; the first problem becomes a 400 RequestError naming its field."""
    if not isinstance(body, dict):
        raise RequestError(BAD_REQUEST, "the body must be a JSON object")
    context = {"max_days": max_days} if max_days is not None else {}
    try:
        return model.model_validate(body, context=context)
    except ValidationError as ex:
        error = ex.errors(include_url=False, include_input=False, include_context=True)[0]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            raise RequestError(BAD_REQUEST, cause.message, cause.field) from None
        field = str(error["loc"][0]) if error["loc"] else None
        if error["type"] == "value_error" and cause is not None:
            detail = str(cause)
        else:
            detail = _TYPE_MESSAGES.get(error["type"], "is not valid")
        raise RequestError(BAD_REQUEST, f"{field} {detail}" if field else detail, field) from None

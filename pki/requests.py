"""The v1/ssl request models: what a sign, create, renew, revoke or token request may contain, normalised.

The models live here; what they are built from (the base, the field types with their schemas, `parse`) in
pki/request_model.py, the single values in pki/request_values.py, the CSR in pki/csr.py, the status codes and
`RequestError` in pki/request_errors.py (all re-exported here). HTTP and MQTT hand the decoded JSON body to
`parse`; a bad field becomes a `RequestError` naming it, with the contract's status code. Nothing here touches
the disk or the CA key: validation happens before anything can change. Error messages never repeat the value
of `pass`, `token` or a key.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator, model_validator

from . import schemas
from .csr import CSRInfo, parse_csr
from .request_errors import (
    BAD_REQUEST,
    CONFLICT,
    FORBIDDEN,
    NOT_FOUND,
    TOO_MANY_REQUESTS,
    UNAVAILABLE,
    UNSUPPORTED_MEDIA_TYPE,
    RequestError,
)
from .request_model import (
    PASSPHRASE_SCHEMA,
    TOKEN_SCHEMA,
    Days,
    FieldError,
    Name,
    Passphrase,
    RequestModel,
    Token,
    days_within_ca_life,
    exactly_one,
    no_default,
    not_null,
    parse,
)
from .request_values import (
    CN_RE,
    MAX_CSR,
    MAX_DAYS_WITHOUT_CA,
    REVOCATION_REASONS,
    TOKEN_TTL_DEFAULT,
    TOKEN_TTL_MAX,
    TOKEN_TTL_MIN,
    create_identity,
    is_protected,
    normalise_name,
    normalise_serial,
    optional_text,
    parse_positive_int,
    readable_name,
    refuse_protected,
    refuse_reserved_sans,
    validate_email,
)

__all__ = [
    "BAD_REQUEST",
    "CONFLICT",
    "FORBIDDEN",
    "MAX_CSR",
    "MAX_DAYS_WITHOUT_CA",
    "NOT_FOUND",
    "REVOCATION_REASONS",
    "TOKEN_TTL_DEFAULT",
    "TOKEN_TTL_MAX",
    "TOKEN_TTL_MIN",
    "TOO_MANY_REQUESTS",
    "UNAVAILABLE",
    "UNSUPPORTED_MEDIA_TYPE",
    "CSRInfo",
    "CertificatesQuery",
    "CreateRequest",
    "RenewRequest",
    "RequestError",
    "RevokeRequest",
    "SignRequest",
    "TokenRequest",
    "create_identity",
    "is_protected",
    "normalise_name",
    "normalise_serial",
    "parse",
    "parse_csr",
    "parse_positive_int",
    "readable_name",
    "refuse_protected",
    "refuse_reserved_sans",
    "validate_email",
]

_REASON_LOOKUP = {reason.lower(): reason for reason in REVOCATION_REASONS}


class SignRequest(RequestModel):
    """`ssl/sign`: issue or renew the certificate of `name`; with `csr` the key stays with the caller."""

    operation: ClassVar[str] = "sign"

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["pass"], "not": {"required": ["token"]}},
                {"required": ["token", "csr"], "not": {"required": ["pass"]}, "properties": {"csr": schemas.CSR}},
            ]
        }
    )

    name: Name
    days: Days
    # Absent or a string (an explicit null is refused), so the schemas are the non-null ones.
    passphrase: Annotated[Passphrase | None, WithJsonSchema(PASSPHRASE_SCHEMA)] = Field(
        default=None, alias="pass", repr=False, json_schema_extra=no_default
    )
    token: Annotated[Token | None, WithJsonSchema(TOKEN_SCHEMA)] = Field(
        default=None, repr=False, json_schema_extra=no_default
    )
    csr: Annotated[CSRInfo | None, WithJsonSchema(schemas.nullable(schemas.CSR))] = None

    @field_validator("passphrase", "token", mode="before")
    @classmethod
    def _credential(cls, value: object) -> object:
        return not_null(value)

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
        exactly_one(
            {"pass": self.passphrase, "token": self.token},
            "pass is required (or token, together with csr)",
            "give either pass or token, not both",
        )
        if self.token is not None and self.csr is None:
            raise FieldError("token", "an enrolment token is accepted only together with csr")
        return self


class CreateRequest(RequestModel):
    """`ssl/create`: the CA makes the key and signs a certificate with the given subject."""

    operation: ClassVar[str] = "create"

    name: Name
    days: Days
    passphrase: Passphrase = Field(alias="pass", repr=False)
    country: Annotated[str | None, WithJsonSchema(schemas.COUNTRY)] = None
    state: Annotated[str | None, WithJsonSchema(schemas.optional_text(128, "State or province (ST).", "SP"))] = None
    locality: Annotated[str | None, WithJsonSchema(schemas.optional_text(128, "City (L).", "Campinas"))] = None
    org: Annotated[str | None, WithJsonSchema(schemas.optional_text(64, "Organisation (O).", "ACME"))] = None
    unit: Annotated[str | None, WithJsonSchema(schemas.optional_text(64, "Organisational unit (OU).", "Sensors"))] = (
        None
    )
    cn: Annotated[str | None, WithJsonSchema(schemas.CN)] = None
    email: Annotated[str | None, WithJsonSchema(schemas.EMAIL)] = None

    @field_validator("country", mode="before")
    @classmethod
    def _country(cls, value: object) -> str | None:
        text = optional_text(value, 64)
        if text is None:
            return None
        if not re.fullmatch(r"[A-Za-z]{2}", text):
            raise ValueError("must be a two-letter ISO 3166 country code, e.g. BR")
        return text.upper()

    @field_validator("state", "locality", mode="before")
    @classmethod
    def _long_text(cls, value: object) -> str | None:
        return optional_text(value, 128)

    @field_validator("org", "unit", mode="before")
    @classmethod
    def _short_text(cls, value: object) -> str | None:
        return optional_text(value, 64)

    @field_validator("cn", mode="before")
    @classmethod
    def _cn(cls, value: object) -> str | None:
        text = optional_text(value, 64)
        if text is not None and not CN_RE.fullmatch(text):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-' (a name or a DNS name)")
        return text

    @field_validator("email", mode="before")
    @classmethod
    def _email(cls, value: object) -> str | None:
        text = optional_text(value, 128)
        return validate_email(text) if text is not None else None

    @property
    def common_name(self) -> str:
        return self.cn or self.name

    def replay_fields(self) -> dict[str, Any]:
        """Everything that defines the certificate (not the passphrase): equal fields, same certificate."""
        return self.model_dump(exclude={"passphrase"})


class RevokeRequest(RequestModel):
    """`POST /v1/ssl/revoke`: by name (every unexpired certificate of it) or by one serial."""

    operation: ClassVar[str] = "revoke"

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["name"], "properties": {"name": schemas.NAME, "serial": schemas.NULL}},
                {"required": ["serial"], "properties": {"serial": schemas.SERIAL, "name": schemas.NULL}},
            ]
        }
    )

    name: Annotated[str | None, WithJsonSchema(schemas.nullable(schemas.NAME))] = None
    serial: Annotated[str | None, WithJsonSchema(schemas.nullable(schemas.SERIAL))] = None
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
        exactly_one(
            {"name": self.name, "serial": self.serial}, "name or serial is required", "give name or serial, not both"
        )
        return self


class TokenRequest(RequestModel):
    """`POST /v1/ssl/tokens`: a single-use enrolment token for `name`, valid `ttl` seconds."""

    operation: ClassVar[str] = "token"

    name: Name
    passphrase: Passphrase = Field(alias="pass", repr=False)
    ttl: Annotated[
        int | None,
        WithJsonSchema(
            schemas.nullable(
                schemas.positive_integer(TOKEN_TTL_MIN, TOKEN_TTL_MAX, "Seconds until the token expires."),
                TOKEN_TTL_DEFAULT,
            )
        ),
    ] = TOKEN_TTL_DEFAULT

    @field_validator("ttl", mode="before")
    @classmethod
    def _ttl(cls, value: object) -> int:
        if value is None:
            return TOKEN_TTL_DEFAULT
        seconds = parse_positive_int(value, TOKEN_TTL_MAX, " seconds")
        if seconds < TOKEN_TTL_MIN:
            raise ValueError(f"must be at least {TOKEN_TTL_MIN} seconds")
        return seconds


class RenewRequest(RequestModel):
    """`ssl/renew/<CN>`: a CSR for a new key. No passphrase: the certificate that published it is the credential
    (the broker's ACL lets only that CN write its own renew topic); the CN comes from the topic, not the body."""

    operation: ClassVar[str] = "renew"

    csr: Annotated[
        CSRInfo,
        WithJsonSchema(
            {
                **schemas.CSR,
                "description": "PEM PKCS#10 request for a NEW key; its CN must equal the CN in the topic. Only "
                "its public key is used: subject, SANs and profile are those of the current "
                "certificate.",
            }
        ),
    ]
    days: Annotated[
        int | None,
        WithJsonSchema(
            schemas.nullable(
                schemas.days(
                    MAX_DAYS_WITHOUT_CA,
                    "Optional, shorter validity in days; default and maximum: the lifetime of the current "
                    "certificate (and the CA's remaining life).",
                )
            )
        ),
    ] = None

    @field_validator("csr", mode="before")
    @classmethod
    def _csr(cls, value: object) -> CSRInfo:
        if not isinstance(value, str):
            raise ValueError("must be a PEM string")
        return parse_csr(value)

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, value: object, info: ValidationInfo) -> int | None:
        return None if value is None else days_within_ca_life(value, info)


# `GET /v1/ssl/certs?status=`: the inventory's stored statuses, then the computed validity states.
CERTIFICATE_FILTERS = ("active", "superseded", "revoked", "valid", "expiring", "expired")


class CertificatesQuery(RequestModel):
    """`GET /v1/ssl/certs?name=&status=`: both optional; an empty value is no filter."""

    operation: ClassVar[str] = "certificates"

    name: Annotated[
        str | None,
        WithJsonSchema(
            {
                "anyOf": [schemas.NAME, {"type": "string", "maxLength": 0}],
                "description": "Only this entity (colons removed as in requests).",
            }
        ),
    ] = None
    status: Annotated[
        str | None,
        WithJsonSchema(
            {
                "type": "string",
                "enum": [*CERTIFICATE_FILTERS, ""],
                "description": "Stored status (active, superseded, revoked) or "
                "computed state (valid, expiring, expired).",
            }
        ),
    ] = None

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

"""The shapes of the CA's answers, as pydantic models: what the API documents (OpenAPI for HTTP, AsyncAPI for MQTT)
is generated from them, beside the request models of `pki.requests`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(_Reply):
    """Any refused request, over HTTP and MQTT alike."""

    error: str = Field(description="What is wrong and what to do, never containing a secret.")
    field: str | None = Field(None, description="The request field at fault, when one is.")


class Issued(_Reply):
    """A certificate issued by `sign`, `create` or a renewal (201; 200 when an identical create is replayed)."""

    name: str = Field(description="The entity's normalised name (colons removed).")
    ca: str = Field(description="The root certificate, PEM.")
    crt: str = Field(description="The issued certificate, PEM.")
    key: str | None = Field(
        None,
        description="The private key (PKCS#8 PEM), only when the CA made or holds it: "
        "create, and sign without a CSR. It reaches only the requester.",
    )
    serial: str = Field(description="Serial number, hex.")
    not_after: dt.datetime = Field(description="End of validity (UTC).")


class Revoked(_Reply):
    """The answer to `revoke`."""

    name: str | None = Field(None, description="The entity, when revoked by name.")
    reason: str = Field(description="RFC 5280 reason recorded on the CRL.")
    revoked: list[str] = Field(description="Serials revoked by this request.")
    already_revoked: list[str] = Field(default_factory=list, description="Serials that were revoked before.")


class Token(_Reply):
    """A single-use enrolment token: shown once, stored only as its SHA-256."""

    name: str = Field(description="The entity the token may enrol.")
    token: str = Field(
        description="The token, for `sign` with a CSR in place of `pass`.", json_schema_extra={"format": "password"}
    )
    expires_at: dt.datetime = Field(description="When the token stops working (UTC).")


class InventoryRow(_Reply):
    """One certificate of the inventory (`GET /v1/ssl/certs`)."""

    serial: str = Field(description="Serial number, hex.")
    name: str = Field(description="The entity.")
    common_name: str
    role: str = Field(description="Its profile: root_ca, broker, dashboard, device, entity, server, ...")
    subject: str = Field(description="RFC 4514.")
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    days_left: float = Field(description="Days until not_after (negative once expired).")
    fingerprint_sha256: str
    issued_via: str = Field(description="cli (the generator), import, http, mqtt, renew, est, acme.")
    requester: str | None = Field(description="Who asked (address, operator@address, mqtt:<CN>), when known.")
    status: Literal["active", "superseded", "revoked"] = Field(description="As stored.")
    issued_at: dt.datetime
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    state: Literal["valid", "expiring", "expired", "revoked", "superseded"] = Field(
        description="Computed now, with RENEW_BEFORE_DAYS."
    )


class Certificates(_Reply):
    """The inventory, oldest first."""

    certificates: list[InventoryRow]


REPLIES: tuple[type[BaseModel], ...] = (Error, Issued, Revoked, Token, Certificates)


@dataclass(frozen=True)
class Reply:
    """What both transports send back: an HTTP status, the JSON body, extra headers (Retry-After)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status < 400

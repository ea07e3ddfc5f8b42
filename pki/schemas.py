"""The JSON schemas of the request fields, exactly as strict as `pki.requests` validates them.

The request models attach these (pydantic `WithJsonSchema`), so the OpenAPI and AsyncAPI documents are generated
from the models and say what the server accepts: not looser (a value the schema allows is never a 400) and not
stricter (a value it forbids is refused). `days` is bounded by the CA's remaining life, known only when the
document is served: its schema carries DAYS_MARKER until `bound_days` replaces it with the live bound.
"""

from __future__ import annotations

import copy
from typing import Any

from .patterns import BLANK, WHITESPACE, integer_range, words_ignoring_case_and_underscores

DAYS_MARKER = "x-iotca-days"
NULL = {"type": "null"}
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = f"{_LABEL}(?:\\.{_LABEL})*"
# The name, before its colons are removed: 1-64 of [A-Za-z0-9_-] starting with a letter or digit, colons anywhere.
NAME_PATTERN = "^:*[A-Za-z0-9](?::*[A-Za-z0-9_-]){0,63}:*$"
NAME = {
    "type": "string",
    "pattern": NAME_PATTERN,
    "description": "Entity id or a collector's MAC address; colons are removed, then it must match "
    "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$. Becomes the certificate CN and the reply topic ssl/<name>.",
    "examples": ["client", "AA:BB:CC:DD:EE:FF"],
}
CSR = {
    "type": "string",
    "maxLength": 32 * 1024,
    "pattern": "-----BEGIN CERTIFICATE REQUEST-----",
    "description": "PEM PKCS#10 request, signed by its own key, whose subject CN equals name (after removing "
    "colons). Only its DNS, IP and e-mail SANs are copied, nothing else from it.",
    "examples": ["-----BEGIN CERTIFICATE REQUEST-----\n...\n-----END CERTIFICATE REQUEST-----\n"],
}


def positive_integer(low: int, high: int, description: str) -> dict[str, Any]:
    """A whole number low..high given as a JSON number or as a numeric string ("360", " 360", "+0360")."""
    digits = f"^[{WHITESPACE}]*\\+?0*(?:{integer_range(low, high)})[{WHITESPACE}]*$"
    return {
        "oneOf": [{"type": "integer", "minimum": low, "maximum": high}, {"type": "string", "pattern": digits}],
        "description": description,
        "examples": [min(high, 360), str(min(high, 360))],
    }


def days(maximum: int, description: str) -> dict[str, Any]:
    return {**positive_integer(1, maximum, description), DAYS_MARKER: True}


def bound_days(schema: dict[str, Any], maximum: int) -> dict[str, Any]:
    """A copy of `schema` whose `days` allow 1..maximum (the CA's remaining life)."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get(DAYS_MARKER):
                return positive_integer(1, maximum, node.get("description", ""))
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(copy.deepcopy(schema))


def nullable(schema: dict[str, Any], default: Any = None) -> dict[str, Any]:
    """`schema` or null; absent (or null) means `default`."""
    return {"anyOf": [schema, NULL], "default": default}


def secret(max_length: int, description: str) -> dict[str, Any]:
    return {"type": "string", "format": "password", "minLength": 1, "maxLength": max_length, "description": description}


def optional_text(limit: int, description: str, example: str) -> dict[str, Any]:
    """A subject attribute: null or blank (Python's white space only) means absent; else 1..limit characters
    without control characters."""
    return {
        "anyOf": [
            NULL,
            {"type": "string", "pattern": BLANK},
            {"type": "string", "pattern": f"^[^\\x00-\\x1f\\x7f]{{1,{limit}}}$"},
        ],
        "default": None,
        "description": description,
        "examples": [example],
    }


def optional(schema: dict[str, Any], description: str, example: str) -> dict[str, Any]:
    """Null, blank, or a non-blank value matching `schema` (the optional create fields)."""
    return {
        "anyOf": [NULL, {"type": "string", "pattern": BLANK}, schema],
        "default": None,
        "description": description,
        "examples": [example],
    }


COUNTRY = optional({"type": "string", "pattern": "^[A-Za-z]{2}$"}, "ISO 3166 two-letter code (C).", "BR")
CN = optional(
    {"type": "string", "maxLength": 64, "pattern": f"^{HOSTNAME}$"},
    "A host name for the certificate (the seed: the organisation's domain name). The subject CN, which is "
    "the MQTT identity, is always name; a cn that differs becomes a DNS SAN (never a protected name or a "
    "name of the lab's own servers).",
    "collector01.example.com",
)
EMAIL = optional(
    {"type": "string", "maxLength": 128, "pattern": f"^[A-Za-z0-9.!#$%&'*+/=?^_`{{|}}~-]{{1,64}}@{HOSTNAME}$"},
    "emailAddress in the subject and an e-mail SAN.",
    "ops@example.com",
)
# Hex digits (at most 40), colons anywhere, an optional 0x, white space around: as `normalise_serial` reads it.
SERIAL = {
    "type": "string",
    "pattern": f"^[{WHITESPACE}:]*(?:0:*[xX]:*)?[0-9A-Fa-f](?::*[0-9A-Fa-f]){{0,39}}[{WHITESPACE}:]*$",
    "description": "Hex serial of one certificate (as /v1/ssl/certs lists it; colons and 0x allowed).",
    "examples": ["4f1c2a9e0b"],
}


def reason(reasons: tuple[str, ...]) -> dict[str, Any]:
    return {
        "anyOf": [NULL, {"type": "string", "pattern": words_ignoring_case_and_underscores(reasons)}],
        "default": "unspecified",
        "examples": list(reasons),
        "description": "RFC 5280 reason code, any letter case, '_' ignored: " + ", ".join(reasons) + ".",
    }

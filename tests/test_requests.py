"""The request models: names, days, subject fields, CSRs, credentials; every refusal names its field."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from pki.requests import (
    CreateRequest,
    RequestError,
    RevokeRequest,
    SignRequest,
    TokenRequest,
    is_protected,
    parse,
    readable_name,
)

from .ca_support import make_csr

SIGN = {"name": "client", "pass": "pw", "days": 360}


def refused(model: type[Any], body: Any, **kwargs: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(model, body, **kwargs)
    return info.value


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("client", "client"),
        ("AA:BB:CC:DD:EE:FF", "AABBCCDDEEFF"),
        ("aa:bb:cc:dd:ee:ff", "aabbccddeeff"),
        ("device_01-b", "device_01-b"),
        ("x" * 64, "x" * 64),
    ],
)
def test_names_are_normalised(given: str, name: str) -> None:
    assert parse(SignRequest, {**SIGN, "name": given}).name == name


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "a/b",
        "+",
        "#",
        "",
        ":",
        "::",
        "-lead",
        "_lead",
        ".hidden",
        "x" * 65,
        "a b",
        "café",
        "a\n",
        "a\x00",
        "ssl/#",
        "$SYS",
        5,
        None,
        [],
        {"n": 1},
        True,
    ],
)
def test_bad_names_are_refused_naming_the_field(name: Any) -> None:
    error = refused(SignRequest, {**SIGN, "name": name})
    assert (error.status, error.field) == (400, "name")
    assert readable_name({"name": name}) is None


@pytest.mark.parametrize(
    ("days", "expected"), [(360, 360), ("360", 360), (" 30 ", 30), (1, 1), (360.0, 360), ("+7", 7)]
)
def test_days_as_number_or_numeric_string(days: Any, expected: int) -> None:
    assert parse(SignRequest, {**SIGN, "days": days}).days == expected


@pytest.mark.parametrize(
    "days", [0, -1, "0", "-5", "abc", "3.5", 3.5, True, False, None, [], {}, "", "1e3", "٣", 10**30, "99999999"]
)
def test_bad_days_are_refused(days: Any) -> None:
    error = refused(SignRequest, {**SIGN, "days": days}, max_days=3000)
    assert (error.status, error.field) == (400, "days")


def test_days_may_not_outlive_the_ca() -> None:
    assert parse(SignRequest, {**SIGN, "days": 3000}, max_days=3000).days == 3000
    error = refused(SignRequest, {**SIGN, "days": 3001}, max_days=3000)
    assert error.field == "days" and "3000" in error.message


@pytest.mark.parametrize("field", ["name", "days", "pass"])
def test_each_sign_field_missing_is_named(field: str) -> None:
    body = dict(SIGN)
    del body[field]
    error = refused(SignRequest, body)
    assert (error.status, error.field) == (400, field)
    assert "required" in error.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", 1),
        ("days", [1]),
        ("pass", 1234),
        ("pass", ["pw"]),
        ("pass", ""),
        ("csr", 7),
        ("token", 5),
    ],
)
def test_each_sign_field_of_the_wrong_type_is_named(field: str, value: Any) -> None:
    error = refused(SignRequest, {**SIGN, field: value})
    assert (error.status, error.field) == (400, field)


@pytest.mark.parametrize("body", [[], "text", 3, None, ["name"]])
def test_body_must_be_an_object(body: Any) -> None:
    error = refused(SignRequest, body)
    assert error.status == 400 and error.field is None


def test_errors_never_repeat_the_passphrase_or_token() -> None:
    secret = "S3cr3t-" * 200  # too long: refused, and the message must not contain it
    for body in ({**SIGN, "pass": secret}, {"name": "a", "days": 1, "token": secret, "csr": "x"}):
        error = refused(SignRequest, body)
        assert "S3cr3t" not in error.message
    assert "S3cr3t" not in repr(parse(SignRequest, {**SIGN, "pass": "S3cr3t"}))


CREATE = {
    "name": "AA:BB:CC:DD:EE:FF",
    "days": "360",
    "pass": "pw",
    "country": "br",
    "state": "SP",
    "locality": "Campinas",
    "org": "ACME",
    "unit": "Sensors",
    "cn": "collector.example.com",
    "email": "ops@example.com",
}


def test_the_seed_create_body_is_accepted() -> None:
    request = parse(CreateRequest, CREATE)
    assert request.name == "AABBCCDDEEFF" and request.country == "BR" and request.days == 360
    assert request.common_name == "collector.example.com"
    assert "passphrase" not in request.replay_fields()


def test_create_optional_fields_default_and_blank_means_absent() -> None:
    request = parse(CreateRequest, {"name": "client", "days": 1, "pass": "pw", "state": "", "org": None})
    assert request.common_name == "client" and request.state is None and request.org is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("country", "Brazil"),
        ("country", "B1"),
        ("country", 55),
        ("state", "x" * 129),
        ("org", "x" * 65),
        ("unit", "a\nb"),
        ("locality", ["x"]),
        ("cn", "a/b"),
        ("cn", "a b"),
        ("cn", "+"),
        ("cn", "x" * 65),
        ("email", "not-an-email"),
        ("email", "a@b@c"),
        ("email", "ops@exa mple.com"),
        ("email", 3),
    ],
)
def test_each_bad_create_field_is_named(field: str, value: Any) -> None:
    error = refused(CreateRequest, {**CREATE, field: value})
    assert (error.status, error.field) == (400, field)


def test_sign_with_a_csr_keeps_only_its_key_cn_and_allowed_sans() -> None:
    pem, key = make_csr(
        "sensor-1",
        dns=["sensor-1.example.com"],
        ips=["10.0.0.7", "::1"],
        emails=["ops@example.com"],
        extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)],
    )
    request = parse(SignRequest, {**SIGN, "name": "sensor-1", "csr": pem})
    assert request.csr is not None
    assert request.csr.common_name == "sensor-1"
    assert request.csr.dns_names == ("sensor-1.example.com",)
    assert request.csr.ip_addresses == ("10.0.0.7", "::1")
    assert request.csr.emails == ("ops@example.com",)
    assert request.csr.public_key.public_numbers() == key.public_key().public_numbers()


def test_csr_cn_must_equal_the_name() -> None:
    pem, _ = make_csr("someone-else")
    error = refused(SignRequest, {**SIGN, "csr": pem})
    assert (error.status, error.field) == (400, "csr") and "CN" in error.message
    # a MAC name matches a CSR whose CN is the MAC without colons
    pem, _ = make_csr("AABBCCDDEEFF")
    assert parse(SignRequest, {**SIGN, "name": "AA:BB:CC:DD:EE:FF", "csr": pem}).name == "AABBCCDDEEFF"


def _tampered(pem: str) -> str:
    csr = x509.load_pem_x509_csr(pem.encode())
    der = bytearray(csr.public_bytes(Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def test_bad_csrs_are_refused() -> None:
    good, _ = make_csr("client")
    weak_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - must be refused
    k1 = ec.generate_private_key(ec.SECP256K1())
    two_cns = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "client"), x509.NameAttribute(NameOID.COMMON_NAME, "client")]
    )
    cases = {
        "tampered signature": _tampered(good),
        "not PEM": "hello",
        "certificate, not CSR": good.replace("CERTIFICATE REQUEST", "CERTIFICATE"),
        "URI SAN": make_csr(
            "client",
            extensions=[(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("https://evil.example")]), False)],
        )[0],
        "wildcard DNS": make_csr("client", dns=["*.example.com"])[0],
        "RSA-1024": make_csr("client", key=weak_rsa)[0],
        "secp256k1": make_csr("client", key=k1)[0],
        "two CNs": make_csr("client", subject=two_cns)[0],
        "too many SANs": make_csr("client", dns=[f"h{i}.example.com" for i in range(40)])[0],
    }
    for what, pem in cases.items():
        error = refused(SignRequest, {**SIGN, "csr": pem})
        assert (error.status, error.field) == (400, "csr"), what


def test_token_replaces_pass_only_with_a_csr() -> None:
    pem, _ = make_csr("client")
    request = parse(SignRequest, {"name": "client", "days": 1, "token": "t0k", "csr": pem})
    assert request.token == "t0k" and request.passphrase is None
    assert refused(SignRequest, {"name": "client", "days": 1, "token": "t0k"}).field == "token"
    assert refused(SignRequest, {**SIGN, "token": "t0k", "csr": pem}).field == "token"


def test_revoke_requests() -> None:
    assert parse(RevokeRequest, {"name": "AA:BB", "pass": "pw"}).name == "AABB"
    request = parse(RevokeRequest, {"serial": "0A:bC:00", "pass": "pw", "reason": "key_compromise"})
    assert (request.serial, request.reason) == ("abc00", "keyCompromise")
    assert refused(RevokeRequest, {"pass": "pw"}).field == "name"
    assert refused(RevokeRequest, {"name": "a", "serial": "ab", "pass": "pw"}).field == "serial"
    assert refused(RevokeRequest, {"serial": "xyz", "pass": "pw"}).field == "serial"
    assert refused(RevokeRequest, {"name": "a", "pass": "pw", "reason": "bored"}).field == "reason"
    assert refused(RevokeRequest, {"name": "a"}).field == "pass"


def test_token_requests() -> None:
    assert parse(TokenRequest, {"name": "d", "pass": "pw"}).ttl == 3600
    assert parse(TokenRequest, {"name": "d", "pass": "pw", "ttl": "120"}).ttl == 120
    for ttl in (0, 59, 7 * 86400 + 1, "soon", True):
        assert refused(TokenRequest, {"name": "d", "pass": "pw", "ttl": ttl}).field == "ttl"


def test_protected_names_regardless_of_case() -> None:
    for name in ("root_ca", "mosquitto", "dashboard", "provisioner", "policy", "Dashboard", "MOSQUITTO"):
        assert is_protected(name)
    assert not is_protected("device001")

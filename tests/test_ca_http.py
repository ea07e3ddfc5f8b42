"""The CA's HTTP API through the Flask app: the seed's bodies, every contract error code, arbitrary input,
50 concurrent requests against a real server, the read-only routes and the OpenAPI document."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pki.authority import load_certificate, verify_leaf

from .ca_support import (
    ServerThread,
    ca_of,
    check_issued,
    concrete_body,
    json_values,
    lab_state,
    make_csr,
    post_json,
    request_like,
    seed_create_body,
)
from .conftest import LabEnv

pytestmark = pytest.mark.databases


def test_seed_bodies_over_http(generated_lab: LabEnv, client: FlaskClient, tmp_path: Path) -> None:
    passphrase = generated_lab.passphrase
    created = client.post("/v1/ssl/create", json=seed_create_body("client", passphrase, cn="client"))
    assert created.status_code == 201, created.json
    assert list(created.json) == ["name", "ca", "crt", "key", "serial", "not_after"]
    check_issued(created.json, tmp_path=tmp_path)
    signed = client.post("/v1/ssl/sign", json={"name": "client", "pass": passphrase, "days": 360})
    assert signed.status_code == 201, signed.json
    check_issued(signed.json, tmp_path=tmp_path)
    assert signed.headers["Cache-Control"] == "no-store"
    replay = client.post("/v1/ssl/create", json=seed_create_body("client", passphrase, cn="client", days=360))
    # the entity was renewed in between: its current certificate is not the create's any more
    assert replay.status_code == 201 and replay.json["serial"] != created.json["serial"]
    again = client.post("/v1/ssl/create", json=seed_create_body("client", passphrase, cn="client", days=360))
    assert again.status_code == 200 and again.json["serial"] == replay.json["serial"]


def _body(field: str, value: Any, base: dict[str, Any]) -> dict[str, Any]:
    body = dict(base)
    if value is _MISSING:
        body.pop(field)
    else:
        body[field] = value
    return body


_MISSING = object()


@pytest.mark.parametrize("route", ["sign", "create"])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", _MISSING),
        ("name", 42),
        ("name", ["client"]),
        ("name", "../../etc/passwd"),
        ("name", "a/b"),
        ("name", "+"),
        ("name", "#"),
        ("name", ""),
        ("days", _MISSING),
        ("days", "ten"),
        ("days", 0),
        ("days", -3),
        ("days", None),
        ("days", 1.5),
        ("days", 100000),
        ("pass", _MISSING),
        ("pass", 1234),
        ("pass", None),
        ("pass", ""),
    ],
)
def test_each_field_missing_or_wrong_is_400_naming_it(
    generated_lab: LabEnv, client: FlaskClient, route: str, field: str, value: Any
) -> None:
    base = {"name": "device001", "days": 30, "pass": generated_lab.passphrase}
    before = lab_state(generated_lab)
    response = client.post(f"/v1/ssl/{route}", json=_body(field, value, base))
    assert response.status_code == 400, response.json
    assert response.json["field"] == field and response.json["error"]
    assert lab_state(generated_lab) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("country", "Brasil"),
        ("state", 7),
        ("locality", "\x07"),
        ("org", "x" * 65),
        ("unit", []),
        ("cn", "a/b"),
        ("email", "nobody"),
    ],
)
def test_create_subject_fields_are_checked(generated_lab: LabEnv, client: FlaskClient, field: str, value: Any) -> None:
    response = client.post(
        "/v1/ssl/create", json={"name": "c", "days": 3, "pass": generated_lab.passphrase, field: value}
    )
    assert (response.status_code, response.json["field"]) == (400, field)


def test_not_json_is_415_and_too_large_is_413(generated_lab: LabEnv, client: FlaskClient) -> None:
    before = lab_state(generated_lab)
    for kwargs in (
        {"data": "name=client"},
        {"data": {"name": "client"}},
        {"data": '{"name": "client"}', "content_type": "text/plain"},
        {},
    ):
        response = client.post("/v1/ssl/sign", **kwargs)
        assert response.status_code == 415 and "JSON" in response.json["error"]
    big = json.dumps({"name": "client", "days": 1, "pass": "x", "pad": "x" * 70 * 1024})
    for route in ("sign", "create", "revoke", "tokens"):
        response = client.post(f"/v1/ssl/{route}", data=big, content_type="application/json")
        assert response.status_code == 413 and response.json == {"error": "request body is larger than 64 KiB"}
    for raw in ('{"name": ', "\xff\xfe", "[" * 60000, "NaN-ish", ""):
        response = client.post("/v1/ssl/sign", data=raw, content_type="application/json")
        assert response.status_code == 400 and response.json["error"], raw[:10]
    assert lab_state(generated_lab) == before


def test_wrong_pass_is_403_then_429_with_retry_after(generated_lab: LabEnv, client: FlaskClient) -> None:
    before = lab_state(generated_lab)
    pem, _ = make_csr("newbie")
    for _ in range(5):
        response = client.post(
            "/v1/ssl/sign",
            json={"name": "newbie", "days": 3, "pass": "guess", "csr": pem},
            environ_base={"REMOTE_ADDR": "192.0.2.7"},
        )
        assert response.status_code == 403 and response.json == {"error": "wrong passphrase", "field": "pass"}
    assert lab_state(generated_lab) == before  # no file, no inventory row
    sixth = client.post(
        "/v1/ssl/sign",
        json={"name": "newbie", "days": 3, "pass": "guess", "csr": pem},
        environ_base={"REMOTE_ADDR": "192.0.2.7"},
    )
    assert sixth.status_code == 429 and 0 < int(sixth.headers["Retry-After"]) <= 900
    assert "error" in sixth.json
    right = client.post(
        "/v1/ssl/sign",
        json={"name": "newbie", "days": 3, "pass": generated_lab.passphrase, "csr": pem},
        environ_base={"REMOTE_ADDR": "192.0.2.7"},
    )
    assert right.status_code == 429
    other = client.post(
        "/v1/ssl/sign",
        json={"name": "newbie", "days": 3, "pass": generated_lab.passphrase, "csr": pem},
        environ_base={"REMOTE_ADDR": "192.0.2.8"},
    )
    assert other.status_code == 201


def test_unknown_entity_is_404_and_protected_names_409(generated_lab: LabEnv, client: FlaskClient) -> None:
    response = client.post("/v1/ssl/sign", json={"name": "ghost", "days": 3, "pass": generated_lab.passphrase})
    assert (response.status_code, response.json["field"]) == (404, "name")
    for name in ("root_ca", "mosquitto", "dashboard", "provisioner"):
        for route in ("sign", "create"):
            response = client.post(f"/v1/ssl/{route}", json={"name": name, "days": 3, "pass": generated_lab.passphrase})
            assert (response.status_code, response.json["field"]) == (409, "name")


def test_read_only_routes(generated_lab: LabEnv, client: FlaskClient, viewer_headers: dict[str, str]) -> None:
    """The root and the CRL are public; the inventory needs a session or an API token (a viewer's will do)."""
    root = client.get("/v1/ssl/ca")
    assert root.status_code == 200 and root.mimetype == "application/x-pem-file"
    assert root.data == (generated_lab.certs_dir / "root_ca" / "root_ca.crt").read_bytes()
    crl = client.get("/v1/ssl/crl")
    assert crl.status_code == 200
    parsed = x509.load_pem_x509_crl(crl.data)
    assert parsed.is_signature_valid(load_certificate(root.data).public_key())
    refused = client.get("/v1/ssl/certs")
    assert refused.status_code == 401 and "error" in refused.json and "certificates" not in refused.json
    assert client.get("/v1/ssl/certs", headers={"Authorization": "Bearer iotca_not-a-token"}).status_code == 401
    listing = client.get("/v1/ssl/certs", headers=viewer_headers).json["certificates"]
    assert {row["name"] for row in listing} >= {"root_ca", "mosquitto", "dashboard", "device001", "device002"}
    assert all("pem" not in row for row in listing)
    only = client.get("/v1/ssl/certs?name=device001&status=valid", headers=viewer_headers).json["certificates"]
    assert [row["name"] for row in only] == ["device001"] and only[0]["state"] == "valid"
    assert client.get("/v1/ssl/certs?status=revoked", headers=viewer_headers).json["certificates"] == []
    bad = client.get("/v1/ssl/certs?status=weird", headers=viewer_headers)
    assert (bad.status_code, bad.json["field"]) == (400, "status")
    bad = client.get("/v1/ssl/certs?name=a/b", headers=viewer_headers)
    assert (bad.status_code, bad.json["field"]) == (400, "name")


def test_openapi_documents_every_route(app: Flask, client: FlaskClient) -> None:
    document = client.get("/v1/openapi.json").json
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/v1/"):
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                assert method.lower() in paths[rule.rule], (rule.rule, method)
    for route in ("/v1/ssl/sign", "/v1/ssl/create", "/v1/ssl/revoke", "/v1/ssl/tokens"):
        post = paths[route]["post"]
        assert post["requestBody"]["content"]["application/json"]["examples"]
        assert {"400", "403", "409", "413", "415", "429"} <= set(post["responses"])
    schemas = document["components"]["schemas"]
    assert {"name", "days", "pass", "csr", "token"} <= set(schemas["SignRequest"]["properties"])
    assert {"name", "days", "pass", "country", "state", "locality", "org", "unit", "cn", "email"} <= set(
        schemas["CreateRequest"]["properties"]
    )
    assert schemas["SignRequest"]["required"] == ["name", "days"]


def test_fifty_concurrent_sign_requests(generated_lab: LabEnv, app: Flask) -> None:
    """40 new entities with CSRs and 10 renewals of one device, all at once, against a threaded server."""
    passphrase = generated_lab.passphrase
    bodies = [
        {"name": f"bulk{i:02d}", "days": 30, "pass": passphrase, "csr": make_csr(f"bulk{i:02d}")[0]} for i in range(40)
    ]
    bodies += [{"name": "device001", "days": 30, "pass": passphrase} for _ in range(10)]
    before = len(app.extensions["test_ca"].service.inventory.list())
    start = threading.Barrier(len(bodies))

    def send(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        start.wait()
        return post_json(server.url("/v1/ssl/sign"), body)

    with ServerThread(app) as server, ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(send, bodies))
    assert [status for status, _ in results] == [201] * 50, [r for r in results if r[0] != 201][:3]
    serials = {body["serial"] for _, body in results}
    assert len(serials) == 50
    inventory = app.extensions["test_ca"].service.inventory
    rows = inventory.list()
    assert len(rows) == before + 50
    assert serials <= {row.serial for row in rows}
    root = load_certificate((generated_lab.certs_dir / "root_ca" / "root_ca.crt").read_bytes())
    for _, body in results:
        assert verify_leaf(root, load_certificate(body["crt"].encode()))
    # a CSR's key stays with its owner: the inventory (group-committed) is the only record, no folder
    by_name = {body["name"]: body for _, body in results}
    for i in range(40):
        current = inventory.current(f"bulk{i:02d}")
        assert current.pem == by_name[f"bulk{i:02d}"]["crt"]
        assert not (generated_lab.certs_dir / f"bulk{i:02d}").exists()
    # exactly one current certificate for the device renewed ten times at once: the one on disk
    active = inventory.list(name="device001", status="active")
    assert len(active) == 1
    on_disk = load_certificate((generated_lab.certs_dir / "device001" / "device001.crt").read_bytes())
    assert active[0].serial == format(on_disk.serial_number, "x")


def test_real_server_answers_413_as_json(app: Flask) -> None:
    with ServerThread(app) as server:
        status, body = post_json(server.url("/v1/ssl/sign"), {"pad": "x" * 70 * 1024})
    assert (status, body) == (413, {"error": "request body is larger than 64 KiB"})


# -- arbitrary input (strategies in ca_support) ---------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(json_values, request_like, request_like, request_like),
    route=st.sampled_from(["sign", "create"]),
    source=st.integers(0, 40),
)
def test_arbitrary_json_never_breaks_the_api(
    generated_lab: LabEnv, client: FlaskClient, body: Any, route: str, source: int
) -> None:
    body = concrete_body(body, generated_lab.passphrase)
    before = lab_state(generated_lab)
    response = client.post(
        f"/v1/ssl/{route}",
        data=json.dumps(body),
        content_type="application/json",
        environ_base={"REMOTE_ADDR": f"198.51.100.{source}"},
    )
    assert response.status_code in (200, 201, 400, 403, 404, 409, 429), (response.status_code, response.json)
    assert response.is_json
    if response.status_code >= 400:
        assert set(response.json) <= {"error", "field"} and response.json["error"]
        assert lab_state(generated_lab) == before, "a refused request changed something"
        assert generated_lab.passphrase not in response.get_data(as_text=True)
    else:
        check_issued(response.json, csr_key_unknown=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.binary(max_size=300),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "application/x-www-form-urlencoded", "application/merge-patch+json", ""]
    ),
)
def test_arbitrary_bytes_never_break_the_api(
    generated_lab: LabEnv, client: FlaskClient, raw: bytes, content_type: str
) -> None:
    response = client.post("/v1/ssl/sign", data=raw, content_type=content_type or None)
    assert response.status_code in (400, 403, 404, 409, 415, 429)
    assert response.is_json and response.json["error"]


# -- Step 12: the dashboard forwards to the CA service; the CA's internal port answers only the dashboard ------


def test_the_cas_internal_port_gives_a_local_process_nothing(generated_lab: LabEnv, app: Flask) -> None:
    """Without the secret only the dashboard and the CA share, every request on the CA's port is 401 and changes
    nothing: no signing with the passphrase, no inventory, no posing as an operator or as another address."""
    ca = ca_of(app)
    before = lab_state(generated_lab)
    body = {"name": "sneak", "days": 5, "pass": generated_lab.passphrase}
    for headers in ({}, {"X-IoTCA-Operator": "admin"}, {"X-IoTCA-Internal": "guess", "X-IoTCA-Operator": "admin"}):
        status, reply = post_json(f"{ca.internal_url}/v1/ssl/create", body, headers=headers)
        assert status == 401 and "error" in reply, (headers, status, reply)
        status, reply = post_json(
            f"{ca.internal_url}/v1/ssl/revoke", {"name": "device001", "pass": "x"}, headers=headers
        )
        assert status == 401, headers
        request = urllib.request.Request(f"{ca.internal_url}/v1/ssl/certs", headers=headers)  # noqa: S310
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)  # noqa: S310 - loopback
        assert refused.value.code == 401
    assert lab_state(generated_lab) == before
    # The same create through the dashboard's port works, as the seed's API always did (no session, `pass`).
    status, reply = post_json_via(app, "/v1/ssl/create", body)
    assert status == 201 and reply["name"] == "sneak"


def post_json_via(app: Flask, path: str, body: Any) -> tuple[int, Any]:
    response = app.test_client().post(path, json=body)
    return response.status_code, response.get_json()


def test_the_dashboard_answers_503_while_no_ca_replica_is_reachable(generated_lab: LabEnv, app: Flask) -> None:
    ca_of(app).server.shutdown()
    ca_of(app).server.server_close()
    response = app.test_client().post(
        "/v1/ssl/sign", json={"name": "device001", "days": 5, "pass": generated_lab.passphrase}
    )
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert response.get_json() == {"error": "the CA service is not reachable; retry in a few seconds"}

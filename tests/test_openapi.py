"""The API document (/v1/openapi.json): generated from the models, valid OpenAPI 3.1 (openapi-spec-validator), and
exactly as strict as the live server: schemathesis sends what the document allows and what it forbids to a real
dashboard (real Mosquitto, real HTTP server) and checks every answer against the document, with 0 failures.

Lean on purpose: at most MAX_EXAMPLES generated requests per operation and phase, derandomized (the same cases on
every run), no response-time check.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.generation.hypothesis.builder import HypothesisTestConfig, HypothesisTestMode, create_test

from dashboard.openapi import LOGIN, MODELS, ROUTES, openapi_document
from pki.generator import LabCertificates
from pki.requests import (
    CreateRequest,
    RequestError,
    RevokeRequest,
    SignRequest,
    TokenRequest,
    create_identity,
    normalise_name,
    parse,
)

from .ca_support import ServerThread, api_token, close_app, make_app, make_csr
from .conftest import LabEnv, make_lab_env
from .support import Broker

MAX_EXAMPLES = 20


def test_the_document_is_valid_openapi_3_1_and_every_schema_comes_from_a_model(client: Any) -> None:
    document = client.get("/v1/openapi.json").json
    validate(document)  # openapi-spec-validator: raises on the first error
    schemas = document["components"]["schemas"]
    for model in MODELS:
        assert model.__name__ in schemas
    # the live bound on days: the root's remaining life, not the 36500 of a document made without a CA
    days = schemas["SignRequest"]["properties"]["days"]["oneOf"][0]
    assert 3000 < days["maximum"] < 36500
    documented = {(route.method.upper(), route.path) for route in ROUTES}
    for rule in client.application.url_map.iter_rules():
        if rule.rule.startswith(("/v1/", "/healthz", "/metrics")):
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                assert (method, rule.rule) in documented, (method, rule.rule)


BODIES = {
    "/v1/ssl/sign": SignRequest,
    "/v1/ssl/create": CreateRequest,
    "/v1/ssl/revoke": RevokeRequest,
    "/v1/ssl/tokens": TokenRequest,
}
ORACLE_EXAMPLES = 100
ORACLE_MAX_DAYS = 3649


@pytest.mark.parametrize("path", list(BODIES))
def test_each_request_schema_allows_nothing_its_model_refuses(path: str) -> None:
    """In-process, and so many more bodies than over HTTP: every body schemathesis generates as valid from the
    document passes the model (and `create`'s cn rule). The other direction, invalid bodies refused, is the live
    run's (its coverage phase aims at every constraint of the document)."""
    mode = GenerationMode.POSITIVE
    schema = schemathesis.openapi.from_dict(openapi_document(ORACLE_MAX_DAYS))
    schema.config.update(base_url="http://127.0.0.1:9")  # never called
    model = BODIES[path]
    wrong: list[tuple[Any, Any]] = []

    @given(case=schema[path]["POST"].as_strategy(generation_mode=mode))
    @settings(
        max_examples=ORACLE_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        if isinstance(case.body, bytes):  # not JSON at all: the server answers 400
            assert mode == GenerationMode.NEGATIVE
            return
        body = json.loads(json.dumps(case.body))  # as the server decodes it
        if not isinstance(body, dict):
            assert mode == GenerationMode.NEGATIVE, body  # the server answers 400 for any other JSON
            return
        if mode == GenerationMode.POSITIVE and isinstance(body.get("csr"), str):
            body["csr"] = make_csr(normalise_name(body["name"]))[0]
        try:
            request = parse(model, body, max_days=ORACLE_MAX_DAYS)
            if isinstance(request, CreateRequest):
                create_identity(request, None)
            refused = None
        except RequestError as ex:
            refused = None if ex.status == 409 else ex  # a protected name is valid input, refused for who it is
        if (refused is None) != (mode == GenerationMode.POSITIVE):
            wrong.append((refused and refused.message, body))

    check()
    assert wrong == [], f"{len(wrong)} bodies where the document and the model disagree, e.g. {wrong[0]!r:.600}"


@dataclass
class LiveApi:
    lab: LabEnv
    server: ServerThread
    app: Flask
    viewer: str

    @property
    def url(self) -> str:
        return self.server.url("")


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    """A lab of its own (schemathesis issues and revokes in it), its broker, and the dashboard serving HTTP."""
    lab = make_lab_env(tmp_path_factory.mktemp("openapi-lab"))
    LabCertificates(lab.settings()).generate()
    broker = Broker(lab.certs_dir, lab.data_dir, lab.broker_port).start()
    app = make_app(lab, MQTT_ENABLED=True)
    bridge = app.extensions["mqtt_bridge"]
    if not bridge.started:  # the serving entry point starts it; create_app may leave that to it
        bridge.start()
    try:
        assert bridge.wait_connected(20), "the dashboard did not connect to the broker"
        with ServerThread(app) as server:
            yield LiveApi(lab, server, app, api_token(app, "viewer"))
    finally:
        close_app(app)
        broker.stop()


@pytest.fixture(scope="module")
def api_schema(live_api: LiveApi) -> Any:
    schema = schemathesis.openapi.from_url(live_api.url + "/v1/openapi.json")
    schema.config.update(base_url=live_api.url)
    schema.config.seed = 20261201
    # 64 KiB is the largest body the server reads (413 beyond): a limit of the transport, not of the schema.
    checks = schema.config.checks
    checks.positive_data_acceptance.expected_statuses = [*checks.positive_data_acceptance.expected_statuses, "413"]
    checks.negative_data_rejection.expected_statuses = [*checks.negative_data_rejection.expected_statuses, "413"]
    return schema


def _credentials(live: LiveApi, case: Any) -> dict[str, str]:
    """A viewer's token where the route needs a login; in a valid body, the real CA passphrase and, for a CSR, a real
    one for the body's name (a schema cannot say "signed by its own key"); invalid requests are sent as generated."""
    headers = {}
    if case.operation.definition.raw.get("security") == LOGIN:
        headers["Authorization"] = f"Bearer {live.viewer}"
    body = case.body
    positive = case.meta is None or case.meta.generation.mode == GenerationMode.POSITIVE
    if positive and isinstance(body, dict):
        if isinstance(body.get("pass"), str):
            body["pass"] = live.lab.passphrase
        if isinstance(body.get("csr"), str) and isinstance(body.get("name"), str):
            body["csr"] = make_csr(normalise_name(body["name"]))[0]
    return headers


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "path"),
    [(route.method.upper(), route.path) for route in ROUTES],
    ids=[f"{route.method.upper()} {route.path}" for route in ROUTES],
)
def test_the_live_api_answers_exactly_as_documented(api_schema: Any, live_api: LiveApi, method: str, path: str) -> None:
    """Schemathesis's phases as its own runner has them (the documented examples, the coverage phase's boundary and
    wrong-type cases, unsupported methods, then MAX_EXAMPLES generated requests, valid and invalid) and every check:
    no server error, documented status codes, content types, headers and response schemas, valid data accepted,
    invalid data refused."""
    operation = api_schema[path][method]

    def check(case: Any) -> None:
        case.call_and_validate(headers=_credentials(live_api, case), timeout=30)

    test = create_test(
        operation=operation,
        test_func=check,
        config=HypothesisTestConfig(
            project=api_schema.config,
            seed=api_schema.config.seed,
            modes=[HypothesisTestMode.EXAMPLES, HypothesisTestMode.COVERAGE, HypothesisTestMode.FUZZING],
            explicit_settings=settings(
                max_examples=MAX_EXAMPLES,
                derandomize=True,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
        ),
    )
    test()

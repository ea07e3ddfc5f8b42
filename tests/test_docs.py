"""The API reference: /v1/asyncapi.json describes the MQTT API with schemas the real replies fit, and /docs (Swagger
UI, vendored) renders the OpenAPI document in real Chromium with every outside request refused (offline)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from playwright.sync_api import Browser, Route

from lab.testing import DashboardProcess
from pki.replies import Error, Issued

from .conftest import LabEnv
from .support import Broker
from .test_browser import browser, log_in  # noqa: F401 - the browser fixture


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def test_asyncapi_describes_every_topic_and_every_reference_resolves(
    client: FlaskClient, viewer_headers: dict[str, str]
) -> None:
    assert client.get("/v1/asyncapi.json").status_code == 401  # like the rest of the console: logged in only
    response = client.get("/v1/asyncapi.json", headers=viewer_headers)
    assert response.status_code == 200
    document = response.get_json()
    assert document["asyncapi"] == "3.0.0"
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert {
        "ssl/sign",
        "ssl/create",
        "ssl/renew/{cn}",
        "ssl/{name}",
        "iot/thermometer/{device}/temperature",
        "iot/thermometer/{device}/status",
    } <= addresses
    found = list(refs(document))
    assert len(found) > 20
    for ref in found:
        resolve(document, ref)
    schemas = document["components"]["schemas"]
    assert "pass" in schemas["SignRequest"]["properties"] and "csr" in schemas["RenewRequest"]["properties"]


@pytest.mark.databases
def test_the_documented_reply_shapes_are_the_real_ones(generated_lab: LabEnv, client: FlaskClient) -> None:
    created = client.post("/v1/ssl/create", json={"name": "docs01", "days": 10, "pass": generated_lab.passphrase})
    assert created.status_code == 201
    Issued.model_validate(created.get_json())
    refused = client.post("/v1/ssl/create", json={"name": "docs02", "days": "ten", "pass": generated_lab.passphrase})
    assert refused.status_code == 400
    Error.model_validate(refused.get_json())


@pytest.mark.browser
@pytest.mark.integration
def test_docs_render_in_chromium_offline(
    broker: Broker,
    generated_lab: LabEnv,
    browser: Browser,  # noqa: F811
    tmp_path: Path,
) -> None:
    dashboard = DashboardProcess(generated_lab.env, tmp_path / "dashboard.log").start()
    outside: list[str] = []
    problems: list[str] = []

    def only_the_lab(route: Route) -> None:
        if route.request.url.startswith(dashboard.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    try:
        page = browser.new_page()
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.route("**/*", only_the_lab)
        log_in(page, dashboard, "admin", generated_lab.admin_password)
        page.goto(dashboard.url + "docs")
        # Swagger UI breaks long paths with <wbr>: find the operation by its data-path.
        page.wait_for_selector('.opblock-summary-path[data-path="/v1/ssl/sign"]', timeout=15000)
        assert page.locator(".opblock").count() >= 6
        page.screenshot(path=str(tmp_path / "docs.png"))
    finally:
        dashboard.stop()
    assert outside == [], f"the reference asked for outside resources: {outside}"
    assert problems == [], problems

"""Enrolment tokens without a broker: `python -m lab.enrolment tokens` filling a token file from the running CA,
a token file handing one line to each claimant, and the native runner giving enrolled devices a token and no
passphrase. tests/test_lifecycle.py has a real thermometer enrolling with a token and publishing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import enrolment, native_runner
from lab.enrolment import EnrolmentRefused, claim_token
from lab.mqtt import Identity
from pki.inventory import Inventory
from pki.service import token_digest

from .ca_support import ServerThread, close_app, issue_aged_certificate, make_app
from .conftest import LabEnv


def test_tokens_command_fills_a_token_file_from_the_running_ca(
    generated_lab: LabEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = make_app(generated_lab)
    try:
        with ServerThread(app) as server:
            path = tmp_path / "enrol" / "tokens"
            argv = ["tokens", "--names", "thermo01,thermo02", "--file", str(path), "--ca-url", server.url("")]
            assert enrolment.main(argv) == 0
            assert enrolment.main([*argv[:2], "thermo03", *argv[3:]]) == 0  # appends
            name, token = claim_token(path, "replica-1")
            assert name == "thermo01"
            assert app.extensions["test_ca"].service.inventory.token(token_digest(token)).name == "thermo01"
            assert [line.split()[0] for line in path.read_text().splitlines()] == ["thermo01", "thermo02", "thermo03"]
            assert (path.parent / "root_ca.crt").read_bytes() == (
                generated_lab.certs_dir / "root_ca" / "root_ca.crt"
            ).read_bytes()
            assert token not in capsys.readouterr().out
            bad = ["tokens", "--names", "dashboard", "--file", str(path), "--ca-url", server.url("")]
            assert enrolment.main(bad) == 1 and "protected name" in capsys.readouterr().err
    finally:
        close_app(app)


def test_token_file_claims_one_line_per_claimant(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# name token [claimed by]\nthermo01 tok1\nthermo02 tok2\n")
    assert claim_token(path, "host-a") == ("thermo01", "tok1")
    assert claim_token(path, "host-b") == ("thermo02", "tok2")
    assert claim_token(path, "host-a") == ("thermo01", "tok1")  # a restarted replica finds its own line
    with pytest.raises(EnrolmentRefused, match="every token"):
        claim_token(path, "host-c")
    assert path.read_text().splitlines()[1:] == ["thermo01 tok1 host-a", "thermo02 tok2 host-b"]
    assert (path.stat().st_mode & 0o777) == 0o600


def test_native_runner_gives_enrolled_devices_a_token_and_no_passphrase(generated_lab: LabEnv) -> None:
    settings = generated_lab.settings()
    runner = native_runner.LabRunner(settings, ["device001"], dashboard=False, enrol=["device005"])
    tokens = runner.enrolment_tokens()
    assert set(tokens) == {"device005"} and tokens["device005"]
    inventory = Inventory(settings.effective_database_url)
    try:
        assert inventory.token(token_digest(tokens["device005"])).name == "device005"
    finally:
        inventory.close()
    services = native_runner.build_services(
        settings, ["device001"], dashboard=False, enrol=tokens, base_env=dict(generated_lab.env)
    )
    device = next(s for s in services if s.name == "device005")
    assert device.env["ENROL_TOKEN"] == tokens["device005"] and device.env["DEVICE_ID"] == "device005"
    assert device.env["CA_URL"] == f"http://127.0.0.1:{settings.dashboard_port}"
    assert all("CA_PASSPHRASE" not in s.env for s in services if s.kind == "device")
    # the root is pinned in the device's folder before it enrols
    root = (generated_lab.certs_dir / "root_ca" / "root_ca.crt").read_bytes()
    assert Identity.of(settings.certs_dir, "device005").ca_cert.read_bytes() == root
    # a device that enrolled earlier keeps its certificate: no new token
    issue_aged_certificate(generated_lab, "device005", days=365, days_left=200)
    assert runner.enrolment_tokens() == {"device005": None}

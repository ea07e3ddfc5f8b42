"""One rule for valid / expiring / expired (pki/status.py): its boundaries, and no second copy anywhere."""

from __future__ import annotations

import re

import pytest

from pki.config import PROJECT_ROOT
from pki.status import EXPIRED, EXPIRING, VALID, expiry_state

# A comparison against the renewal window, or of days left with 0: how each copy of the rule was written.
A_COPY = re.compile(
    r"[<>]=?\s*[\w.]*renew_before_days|renew_before_days\s*[<>]|[<>]=?\s*RENEW_BEFORE_DAYS"
    r"|\bleft\s*<=\s*0"
)


@pytest.mark.parametrize(
    ("days_left", "state"),
    [(-1, EXPIRED), (0, EXPIRED), (0.01, EXPIRING), (29.99, EXPIRING), (30, VALID), (365, VALID)],
)
def test_the_rule_at_its_boundaries(days_left: float, state: str) -> None:
    assert expiry_state(days_left, 30) == state


def test_no_other_module_or_script_decides_it() -> None:
    places = [
        *PROJECT_ROOT.glob("*.py"),
        *PROJECT_ROOT.glob("pki/**/*.py"),
        *PROJECT_ROOT.glob("dashboard/**/*.py"),
        *PROJECT_ROOT.glob("lab/**/*.py"),
        *PROJECT_ROOT.glob("ca/**/*.py"),
        *PROJECT_ROOT.glob("dashboard/static/*.js"),
        *PROJECT_ROOT.glob("dashboard/static/js/*.js"),
    ]
    copies = [
        f"{path.relative_to(PROJECT_ROOT)}:{number}: {line.strip()}"
        for path in places
        if path.name != "status.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if A_COPY.search(line) and "must be smaller" not in line and ">= settings.cert_days" not in line
    ]
    assert copies == []

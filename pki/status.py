"""The states of a certificate (and of the CRL) that every view shares: one owner for "valid / expiring / expired".

`--check`, `./setup.sh status`, the dashboard, the API (`/v1/ssl/certs`), `iotca certs` and the page all show
these words; each asks `expiry_state` and none computes its own (the page shows the server's `status` field).
"""

from __future__ import annotations

VALID, EXPIRING, EXPIRED = "valid", "expiring", "expired"
INVALID, MISSING = "invalid", "missing"


def expiry_state(days_left: float, renew_before_days: float) -> str:
    """`expired` once not_after has passed, `expiring` inside the renewal window (the last `renew_before_days`
    days: the generator reissues it, a device renews itself), else `valid`."""
    if days_left <= 0:
        return EXPIRED
    if days_left < renew_before_days:
        return EXPIRING
    return VALID

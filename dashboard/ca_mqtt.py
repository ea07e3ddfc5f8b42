"""The CA's MQTT endpoint: ssl/sign, ssl/create, ssl/renew/<cn> (placeholder until Step 3 fills it in)."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    return None

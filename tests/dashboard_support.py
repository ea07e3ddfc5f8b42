"""What the dashboard's test modules share: the app's live hub, and a Socket.IO tab with what it received."""

from __future__ import annotations

from typing import Any

from flask import Flask

from dashboard import socketio
from dashboard.live import LiveHub

from .ca_support import api_token


def hub_of(app: Flask) -> LiveHub:
    return app.extensions["live_hub"]


def live_tab(app: Flask) -> Any:
    """A Socket.IO client as a logged-in tab: the handshake carries a viewer API token (refused without one)."""
    client = socketio.test_client(app, headers={"Authorization": f"Bearer {api_token(app)}"})
    assert client.is_connected()
    return client


def events(client: Any, name: str) -> list[dict[str, Any]]:
    return [e["args"][0] for e in client.get_received() if e["name"] == name]

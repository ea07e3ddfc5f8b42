"""The dashboard's MQTT log: one line per message, its payload shown as a redacted preview (dashboard/live.py).

A CA request (passphrase, token, CSR) is never shown; a reply under ssl/ only as JSON with its secrets redacted;
PEM blobs are shortened and private keys replaced, wherever they appear.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

CA_REQUEST_TOPICS = ("ssl/sign", "ssl/create")
CA_RENEW_PREFIX = "ssl/renew/"
PAYLOAD_PREVIEW = 400  # characters of payload kept per log line

SECRET_FIELDS = {"key", "pass", "passphrase", "password", "token", "private_key"}
PEM_RE = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.S)


class LogLine:
    """One MQTT message in the log. Its dict (payload preview, redaction) is built only when a push or a
    snapshot shows it: under a flood most lines are dropped from the capped log before anyone sees them."""

    __slots__ = ("id", "time", "topic", "payload", "qos", "retained", "note", "_entry")

    def __init__(self, line_id: int, when: float, topic: str, message: mqtt.MQTTMessage, note: str | None) -> None:
        """`topic` is the message's, decoded once by the caller (`message.topic` decodes on every access)."""
        self.id, self.time, self.topic, self.payload = line_id, when, topic, message.payload
        self.qos, self.retained, self.note = message.qos, bool(message.retain), note
        self._entry: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self._entry is None:
            try:
                preview = preview_payload(self.topic, self.payload)
            except Exception:  # a line that cannot be shown must not stop every later push
                log.exception("could not preview a payload on %s", self.topic)
                preview = "«unreadable payload»"
            entry = {
                "id": self.id,
                "time": self.time,
                "topic": self.topic,
                "payload": preview,
                "size": len(self.payload),
                "direction": direction_of(self.topic),
                "qos": self.qos,
                "retained": self.retained,
            }
            if self.note:
                entry["note"] = self.note
            self._entry, self.payload = entry, b""  # the raw bytes are not kept once previewed (redacted)
        return self._entry


def _redact(value: Any) -> Any:
    """Never show secrets in the log: private keys, passphrases, tokens; shorten PEM blobs."""
    if isinstance(value, dict):
        return {k: ("«redacted»" if k.lower() in SECRET_FIELDS and v else _redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, str):
        return _shorten_pem(value)
    return value


def _shorten_pem(text: str) -> str:
    def repl(match: re.Match[str]) -> str:
        if "PRIVATE KEY" in match.group(1):
            return "«private key redacted»"
        return f"«{match.group(1).lower()}, {len(match.group(0))} bytes»"

    return PEM_RE.sub(repl, text)


def is_ca_request(topic: str) -> bool:
    return topic in CA_REQUEST_TOPICS or topic.startswith(CA_RENEW_PREFIX)


def preview_payload(topic: str, payload: bytes) -> str:
    """What the log shows of a payload: text, secrets redacted, at most PAYLOAD_PREVIEW characters.

    A CA request (passphrase, token, CSR) is never shown, whatever it contains: redaction that depends on
    parsing misses a passphrase in a payload that is not valid JSON. A reply under ssl/ is shown only as JSON
    with its secrets redacted.
    """
    if is_ca_request(topic):
        return f"«CA request, {len(payload)} bytes, not shown»"
    text = payload.decode("utf-8", errors="replace")
    if topic.startswith("ssl/") or "PRIVATE KEY" in text:
        try:
            text = json.dumps(_redact(json.loads(text)), separators=(",", ":"))
        except (ValueError, RecursionError):  # not JSON, or nested too deep to walk
            if topic.startswith("ssl/"):
                return f"«{len(payload)} bytes, not JSON, not shown»"
            text = "«private key redacted»" if "PRIVATE KEY" in text else _shorten_pem(text)
    if len(text) > PAYLOAD_PREVIEW:
        text = text[: PAYLOAD_PREVIEW - 1] + "…"
    return text


def direction_of(topic: str) -> str:
    """`in`: to the dashboard (telemetry, presence, CA requests); `out`: the dashboard's CA replies."""
    if topic.startswith("ssl/") and not is_ca_request(topic):
        return "out"
    return "in"

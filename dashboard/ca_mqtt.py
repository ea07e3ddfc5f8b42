"""The CA's MQTT endpoint: requests on `ssl/sign`, `ssl/create` and `ssl/renew/<CN>`, replies on `ssl/<name>` (QoS 1).

Renewal needs no passphrase: the broker's ACL lets a certificate write only `ssl/renew/<its CN>`, so the topic
proves who asks, and `CAService.renew` takes the CN from the topic (its reply goes to `ssl/<CN>`).

A thin adapter over `pki.service.CAService`, like the HTTP routes: decode the JSON, call the service, publish
its reply body unchanged. MQTT v5 requests with a ResponseTopic also get the reply there, with their
CorrelationData; every reply carries the HTTP status as the user property `status` (v5 subscribers see it).

Messages arrive on paho's network thread through the dashboard's single MqttBridge; they are handed to a small
worker pool at once, so signing never stalls the connection. Nothing a publisher sends can stop the
subscriber: every failure is answered (when there is somewhere to answer) and logged.

With CA_SHARED_SUBSCRIPTION=1 the endpoint subscribes to `$share/ca/ssl/sign`, `$share/ca/ssl/create` and
`$share/ca/ssl/renew/+`, so several dashboard/CA processes split the requests between them.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as mqtt
from flask import Flask
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pki.config import lab_environ
from pki.lockout import IDENTITY_PREFIX
from pki.requests import UNAVAILABLE, readable_name
from pki.service import CAService, Reply

from .ca_http import ensure_ca_service
from .mqtt_bridge import MqttBridge

log = logging.getLogger(__name__)

OPERATIONS = ("sign", "create")
RENEW_PREFIX = "ssl/renew/"
SHARE_GROUP = "ca"
# Workers mostly wait (for the inventory's group commit, i.e. an fsync): enough of them lets concurrent requests
# share one commit. Requests queued beyond MAX_PENDING (a few MB) get a 503 instead of growing memory without
# bound; it is sized for an enrolment storm of a thousand devices.
WORKERS = 32
MAX_PENDING = 4096


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class CAMqttEndpoint:
    """Subscribes through the bridge, works in a pool, replies through the bridge."""

    def __init__(
        self, service: CAService, bridge: MqttBridge, *, shared: bool = False, workers: int = WORKERS,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.service = service
        self.bridge = bridge
        self.shared = shared
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ca-mqtt")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._counts_lock = threading.Lock()
        # Observable progress (health checks, tests): requests received, handled, and replies by status.
        self.received = 0
        self.handled = 0
        self.by_status: dict[int, int] = {}

    def topic_filters(self) -> list[str]:
        prefix = f"$share/{SHARE_GROUP}/" if self.shared else ""
        return ([f"{prefix}ssl/{operation}" for operation in OPERATIONS]
                + [f"{prefix}{RENEW_PREFIX}+"]
                + [f"{prefix}ssl/{operation}/+" for operation in OPERATIONS])

    def register(self) -> None:
        for topic_filter in self.topic_filters():
            self.bridge.subscribe(topic_filter, self.on_message, qos=1)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    @property
    def idle(self) -> bool:
        with self._counts_lock:
            return self.handled == self.received

    def stats(self) -> dict[str, Any]:
        with self._counts_lock:
            return {"received": self.received, "handled": self.handled,
                    "by_status": {str(k): v for k, v in sorted(self.by_status.items())}}

    # -- network thread: copy what we need, hand over, return ------------------------------------------

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if topic.startswith(RENEW_PREFIX):
            operation, cn = "renew", topic[len(RENEW_PREFIX):]
            if not cn or "/" in cn:
                return
        else:
            parts = topic.split("/")
            operation = parts[1] if len(parts) in (2, 3) and parts[0] == "ssl" else ""
            if operation not in OPERATIONS:
                return
            # ssl/<op>/<CN>: the ACL lets only <CN> write there, so the lockout can count on the CN.
            cn = None
            if len(parts) == 3:
                cn = parts[2]
                if not cn:
                    return
                operation = f"{operation}/cn"
        properties = getattr(message, "properties", None)
        response_topic = getattr(properties, "ResponseTopic", None) or None
        correlation = getattr(properties, "CorrelationData", None)
        payload = bytes(message.payload)
        with self._counts_lock:
            self.received += 1
        if not self._slots.acquire(blocking=False):
            self._finish(operation, payload, response_topic, correlation,
                         Reply(UNAVAILABLE, {"error": "the CA is busy; retry in a few seconds"}), cn)
            return
        try:
            self.pool.submit(self._work, operation, payload, response_topic, correlation, cn)
        except RuntimeError:  # the pool is shut down (app closing)
            self._slots.release()
            with self._counts_lock:
                self.handled += 1

    # -- worker threads --------------------------------------------------------------------------------

    def _work(
        self, operation: str, payload: bytes, response_topic: str | None, correlation: bytes | None, cn: str | None
    ) -> None:
        try:
            reply = self._handle(operation, payload, cn)
            self._finish(operation, payload, response_topic, correlation, reply, cn)
        except Exception:  # never lose the worker; the service itself already turns errors into replies
            log.exception("ssl/%s: unexpected failure while answering", operation)
            with self._counts_lock:
                self.handled += 1
        finally:
            self._slots.release()

    def _handle(self, operation: str, payload: bytes, cn: str | None = None) -> Reply:
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):
            return Reply(400, {"error": "the payload is not valid JSON"})
        if operation == "renew":  # ssl/renew/<cn>: only <cn>'s certificate may publish here (ACL)
            assert cn is not None
            return self.service.renew(cn, body, via="mqtt", requester=f"mqtt:{cn}")
        call = self.service.sign if operation.startswith("sign") else self.service.create
        if cn is not None:  # ssl/<op>/<cn>: the broker proved the publisher's CN (pki/lockout.py)
            return call(body, source=f"{IDENTITY_PREFIX}{cn}", via="mqtt", requester=f"mqtt:{cn}")
        # ssl/sign, ssl/create: the replier never learns who published (MQTT hides it), so the lockout counts
        # per requested name and, with a higher limit, over every such request (pki/lockout.py).
        name = readable_name(body)
        return call(body, source="mqtt", via="mqtt", requester=f"mqtt:{name or '?'}")

    def _finish(
        self, operation: str, payload: bytes, response_topic: str | None, correlation: bytes | None, reply: Reply,
        cn: str | None = None,
    ) -> None:
        name = reply.body.get("name") if reply.ok else None
        if operation == "renew":  # a renewal is answered to the CN of its topic, whatever the body said
            name = readable_name({"name": cn})
        elif name is None:
            try:
                name = readable_name(json.loads(payload))
            except (ValueError, RecursionError):
                name = None
        if not reply.ok and name is None:
            log.info("ssl/%s: %s; no usable name, so no reply on ssl/<name>", operation, reply.body.get("error"))
        encoded = json.dumps(reply.body).encode()
        topics = [f"ssl/{name}"] if name else []
        if response_topic and response_topic not in topics:
            topics.append(response_topic)
        for topic in topics:
            self._publish(topic, encoded, reply, correlation)
        with self._counts_lock:
            self.handled += 1
            self.by_status[reply.status] = self.by_status.get(reply.status, 0) + 1

    def _publish(self, topic: str, payload: bytes, reply: Reply, correlation: bytes | None) -> None:
        properties = Properties(PacketTypes.PUBLISH)
        # The HTTP status (and Retry-After, lower-cased) travel as v5 user properties; the body is the HTTP body.
        properties.UserProperty = [("status", str(reply.status))] + [(k.lower(), v) for k, v in reply.headers.items()]
        if correlation is not None:
            properties.CorrelationData = correlation
        try:
            self.bridge.publish(topic, payload, qos=1, properties=properties)
        except (ValueError, TypeError) as ex:  # e.g. a ResponseTopic with wildcards
            log.warning("could not reply on %r: %s", topic, ex)


def init_app(app: Flask) -> None:
    service = ensure_ca_service(app)
    # From the app config, else the environment or .env like every other lab setting.
    shared = app.config.get("CA_SHARED_SUBSCRIPTION", lab_environ().get("CA_SHARED_SUBSCRIPTION", ""))
    endpoint = CAMqttEndpoint(service, app.extensions["mqtt_bridge"], shared=_truthy(shared))
    endpoint.register()
    app.extensions["ca_mqtt"] = endpoint

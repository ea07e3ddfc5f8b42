"""The CA's MQTT endpoint: requests on `ssl/sign`, `ssl/create` and `ssl/renew/<CN>`, replies on `ssl/<name>` (QoS 1).

`ssl/sign/<CN>` and `ssl/create/<CN>` take the same requests from a proven CN (the ACL lets only <CN> write
there), so the lockout counts wrong passphrases per certificate (pki/lockout.py), and a failure can be answered
on the requester's own `ssl/<CN>`.

Renewal needs no passphrase: the broker's ACL lets a certificate write only `ssl/renew/<its CN>`, so the topic
proves who asks, and `CAService.renew` takes the CN from the topic (its reply goes to `ssl/<CN>`).

A thin adapter over `pki.service.CAService`, like the HTTP routes: decode the JSON, call the service, publish
its reply body unchanged, only where the requester reads (`reply_topics`): a certificate on `ssl/<name as
written>`, a failure of `sign`/`create` only on the request's MQTT v5 ResponseTopic (`ssl/<CN>/...`), never on
another identity's `ssl/<name>`. Replies carry the request's CorrelationData and the HTTP status as the user
property `status` (v5 subscribers see it). Retained requests are never processed, and are cleared.

The CA process has its own MQTT connection (`CAConnection`: stock paho, MQTT v5, clean session, as its own
identity `ca-<n>`) and always subscribes through the shared subscription `$share/ca/...`, so each request goes
to exactly one replica (round-robin, Mosquitto) and replicas split the load. Messages are handed from paho's
network thread to a small worker pool at once, so signing never stalls the connection. Nothing a publisher
sends can stop the subscriber: every failure is answered (when there is somewhere to answer) and logged.

Requests reach the CA at QoS 0: a request lost in the instant a replica dies (or its connection drops) gets no
reply, and the requester asks again after a timeout (a device renewing does: lab/renewal.py; README, "CA
replicas"). Mosquitto 2.0.11 does not hand a departed member's in-flight messages to another member, so QoS 1
would not save them either.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from lab.mqtt import ConnectionPolicy, IdentityConnection
from pki.config import Settings
from pki.lockout import IDENTITY_PREFIX
from pki.requests import UNAVAILABLE, readable_name
from pki.service import CAService, Reply

log = logging.getLogger(__name__)

OPERATIONS = ("sign", "create")
RENEW_PREFIX = "ssl/renew/"
SHARE_GROUP = "ca"
# Workers mostly wait (for the inventory's group commit, i.e. an fsync): enough of them lets concurrent requests
# share one commit. Requests queued beyond MAX_PENDING (some 30 MB of requests) get a 503 instead of growing memory
# without bound; it is sized for an enrolment storm of ten thousand devices on one replica.
WORKERS = 32
MAX_PENDING = 16384
MAX_INFLIGHT = 1000


def _is_reply_topic(topic: str) -> bool:
    """A topic the CA may answer on: under ssl/, no wildcards, not one of the request topics."""
    if not topic.startswith("ssl/") or "+" in topic or "#" in topic:
        return False
    return not any(
        topic == f"ssl/{op}" or topic.startswith(f"ssl/{op}/") for op in OPERATIONS
    ) and not topic.startswith(RENEW_PREFIX)


class CAConnection(IdentityConnection):
    """The CA's own MQTT connection (lab/mqtt.py `IdentityConnection`): MQTT v5, a clean session, and renewed
    certificate files taken into use at once (a new client; requests of the moment between are the clients' to
    retry). Subscribes in on_connect, so reconnects resubscribe."""

    # A clean session that ends with the connection: the broker keeps nothing of ours (no request, with its
    # passphrase, saved in its persistence file), and a departed replica leaves no queue behind.
    policy = ConnectionPolicy(protocol=mqtt.MQTTv5, clean=True, max_delay=10, jitter=0)

    def __init__(self, settings: Settings, name: str) -> None:
        super().__init__(settings, name)
        self._filters: list[str] = []
        self._handler: Callable[[mqtt.MQTTMessage], None] | None = None

    def subscribe(self, topic_filters: list[str], handler: Callable[[mqtt.MQTTMessage], None]) -> None:
        self._filters, self._handler = list(topic_filters), handler

    def status(self) -> dict[str, Any]:
        return {**super().status(), "identity": self.name, "broker": self.broker}

    def _configure(self, client: mqtt.Client) -> None:
        # Replies are QoS 1: let many be in flight (paho's default of 20 serialises a burst on round trips).
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_message = self._on_message

    def _on_up(self, client: mqtt.Client) -> None:
        # QoS 0 towards the CA (module docstring); the retain flag as published, so retained requests are seen.
        options = SubscribeOptions(qos=0, retainAsPublished=True)
        if self._filters:
            client.subscribe([(f, options) for f in self._filters])

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._handler is None:
            return
        try:
            self._handler(message)
        except Exception:  # a bad message must never stop the network loop
            log.exception("the CA failed on a message to %s", message.topic)


class CAMqttEndpoint:
    """Subscribes on the CA's connection, works in a pool, replies on the same connection."""

    def __init__(
        self,
        service: CAService,
        connection: CAConnection,
        *,
        workers: int = WORKERS,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.service = service
        self.connection = connection
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ca-mqtt")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._counts_lock = threading.Lock()
        # Observable progress (health checks, tests): requests received, handled, and replies by status.
        self.received = 0
        self.handled = 0
        self.by_status: dict[int, int] = {}
        self.retained_ignored = 0

    @staticmethod
    def topic_filters() -> list[str]:
        prefix = f"$share/{SHARE_GROUP}/"
        return (
            [f"{prefix}ssl/{operation}" for operation in OPERATIONS]
            + [f"{prefix}{RENEW_PREFIX}+"]
            + [f"{prefix}ssl/{operation}/+" for operation in OPERATIONS]
        )

    def register(self) -> None:
        self.connection.subscribe(self.topic_filters(), self.on_message)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    @property
    def idle(self) -> bool:
        with self._counts_lock:
            return self.handled == self.received

    def stats(self) -> dict[str, Any]:
        with self._counts_lock:
            return {
                "received": self.received,
                "handled": self.handled,
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "retained_ignored": self.retained_ignored,
            }

    # -- network thread: copy what we need, hand over, return ------------------------------------------

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if topic.startswith(RENEW_PREFIX):
            operation, cn = "renew", topic[len(RENEW_PREFIX) :]
            if not cn or "/" in cn:
                return
        else:
            parts = topic.split("/")
            operation = parts[1] if len(parts) in (2, 3) and parts[0] == "ssl" else ""
            if operation not in OPERATIONS:
                return
            # ssl/<op>/<CN>: the ACL lets only <CN> write there, so the lockout can count on the CN.
            cn = parts[2] if len(parts) == 3 else None
            if cn == "":
                return
        if message.retain:  # one request, one answer: a retained request would be answered again at every
            self._refuse_retained(topic, bool(message.payload))  # reconnect, so it is never processed at all
            return
        properties = getattr(message, "properties", None)
        response_topic = getattr(properties, "ResponseTopic", None) or None
        correlation = getattr(properties, "CorrelationData", None)
        payload = bytes(message.payload)
        with self._counts_lock:
            self.received += 1
        if not self._slots.acquire(blocking=False):
            self._finish(
                operation,
                None,
                response_topic,
                correlation,
                Reply(UNAVAILABLE, {"error": "the CA is busy; retry in a few seconds"}),
                cn,
            )
            return
        try:
            self.pool.submit(self._work, operation, payload, response_topic, correlation, cn)
        except RuntimeError:  # the pool is shut down (the CA is stopping)
            self._slots.release()
            with self._counts_lock:
                self.handled += 1

    def _refuse_retained(self, topic: str, has_payload: bool) -> None:
        if not has_payload:  # the deletion of a retained message (ours, below): nothing to do
            return
        with self._counts_lock:
            self.retained_ignored += 1
        log.warning("ignored a retained request on %s (never processed) and cleared it", topic)
        # Delete it from the broker, so its secrets are not kept there (nor sent to the next CA that subscribes).
        self.connection.publish(topic, b"", qos=1, retain=True)

    # -- worker threads --------------------------------------------------------------------------------

    def _work(
        self, operation: str, payload: bytes, response_topic: str | None, correlation: bytes | None, cn: str | None
    ) -> None:
        try:
            body, reply = self._handle(operation, payload, cn)
            written = body.get("name") if isinstance(body, dict) else None
            self._finish(operation, written, response_topic, correlation, reply, cn)
        except Exception:  # never lose the worker; the service itself already turns errors into replies
            log.exception("ssl/%s: unexpected failure while answering", operation)
            with self._counts_lock:
                self.handled += 1
        finally:
            self._slots.release()

    def _handle(self, operation: str, payload: bytes, cn: str | None = None) -> tuple[object, Reply]:
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):
            return None, Reply(400, {"error": "the payload is not valid JSON"})
        if operation == "renew":  # ssl/renew/<cn>: only <cn>'s certificate may publish here (ACL)
            assert cn is not None
            return body, self.service.renew(cn, body, via="mqtt", requester=f"mqtt:{cn}")
        call = self.service.sign if operation == "sign" else self.service.create
        if cn is not None:  # ssl/<op>/<cn>: the broker proved the publisher's CN (pki/lockout.py)
            return body, call(body, source=f"{IDENTITY_PREFIX}{cn}", via="mqtt", requester=f"mqtt:{cn}")
        # ssl/sign, ssl/create: the replier never learns who published (MQTT hides it), so the lockout counts
        # per requested name and, with a higher limit, over every such request (pki/lockout.py).
        name = readable_name(body)
        return body, call(body, source="mqtt", via="mqtt", requester=f"mqtt:{name or '?'}")

    def reply_topics(
        self,
        written_name: object,
        response_topic: str | None,
        reply: Reply,
        cn: str | None = None,
        operation: str = "sign",
    ) -> list[str]:
        """Where an answer goes: only to topics the requester reads, never onto a third party's reply topic.

        - `ssl/renew/<CN>`: only that CN may publish there (ACL), so success or failure goes to `ssl/<CN>`.
        - `ssl/sign/<CN>`, `ssl/create/<CN>`: the publisher is proven too; a certificate goes to `ssl/<name as
          written>`, a failure to the requester's own `ssl/<CN>`.
        - `ssl/sign`, `ssl/create`: the publisher is unknown (MQTT hides it). A certificate goes to
          `ssl/<name as written>` (a MAC keeps its colons, as the seed names the topic); a failure only to the
          request's MQTT v5 response topic, and never to a bare `ssl/<x>`, which is some identity's own reply
          topic: nobody can flood another device's `ssl/<name>` with failures and break its renewal.
        - A response topic must be under `ssl/` and not a request topic (the CA would answer itself).
        """
        topics: list[str] = []
        own = f"ssl/{cn}" if cn is not None and readable_name({"name": cn}) else None
        if operation == "renew" or (own and not reply.ok):
            topics += [own] if own else []
        elif reply.ok and isinstance(written_name, str) and readable_name({"name": written_name}):
            topics.append(f"ssl/{written_name}")
        if response_topic and _is_reply_topic(response_topic) and response_topic not in topics:
            if reply.ok or response_topic.count("/") >= 2:
                topics.append(response_topic)
        return topics

    def _finish(
        self,
        operation: str,
        written_name: object,
        response_topic: str | None,
        correlation: bytes | None,
        reply: Reply,
        cn: str | None = None,
    ) -> None:
        topics = self.reply_topics(written_name, response_topic, reply, cn, operation)
        if not topics:
            log.info(
                "ssl/%s: %s; no reply topic the requester is known to read, so no reply",
                operation,
                reply.body.get("error"),
            )
        encoded = json.dumps(reply.body).encode()
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
            self.connection.publish(topic, payload, qos=1, properties=properties)
        except (ValueError, TypeError) as ex:  # e.g. a ResponseTopic with wildcards
            log.warning("could not reply on %r: %s", topic, ex)

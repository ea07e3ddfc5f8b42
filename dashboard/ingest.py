"""The telemetry ingest: a connection of its own (identity `ingest-<n>`) that reads the readings, on stock paho.

Separate from the dashboard's connection (the CA's traffic and its log, revocation), so a telemetry flood never
queues behind a CA request and the CA's secrets never share a session with it; it also reads the devices'
presence for the live hub. What it needs and no more:

- MQTT 3.1.1: telemetry needs no v5 property, and paho decodes a 3.1.1 PUBLISH without building Properties.
- Subscription QoS 0 (devices still publish at QoS 1, so the broker has each reading): QoS 1 would cost a PUBACK
  per message and, with Mosquitto's window of 20 unacknowledged messages, one round trip per 20 readings.
- A persistent session (clean_session=False; Mosquitto keeps it until the identity comes back): while the
  ingest is away (a broker restart, its own restart) the broker keeps its subscription and queues what matches
  it, QoS 0 included (`queue_qos0_messages` in mosquitto.conf), up to `max_queued_messages`; persisted by the
  broker (autosave_interval), so a kill -9 of the broker keeps it too.

Replicas: with `shared=True` the filter is `$share/ingest/iot/thermometer/+/temperature` and Mosquitto hands each
reading to one member of the group, round-robin. Each replica has its own identity (`INGEST_ID`, the broker forces
client id = certificate CN, so two processes with one identity would kick each other off). What a replica that
is gone means for its share: tests/test_scale.py and the README ("Scaling").

`python -m dashboard.ingest` runs one replica on its own (stores what it reads, tells every dashboard over the
readings bus, dashboard/bus.py); inside `python -m dashboard` the live hub is the sink.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from lab.mqtt import ConnectionPolicy, IdentityConnection
from pki.broker import PRESENCE_TOPICS, TELEMETRY_TOPICS
from pki.config import Settings

log = logging.getLogger(__name__)

SHARE_GROUP = "ingest"
TEMPERATURE_QOS = 0
Handler = Callable[[mqtt.MQTTMessage], None]


def telemetry_filter(shared: bool) -> str:
    return f"$share/{SHARE_GROUP}/{TELEMETRY_TOPICS}" if shared else TELEMETRY_TOPICS


class TelemetryIngest(IdentityConnection):
    """One ingest connection: every reading it receives goes to `handler` (on paho's network thread).

    With `presence`, it also reads every device's retained presence (PRESENCE_TOPICS, QoS 1), never shared: each
    dashboard process shows every device's state, and a shared subscription gets no retained messages.

    Renewed certificate files are taken into use at the next reconnect only (lab/mqtt.py `IdentityConnection`): an
    open connection is never cut by the CRL, so the old certificate serves until the connection drops anyway, and
    switching a live one would lose the QoS 0 readings already on their way in its socket. The new client resumes
    the persistent session, in which the broker queued the readings of the moment between (queue_qos0_messages).
    """

    policy = ConnectionPolicy(protocol=mqtt.MQTTv311, clean=False, switch_at_once=False)

    def __init__(
        self,
        settings: Settings,
        handler: Handler,
        *,
        name: str | None = None,
        shared: bool = False,
        presence: Handler | None = None,
    ) -> None:
        name = name or settings.ingest_id
        super().__init__(settings, name, label=f"ingest {name}")
        self.handler = handler
        self.presence = presence
        self.topic_filter = telemetry_filter(shared)
        self.subscribed = threading.Event()
        self.received = 0

    def wait_subscribed(self, timeout: float = 10) -> bool:
        return self.subscribed.wait(timeout)

    def status(self) -> dict[str, Any]:
        return {**super().status(), "identity": self.name, "filter": self.topic_filter, "received": self.received}

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _configure(self, client: mqtt.Client) -> None:
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message

    def _on_up(self, client: mqtt.Client) -> None:
        client.subscribe(self.topic_filter, qos=TEMPERATURE_QOS)
        if self.presence is not None:
            client.subscribe(PRESENCE_TOPICS, qos=1)

    def _on_down(self) -> None:
        self.subscribed.clear()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if any(reason.is_failure for reason in reasons):
            self.last_error = f"subscription refused: {reasons}"
            log.warning("ingest %s: %s", self.name, self.last_error)
            return
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            if self.presence is not None and message.topic.endswith("/status"):
                self.presence(message)
                return
            self.received += 1
            self.handler(message)
        except Exception:  # a bad message must never stop the network loop
            log.exception("ingest %s: handler failed on a message to %s", self.name, message.topic)


def _thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, name="ingest-flush", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    """`python -m dashboard.ingest [--id ingest-<n>]`: one ingest replica, with no web server."""
    import argparse
    import signal

    from pki.config import ConfigError, lab_environ

    from . import configure_logging
    from .bus import ReadingsBus
    from .live import LiveHub
    from .readings import ReadingStore

    parser = argparse.ArgumentParser(prog="python -m dashboard.ingest", description=main.__doc__)
    parser.add_argument("--id", help="the identity to connect as (default INGEST_ID, ingest-1)")
    parser.add_argument(
        "--stats",
        type=float,
        default=0,
        metavar="SECONDS",
        help="print `received <n> stored <m>` every SECONDS (benchmarks)",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env({**lab_environ(), **({"INGEST_ID": args.id} if args.id else {})})
    except ConfigError as ex:
        print(f"error: {ex}", flush=True)
        return 2
    if not settings.socketio_message_queue:
        # Without Redis no dashboard would show its readings, and a dashboard's own ingest (a plain subscription
        # then) would store every reading a second time.
        print(
            "error: SOCKETIO_MESSAGE_QUEUE is not set: an ingest replica of its own needs the Redis that the "
            "dashboards share (README, Scaling)",
            flush=True,
        )
        return 2
    configure_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # The live hub without browsers: it parses each reading as the dashboard does, stores it in batches, and
    # publishes it on the readings bus for the dashboards to show.
    hub = LiveHub(settings, lambda *_: None, store=ReadingStore(settings.effective_database_url))
    hub.bus = ReadingsBus(settings.socketio_message_queue)
    hub.bus.start()
    ingest = TelemetryIngest(settings, hub.on_temperature, shared=True)
    ingest.start()
    hub.start(_thread)
    try:
        if not ingest.wait_subscribed(30):
            print(f"error: {ingest.name} not subscribed within 30 s: {ingest.last_error}", flush=True)
            return 1
        print(f"{ingest.name} subscribed to {ingest.topic_filter}", flush=True)
        while not stop.wait(args.stats or 1.0):
            if args.stats:
                print(f"received {ingest.received} stored {hub.stored_total}", flush=True)
    finally:
        ingest.stop()
        hub.bus.stop()  # sends what the ingest took
        hub.close()  # the last flush stores what is pending
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

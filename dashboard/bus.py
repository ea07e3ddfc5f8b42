"""The readings bus: what one ingest replica received, to every dashboard process, over Redis pub/sub.

With replicas, the shared subscription hands each reading to ONE ingest replica, which stores it (once) and
publishes it here; every live hub applies what other processes published as if its own ingest had received
it (without storing it again), so the state a browser sees is complete whichever dashboard it talks to.
The receiving process `offer`s each reading; a publisher thread sends what came in every PUBLISH_INTERVAL as
one message, so a reading reaches the other dashboards ~10 ms after it reached the first. Same Redis as
Flask-SocketIO's message queue (SOCKETIO_MESSAGE_QUEUE); nothing here without it.

A message is JSON `{"o": origin, "m": [[topic, received_at, payload], ...]}`: the raw MQTT payload (latin-1,
so any bytes survive JSON), so a peer logs and parses it exactly as the receiving process did. Pub/sub is
fire-and-forget: a dashboard that is down misses what is published meanwhile, and reloads the readings from
the database when it starts (LiveHub.load_history), like a restarted single dashboard does.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Sequence

import redis

log = logging.getLogger(__name__)

CHANNEL = "iot-lab:readings"
# Seconds between two publishes of what arrived meanwhile: a reading shown by another dashboard waits this, then
# that dashboard's own push tick (live_emitter.FLUSH_INTERVAL), so this must stay small next to it.
PUBLISH_INTERVAL = 0.01

Received = tuple[str, float, bytes]  # topic, server receive time, payload
Handler = Callable[[list[Received]], None]


class ReadingsBus:
    def __init__(self, url: str, channel: str = CHANNEL) -> None:
        self.url = url
        self.channel = channel
        self.origin = uuid.uuid4().hex  # this process: its own messages come back and are skipped
        self.redis = redis.Redis.from_url(url)
        self._worker: redis.client.PubSubWorkerThread | None = None
        self._pubsub: redis.client.PubSub | None = None
        self._outbox: list[Received] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._publisher: threading.Thread | None = None

    def offer(self, topic: str, when: float, payload: bytes) -> None:
        """A reading this process received (any thread): published within PUBLISH_INTERVAL."""
        with self._lock:
            self._outbox.append((topic, when, payload))

    def start(self) -> None:
        """The publisher thread (`offer`'s batches); `listen` for the other direction."""
        if self._publisher is None:
            self._stop.clear()
            self._publisher = threading.Thread(target=self._publish_loop, name="readings-bus", daemon=True)
            self._publisher.start()

    def _publish_loop(self) -> None:
        while not self._stop.wait(PUBLISH_INTERVAL):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            batch, self._outbox = self._outbox, []
        try:
            self.publish(batch)
        except Exception:  # Redis away: these are stored anyway; the other dashboards miss them live
            log.exception("could not publish %d readings to the other dashboards", len(batch))

    def publish(self, received: Sequence[Received]) -> None:
        if not received:
            return
        body = {"o": self.origin, "m": [[topic, when, payload.decode("latin-1")] for topic, when, payload in received]}
        self.redis.publish(self.channel, json.dumps(body, separators=(",", ":")))

    def listen(self, handler: Handler) -> None:
        """Call `handler` (on redis-py's worker thread) with each batch another process published."""

        def on_message(message: dict[str, object]) -> None:
            try:
                body = json.loads(message["data"])  # type: ignore[arg-type]
                if body.get("o") == self.origin:
                    return
                handler([(str(t), float(w), str(p).encode("latin-1")) for t, w, p in body["m"]])
            except Exception:  # a bad message must not stop the worker
                log.exception("could not apply a readings batch from the bus")

        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(**{self.channel: on_message})
        self._pubsub = pubsub
        self._worker = pubsub.run_in_thread(sleep_time=1.0, daemon=True)

    def stop(self) -> None:
        self._stop.set()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.join(timeout=5)
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
            worker.join(timeout=5)
        if self._pubsub is not None:
            self._pubsub.close()
            self._pubsub = None
        self.redis.close()

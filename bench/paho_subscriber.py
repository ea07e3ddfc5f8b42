"""The baseline of the telemetry bench: a bare paho subscriber that only counts what it receives.

Run by bench/telemetry.py as its own process (so it has a core and a GIL to itself, like the dashboard),
with the same identity, protocol and subscription QoS as the dashboard's bridge. It prints `ready` once
subscribed, then `count <n>` ten times a second on stdout; it stops when stdin closes or on SIGTERM.

    python -m bench.paho_subscriber --certs-dir CERTS --port 8883 [--name dashboard] [--qos 1] [--protocol 5]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from lab.mqtt import Identity, make_client

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.paho_subscriber", description=__doc__.split("\n\n")[0])
    parser.add_argument("--certs-dir", type=Path, required=True, help="the lab's certificates folder")
    parser.add_argument("--port", type=int, required=True, help="the broker's TLS port")
    parser.add_argument("--host", default="localhost", help="the broker's host name (default localhost)")
    parser.add_argument("--name", default="dashboard", help="identity to connect with (default dashboard)")
    parser.add_argument("--topic", default="iot/thermometer/+/temperature", help="topic filter")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1, help="subscription QoS (default 1)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="5", help="MQTT version (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    count = 0
    done = threading.Event()
    subscribed = threading.Event()
    protocol = PROTOCOLS[args.protocol]
    client = make_client(Identity.of(args.certs_dir, args.name), args.name, protocol=protocol)

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            print(f"error connection refused: {reason}", flush=True)
            done.set()
            return
        client.subscribe(args.topic, args.qos)

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        subscribed.set()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal count
        count += 1

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    try:
        if not subscribed.wait(15):
            print("error not subscribed within 15 s", flush=True)
            return 1
        print("ready", flush=True)
        while not done.wait(0.1):
            print(f"count {count}", flush=True)
        print(f"count {count}", flush=True)
    finally:
        client.disconnect()
        client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Revocation cut-off: from `POST /v1/ssl/revoke` to the device's connection closed, "revoked" on the dashboard,
its publishes dropped and its reconnect refused.

Each round enrols a fresh device through the CA (its own key and CSR), connects it with that certificate and
has it publish telemetry (QoS 1, a sequence number in every reading) every `--interval-ms`. The dashboard
app's own ingest is the observer: its `/api/data` shows the newest sequence number it received from the device.
Once readings flow, the device is revoked over HTTP while it keeps publishing for `--observe` seconds.

  closed         from the revoke request to the broker closing the device's connection (the CA asks Mosquitto's
                 dynamic-security plugin to disconnect it before it replies: ca/revocation.py)
  shown          from the revoke request to `/api/data` showing the device offline with its certificate revoked
                 (polled every 20 ms)
  cut-off        the first reading the dashboard never received was sent this long after the revoke request
                 (the readings are in order, so everything after it was dropped too; resolution one interval)
  refused        from the revoke request on, a TLS handshake with the revoked certificate every `--probe-ms`
                 (TLS 1.2, where the broker checks the client certificate inside the handshake; no MQTT
                 CONNECT, so the probes never kick the publishing device off): the start of the first
                 handshake the broker refuses (CRL). After the round a full MQTT reconnect must be refused too.

    python -m bench.revocation --rounds 5
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench.ca_lab import CALab, HttpClient, bench_parser, enrol, environment_note, output_dirs, wait_for_quiet
from bench.common import Progress, plot_timeseries, summary_ms, write_results
from bench.rig import positive_float, positive_int
from lab.mqtt import Identity, make_client, tls_context
from lab.testing import wait_for

TARGET_S = 2.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("revocation", __doc__)
    parser.add_argument(
        "--rounds", type=positive_int, default=5, help="devices revoked, one after the other (default 5)"
    )
    parser.add_argument(
        "--interval-ms",
        type=positive_float,
        default=10.0,
        help="the device publishes a reading this often (default 10 ms)",
    )
    parser.add_argument(
        "--observe",
        type=positive_float,
        default=3.0,
        help="seconds the device keeps publishing after the revoke request (default 3)",
    )
    parser.add_argument(
        "--probe-ms",
        type=positive_float,
        default=50.0,
        help="pause between two reconnect attempts with the revoked certificate (default 50 ms)",
    )
    return parser.parse_args(argv)


class Publisher:
    """The device: one connection with its own certificate, a reading with a sequence number every interval."""

    def __init__(self, identity: Identity, name: str, port: int, interval: float) -> None:
        self.name = name
        self.port = port
        self.interval = interval
        self.topic = f"iot/thermometer/{name}/temperature"
        self.client = make_client(identity, name)
        self.connected = threading.Event()
        self.disconnected_at: float | None = None  # time.monotonic() when the broker closed the connection
        self.client.on_connect = lambda _c, _u, _f, reason, _p: None if reason.is_failure else self.connected.set()
        self.client.on_disconnect = self._on_disconnect
        self.sent: dict[int, float] = {}  # seq -> time.monotonic() when handed to the client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        if self.disconnected_at is None and not self._stop.is_set():
            self.disconnected_at = time.monotonic()

    def start(self) -> Publisher:
        self.client.connect("localhost", self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(15):
            raise RuntimeError(f"{self.name} could not connect")
        self._thread.start()
        return self

    def _run(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            seq += 1
            payload = json.dumps({"device_id": self.name, "timestamp": time.time(), "temperature": 21.5, "seq": seq})
            self.sent[seq] = time.monotonic()
            self.client.publish(self.topic, payload, qos=1)
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.disconnect()
        self.client.loop_stop()


def try_connect(identity: Identity, name: str, port: int, timeout: float = 5.0) -> tuple[bool, str]:
    """One connection attempt with `identity`: (accepted, what happened). Closed again at once if accepted."""
    client = make_client(identity, name)
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        outcome.setdefault("result", (not reason.is_failure, f"CONNACK {reason}"))
        done.set()

    def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        outcome.setdefault("result", (False, f"disconnected before CONNACK ({reason})"))
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("localhost", port, keepalive=30)
    except OSError as ex:  # ssl.SSLError included: the handshake itself failed
        return False, f"{type(ex).__name__}: {ex}"
    client.loop_start()
    try:
        if not done.wait(timeout):
            return False, "no CONNACK"
        return outcome["result"]
    finally:
        client.disconnect()
        client.loop_stop()


def tls_probe(identity: Identity, port: int) -> tuple[bool, str]:
    """A TLS 1.2 handshake with `identity` and nothing else: (accepted, why not)."""
    context = tls_context(identity)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost"):
                return True, ""
        except (ssl.SSLError, OSError) as ex:
            return False, f"{type(ex).__name__}: {getattr(ex, 'reason', None) or ex}"


class Prober:
    """TLS handshakes with the revoked certificate every `pause` seconds from `t0`, until one is refused."""

    def __init__(self, identity: Identity, port: int, pause: float, t0: float, until: float) -> None:
        self.identity, self.port, self.pause, self.t0, self.until = identity, port, pause, t0, until
        self.refused_at: float | None = None
        self.refusal = ""
        self.attempts = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while time.monotonic() < self.until:
            started = time.monotonic()
            self.attempts += 1
            accepted, why = tls_probe(self.identity, self.port)
            if not accepted:
                self.refused_at, self.refusal = started - self.t0, why
                return
            time.sleep(self.pause)


def device_view(http: HttpClient, name: str) -> dict[str, Any]:
    """What `/api/data` says about `name`: newest seq received, presence, certificate state."""
    status, body = http.get_json("/api/data")
    if status != 200:
        raise RuntimeError(f"/api/data answered {status}")
    return body.get("device_data", {}).get(name) or {}


def delivered_seq(http: HttpClient, name: str) -> int:
    """The newest sequence number of `name` the dashboard's ingest has received (0 for none)."""
    return int(device_view(http, name).get("seq") or 0)


def one_round(lab: CALab, index: int, args: argparse.Namespace) -> dict[str, Any]:
    name = f"victim-{index:02d}"
    identity = enrol(lab, [name], f"enrolling {name}")[name]
    http = lab.http()
    publisher = Publisher(identity, name, lab.broker_port, args.interval_ms / 1000).start()
    seen: list[tuple[float, int]] = []  # (monotonic, newest seq at the dashboard), polled through the round
    try:
        wait_for(lambda: delivered_seq(http, name) > 10, timeout=20, what=f"readings of {name} at the dashboard")
        accepted, why = tls_probe(identity, lab.broker_port)
        if not accepted:
            raise RuntimeError(f"a handshake with {name}'s certificate was refused before revocation: {why}")
        t0 = time.monotonic()
        prober = Prober(identity, lab.broker_port, args.probe_ms / 1000, t0, t0 + args.observe)
        status, body = http.post_json(
            "/v1/ssl/revoke", {"name": name, "pass": lab.passphrase, "reason": "keyCompromise"}
        )
        answered = time.monotonic() - t0
        if status != 200:
            raise RuntimeError(f"revoke {name}: {status} {body}")
        deadline = t0 + args.observe
        shown: float | None = None
        while time.monotonic() < deadline:
            view = device_view(http, name)
            now = time.monotonic() - t0
            seen.append((now, int(view.get("seq") or 0)))
            if shown is None and (view.get("status"), view.get("certificate")) == ("offline", "revoked"):
                shown = now
            time.sleep(0.02)
    finally:
        publisher.stop()
    prober.thread.join()
    time.sleep(0.5)  # let anything still in flight arrive before the final reading
    last = delivered_seq(http, name)
    last_sent = max(publisher.sent)
    first_dropped = last + 1
    cutoff = publisher.sent[first_dropped] - t0 if first_dropped in publisher.sent else None
    reconnect_accepted, reconnect = try_connect(identity, name, lab.broker_port)  # the device tries again
    http.close()
    closed = publisher.disconnected_at - t0 if publisher.disconnected_at is not None else None
    return {
        "device": name,
        "revoke_reply_ms": round(answered * 1000, 1),
        "closed_ms": round(closed * 1000, 1) if closed is not None else None,
        "shown_ms": round(shown * 1000, 1) if shown is not None else None,
        "cutoff_ms": round(cutoff * 1000, 1) if cutoff is not None else None,
        "last_delivered_seq": last,
        "last_sent_seq": last_sent,
        "dropped_after_revoke": last_sent - last,
        "refused_ms": round(prober.refused_at * 1000, 1) if prober.refused_at is not None else None,
        "refusal": prober.refusal,
        "probe_handshakes": prober.attempts,
        "reconnect_refused": not reconnect_accepted,
        "reconnect": reconnect,
        "_seen": seen,
        "_sent": publisher.sent,
        "_t0": t0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    busy = wait_for_quiet(args)
    results_dir, plots_dir = output_dirs(args.out)
    rounds = []
    with CALab(args.key_type, keep=args.keep) as lab:
        lab.generate()
        lab.start_broker()
        lab.start_dashboard(args.server)
        progress = Progress(args.rounds, "revocation rounds")
        for index in range(args.rounds):
            rounds.append(one_round(lab, index, args))
            progress.update()
        progress.close()
    cutoffs = [r["cutoff_ms"] / 1000 for r in rounds if r["cutoff_ms"] is not None]
    refusals = [r["refused_ms"] / 1000 for r in rounds if r["refused_ms"] is not None]
    closed = [r["closed_ms"] / 1000 for r in rounds if r["closed_ms"] is not None]
    shown = [r["shown_ms"] / 1000 for r in rounds if r["shown_ms"] is not None]
    failures = [
        r["device"]
        for r in rounds
        if r["cutoff_ms"] is None
        or r["refused_ms"] is None
        or r["closed_ms"] is None
        or r["shown_ms"] is None
        or not r["reconnect_refused"]
        or r["dropped_after_revoke"] <= 0
    ]
    figures = {
        "rounds": args.rounds,
        "interval_ms": args.interval_ms,
        "observe_s": args.observe,
        "key_type": args.key_type,
        "server": args.server,
        "closed": summary_ms(closed),
        "shown": summary_ms(shown),
        "cutoff": summary_ms(cutoffs),
        "refused": summary_ms(refusals),
        "revoke_reply": summary_ms([r["revoke_reply_ms"] / 1000 for r in rounds]),
        "failures": failures,
        "per_round": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rounds],
        "environment": environment_note(busy),
        "target_s": TARGET_S,
        "target_met": not failures and bool(cutoffs) and max(cutoffs + refusals + closed + shown) < TARGET_S,
    }
    report(figures)
    write_results("revocation", figures, results_dir)
    plot(rounds[0], plots_dir)
    return 1 if failures else 0


def report(figures: dict[str, Any]) -> None:
    print(
        f"\nrevocation: {figures['rounds']} devices publishing every {figures['interval_ms']:g} ms, "
        f"revoked over HTTP ({figures['key_type'].upper()} CA, {figures['server']})"
    )
    for r in figures["per_round"]:
        print(
            f"  {r['device']}: revoke answered in {r['revoke_reply_ms']} ms; connection closed at "
            f"{r['closed_ms']} ms, revoked and offline on the dashboard at {r['shown_ms']} ms; "
            f"publishes dropped from "
            f"{r['cutoff_ms']} ms ({r['dropped_after_revoke']} readings dropped); handshakes refused from "
            f"{r['refused_ms']} ms ({r['refusal']}); MQTT reconnect "
            f"{'refused' if r['reconnect_refused'] else 'ACCEPTED'} ({r['reconnect']})"
        )
    cutoff, refused = figures["cutoff"], figures["refused"]
    print(
        f"  after the revoke request: connection closed p50 {figures['closed'].get('p50_ms')} ms, max "
        f'{figures["closed"].get("max_ms")} ms; "revoked" on the dashboard p50 '
        f"{figures['shown'].get('p50_ms')} ms, max {figures['shown'].get('max_ms')} ms"
    )
    print(
        f"  publishes dropped: p50 {cutoff.get('p50_ms')} ms, max {cutoff.get('max_ms')} ms; reconnect refused: "
        f"p50 {refused.get('p50_ms')} ms, max {refused.get('max_ms')} ms "
        f"(target < {TARGET_S * 1000:g} ms: {'met' if figures['target_met'] else 'not met'})"
    )
    if figures["failures"]:
        print(f"  FAILED: {', '.join(figures['failures'])}")


def plot(first: dict[str, Any], plots_dir: Path) -> None:
    """Readings sent and readings the dashboard received around the revoke request (time 0), first round."""
    t0 = first["_t0"]
    window = (-0.2, 0.5)  # the cut-off is tens of milliseconds: show the half second around it
    sent = sorted((at - t0, seq) for seq, at in first["_sent"].items() if window[0] <= at - t0 <= window[1])
    seen = [(at, seq) for at, seq in first["_seen"] if at <= window[1]]
    plot_timeseries(
        {
            "sent by the device (seq)": ([s for s, _ in sent], [q for _, q in sent]),
            "newest at the dashboard (seq)": ([s for s, _ in seen], [q for _, q in seen]),
        },
        f"Revocation of {first['device']}: revoke request at t = 0",
        "sequence number",
        plots_dir / "revocation.png",
    )


if __name__ == "__main__":
    sys.exit(main())

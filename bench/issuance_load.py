"""The issuance bench's load drivers: closed loops from threads (`run_threads`) or a window of requests in flight
per MQTT connection (`run_mqtt`), each bounded by a duration and a count (bench.issuance)."""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable

from bench.ca_lab import LoadResult, Outcome, Requester
from bench.common import Progress

VERIFY_SAMPLE = 25


class Ticker:
    """A progress bar that follows the clock (levels are bounded by time)."""

    def __init__(self, label: str, duration: float) -> None:
        self.progress = Progress(int(duration * 10), label)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            if self.progress.done < self.progress.total:
                self.progress.update()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.progress.close()


class LoadRun:
    """What the threads of one load share: the next request index (until `count` or `duration`), the outcomes, and
    a sample of the reply payloads by index (checked afterwards)."""

    def __init__(self, duration: float, count: int, label: str) -> None:
        self.counter = itertools.count()
        self.count, self.duration, self.label = count, duration, label
        self.result = LoadResult(started=time.perf_counter())
        self.deadline = self.result.started + duration
        self.sample_every = max(1, count // (VERIFY_SAMPLE * 4))
        self.samples: dict[int, bytes] = {}
        self.lock = threading.Lock()

    def next_index(self) -> int | None:
        i = next(self.counter)
        return None if i >= self.count or time.perf_counter() >= self.deadline else i

    def keep(self, i: int, payload: bytes) -> None:
        if i % self.sample_every == 0:
            self.samples[i] = payload

    def drive(self, loops: list[Callable[[], None]]) -> None:
        """Run every loop in a thread of its own, with the progress ticker, until all of them return."""
        ticker = Ticker(self.label, self.duration)
        threads = [threading.Thread(target=loop, daemon=True) for loop in loops]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ticker.close()


def run_threads(
    threads: int, duration: float, count: int, call: Callable[[int], tuple[int, bytes]], label: str
) -> tuple[LoadResult, dict[int, bytes]]:
    """`threads` closed loops calling `call(i)`; returns the result and a sample of reply payloads by index."""
    load = LoadRun(duration, count, label)
    result = load.result

    def loop() -> None:
        mine = []
        while (i := load.next_index()) is not None:
            outcome = Outcome(sent=time.perf_counter())
            status, payload = call(i)
            outcome.received, outcome.status = time.perf_counter(), status
            mine.append(outcome)
            load.keep(i, payload)
        with load.lock:
            result.outcomes.extend(mine)

    load.drive([loop] * threads)
    result.outcomes.sort(key=lambda o: o.received)
    result.finished = max((o.received for o in result.outcomes), default=result.started)
    return result, load.samples


def run_mqtt(
    requesters: list[Requester],
    window: int,
    duration: float,
    count: int,
    request: Callable[[Requester, int], tuple[str, bytes] | None],
    label: str,
) -> tuple[LoadResult, dict[int, bytes]]:
    """Each requester keeps `window` requests in flight; `request(requester, i)` gives (topic, payload), or None
    when that requester has nothing more to send."""
    load = LoadRun(duration, count, label)
    result, lock = load.result, load.lock
    sent = [0]

    def feed(requester: Requester) -> None:
        slots = threading.Semaphore(window)
        while True:
            slots.acquire()
            i = load.next_index()
            if i is None:
                break

            def done(outcome: Outcome, i: int = i) -> None:
                with lock:
                    result.outcomes.append(outcome)
                load.keep(i, outcome.payload)
                slots.release()

            message = request(requester, i)
            if message is None:
                break
            requester.send(message[0], message[1], done)
            with lock:
                sent[0] += 1

    load.drive([functools.partial(feed, r) for r in requesters])
    # the last requests still in flight: wait for them (bounded), then count what never came back
    drain_until = time.perf_counter() + 30
    while time.perf_counter() < drain_until:
        with lock:
            if len(result.outcomes) >= sent[0]:
                break
        time.sleep(0.01)
    with lock:
        lost = sent[0] - len(result.outcomes)
        result.outcomes.sort(key=lambda o: o.received)
    result.finished = max((o.received for o in result.outcomes), default=result.started)
    result.outcomes.extend(Outcome(sent=result.started, received=result.finished, status=0) for _ in range(lost))
    return result, load.samples

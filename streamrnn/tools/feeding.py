"""What the demo and the benchmarks share: feeding streams round-robin through the real
producer client, waiting until a daemon trained what it got, widening a config to a
number of streams, and summing up ack latencies."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..config import Config

if TYPE_CHECKING:  # pyzmq only where a producer is made: bench engine runs without it
    from ..client import Producer


def round_robin(producer: Producer, streams: dict[str, bytes], chunk: int,
                go_on: Callable[[], bool], wrap: bool = False) -> dict[str, int]:
    """Send `chunk` bytes of each stream in turn while `go_on()` says so; returns the
    bytes sent per stream. Without `wrap` a stream stops at its end (all of them: the
    feeding stops); with it, it starts its text again, so no stream runs dry."""
    sent = {name: 0 for name in streams}
    while go_on():
        progressed = False
        for name, data in streams.items():
            start = sent[name] % len(data) if wrap else sent[name]
            piece = data[start:start + chunk]
            if piece and go_on():
                producer.send(name, np.frombuffer(piece, np.uint8), offset=sent[name])
                sent[name] += len(piece)
                progressed = True
        if not progressed:
            break
    return sent


def wait_trained(control: Producer, timeout: float = 600, poll: float = 0.2) -> dict:
    """Wait until the daemon has trained everything it holds (ask it to flush first for
    the last r < k1 targets of each stream); its status then, or at the timeout."""
    deadline = time.monotonic() + timeout
    while (status := control.status())["queued_tokens"] > 0 and time.monotonic() < deadline:
        time.sleep(poll)
    return status


def widened(config: Config, num_streams: int) -> Config:
    """The config with room for `num_streams` in one update and on the device."""
    train = config.train
    return replace(config, train=replace(
        train, max_batch_streams=max(train.max_batch_streams, num_streams),
        max_resident_streams=max(train.max_resident_streams, num_streams)))


def latency_summary(latencies) -> dict:
    """p50, p99 and max (seconds) and the count of a list of ack latencies."""
    values = np.asarray(latencies, float) if len(latencies) else np.zeros(1)
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "max": float(values.max()), "count": int(len(latencies))}


def write_json(result: dict, path: str | None, echo=None) -> None:
    """A benchmark's result as JSON at `path` (nothing if None); `echo` says where."""
    if not path:
        return
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    if echo is not None:
        echo(f"# wrote {path}")

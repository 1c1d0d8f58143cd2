"""Read the daemon's score feed: how surprising each line (or token) of a stream was.

`ScoreReader` reads the feed at endpoints it is given; client.Scores is the same reader,
which can also ask a daemon where its feeds are (`Scores.of`):

    with Scores.of("tcp://127.0.0.1:5557") as scores:     # finds every rank's feed
        for record in scores:                             # waits for the next, as tail -f
            if record["score"] > 0.999:
                print(record["stream"], record["line"], record["text"])

A record is a dict (serve/scores.py and core/lines.py say what each field means): a
`line` record per line of a watched stream once its last token is trained, a `tokens`
record per update with each scored target. Binary fields come back as numpy arrays
(`token_bits`; a tokens record's `tokens`, `bits`, `expected`, `p_expected`); a line's
`text` stays bytes. The iterator adds `missed`: records the daemon dropped on this
topic since the last one received (this subscriber read too slowly), and `restarted`:
True on the first record of a new daemon process (after a crash its replayed updates
are published again: a line may come twice, with the same stream, line and offset;
deduplicate by (stream, line), keeping a complete record over an incomplete one).
"""
from __future__ import annotations

import time
from typing import Iterator

import msgpack
import numpy as np
import zmq

from .keys import secure_client

ARRAYS = {"token_bits": "<f4", "bits": "<f4", "p_expected": "<f4", "tokens": "<i4",
          "expected": "<i4"}


def topic(kind: str, stream: str | None = None) -> bytes:
    """The subscription for records of `kind` (line or tokens) of one stream, or of
    every stream (None)."""
    if stream is None:
        return f"{kind}:".encode()
    return f"{kind}:".encode() + stream.encode("utf-8", "surrogateescape") + b"\0"


class ScoreReader:
    def __init__(self, endpoints: str | list[str], streams: list[str] | None = None,
                 kinds: tuple[str, ...] = ("line",), *, server_key: str | None = None,
                 client_key: str | None = None, idle_timeout: float | None = None):
        """Subscribe to `kinds` of records of `streams` (None: every stream) at these
        score endpoints (one per rank). Iterating waits for records for good, as tail -f
        does, unless `idle_timeout`: then TimeoutError after that many seconds without
        one. ZeroMQ reconnects by itself when a daemon restarts."""
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self.idle_timeout = idle_timeout
        self.context = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.poller = zmq.Poller()
        self.last: dict[tuple[int, bytes], tuple[int, int]] = {}  # -> (run, seq)
        try:
            for endpoint in self.endpoints:
                socket = self.context.socket(zmq.SUB)
                socket.linger = 0
                socket.rcvhwm = 100_000
                if server_key or client_key:
                    secure_client(socket, server_key, client_key)
                for kind in kinds:
                    for stream in (streams if streams else [None]):
                        socket.subscribe(topic(kind, stream))
                socket.connect(endpoint)
                self.sockets.append(socket)
                self.poller.register(socket, zmq.POLLIN)
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[dict]:
        while True:
            record = self.receive(self.idle_timeout)
            if record is None:
                raise TimeoutError(f"no score record for {self.idle_timeout:g} s")
            yield record

    def receive(self, timeout: float | None = None) -> dict | None:
        """The next record, or None after `timeout` seconds (None: wait for one)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = dict(self.poller.poll(None if left is None else int(left * 1000)))
            for index, socket in enumerate(self.sockets):
                if socket in ready:
                    record = self._decode(index, *socket.recv_multipart())
                    if record is not None:
                        return record
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _decode(self, index: int, name: bytes, payload: bytes = b"", *rest) -> dict | None:
        try:
            record = msgpack.unpackb(payload, raw=False)
        except (ValueError, msgpack.UnpackException):
            return None  # not a record (nothing the daemon sends)
        if not isinstance(record, dict):
            return None
        for key, dtype in ARRAYS.items():
            if isinstance(record.get(key), bytes):
                record[key] = np.frombuffer(record[key], dtype)
        run, seq = record.get("run"), record.get("seq")
        if isinstance(run, int) and isinstance(seq, int):
            before = self.last.get((index, name))
            record["restarted"] = before is not None and before[0] != run
            # (a topic subscribed to again starts again from 0: nothing was missed)
            record["missed"] = max(0, seq - before[1] - 1) if before and before[0] == run \
                else 0
            self.last[(index, name)] = (run, seq)
        return record

    def close(self) -> None:
        for socket in self.sockets:
            socket.close(linger=0)
        self.context.term()

    def __enter__(self) -> "ScoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

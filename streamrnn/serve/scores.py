"""The score feed: what the model did not expect, published as it trains.

A ZeroMQ XPUB socket at scores.endpoint (port + rank for several ranks). Subscribers
(`streamrnn watch`, client.Scores, any SUB socket) subscribe to topics:

    b"line:"   + stream id + b"\\0"    one record per line of the stream, once trained
    b"tokens:" + stream id + b"\\0"    one record per update, the stream's scored targets
    b"line:" or b"tokens:" alone       that kind, every stream;  b"" everything

(ZeroMQ matches prefixes; the closing NUL, which no stream id holds, makes a topic
name one stream.) Each message is [topic, msgpack record]; every record has `kind`,
`stream`, `seq` (per topic, from 0, in this process) and `run` (this process's start,
unix ms): a gap in seq means records were dropped, a new run a restart.

XPUB tells the daemon what is subscribed, so the learner scores only watched streams
(nothing at all while nobody subscribes). Sending never waits: each subscriber has
scores.send_queue records of room, and a record that finds a subscriber's queue full
is dropped (XPUB_NODROP + DONTWAIT: dropped for every subscriber of the topic), counted
in streamrnn_scores_dropped_total.
"""
from __future__ import annotations

import time

import numpy as np
import zmq

from ..config import Config
from ..core.learner import Scored
from ..core.lines import LineTracker
from ..subscriber import topic  # one spelling of a topic, for both ends
from ..wire import pack
from . import auth
from .metrics import Metrics
from .source import bind

MAX_TOPICS = 100_000  # subscriptions held at most; more are ignored (and counted)


class ScoreFeed:
    def __init__(self, config: Config, endpoint: str, context: zmq.Context,
                 metrics: Metrics):
        s = config.scores
        self.metrics = metrics
        self.alert_quantile = s.alert_quantile
        self.all_streams = s.all_streams
        line_token = s.resolved_line_token(config.model.vocab_size)
        self.tracker = LineTracker(line_token, s.recent_lines, s.warmup_lines,
                                   config.model.vocab_size) if line_token >= 0 else None
        self.run = time.time_ns() // 1_000_000
        self.topics: set[bytes] = set()     # subscribed prefixes
        self.prefixes: set[bytes] = set()   # those of them that are not one stream's
        self.watching: dict = {}  # stream -> (lines?, tokens?), for the current topics
        self.seq: dict[bytes, int] = {}
        self.socket = context.socket(zmq.XPUB)
        self.socket.linger = 0
        self.socket.sndhwm = s.send_queue
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)  # a full queue says so: we count it
        try:
            if config.ingest.curve_secret_key:  # subscribers need an allowed key too
                auth.curve_server(self.socket, config.ingest.curve_secret_key)
            bind(self.socket, endpoint, "scores.endpoint")
        except BaseException:
            self.socket.close(linger=0)
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    # ---- what is watched (the learner asks before each update) -------------------------
    @property
    def active(self) -> bool:
        self.read_subscriptions()
        return bool(self.topics) or self.all_streams

    def watched(self, streams: list) -> np.ndarray | None:
        """A bool per stream: its lines or tokens are subscribed to (or all_streams)."""
        wants = [self._wants(s) for s in streams]
        return np.array([lines or tokens for lines, tokens in wants], bool)

    def _wants(self, stream) -> tuple[bool, bool]:
        wants = self.watching.get(stream)
        if wants is None:
            if len(self.watching) >= MAX_TOPICS:
                self.watching.clear()
            wants = self.watching[stream] = (
                self.all_streams or self._subscribed(topic("line", stream)),
                self._subscribed(topic("tokens", stream)))
        return wants

    def _subscribed(self, name: bytes) -> bool:
        # a topic that ends in NUL names one stream: a set lookup; the others (a kind,
        # everything, a partial id) are prefixes, few in practice, tried one by one
        return name in self.topics or any(name.startswith(t) for t in self.prefixes)

    def read_subscriptions(self) -> None:
        """Take in (un)subscriptions: before each update, and once a turn of the loop.
        XPUB passes on the first subscription to a topic and the last unsubscription
        (not each subscriber's), so a set of topics is what is watched."""
        changed = False
        while True:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not frame or frame[0] not in (0, 1):
                self.metrics.score_subscriptions_refused.inc()  # not a subscription
                continue
            name = frame[1:]
            if frame[0] == 1 and name not in self.topics:
                if len(self.topics) >= MAX_TOPICS:
                    self.metrics.score_subscriptions_refused.inc()
                    continue
                self.topics.add(name)
                changed = True
            elif frame[0] == 0 and name in self.topics:
                self.topics.discard(name)
                changed = True
        if changed:
            self._resubscribed()

    def _resubscribed(self) -> None:
        self.prefixes = {t for t in self.topics if not t.endswith(b"\0")}
        before, self.watching = self.watching, {}
        for stream, (lines, _) in before.items():
            if lines and not self._wants(stream)[0] and self.tracker is not None:
                self.tracker.forget(stream)
        self.seq = {name: n for name, n in self.seq.items() if self._subscribed(name)}
        self.metrics.score_topics.set(len(self.topics))

    def prune(self, held) -> None:
        """Forget what is kept of streams no longer `held` (ended and forgotten by the
        learner), so streams that come and go do not pile up here."""
        gone = [stream for stream in self.watching if stream not in held]
        if self.tracker is not None:
            gone += [s for s in self.tracker.recent if s not in held]
        for stream in set(gone):
            self.watching.pop(stream, None)
            if self.tracker is not None:
                self.tracker.forget(stream)

    # ---- records (the learner hands over each update's scores at its host sync) -------
    def scored(self, scored: Scored) -> None:
        wants = [self._wants(s) for s in scored.streams]
        ends = np.cumsum(scored.counts)
        for i, (stream, (_, tokens)) in enumerate(zip(scored.streams, wants)):
            if tokens:
                at = slice(int(ends[i] - scored.counts[i]), int(ends[i]))
                self._send("tokens", stream, {
                    "kind": "tokens", "stream": stream,
                    "offset": int(scored.first_offset[i]),
                    "tokens": scored.tokens[at].astype("<i4").tobytes(),
                    "bits": scored.bits[at].astype("<f4").tobytes(),
                    "expected": scored.expected[at].astype("<i4").tobytes(),
                    "p_expected": scored.p_expected[at].astype("<f4").tobytes()})
        if self.tracker is None:
            return
        for stream, record in self.tracker.lines(scored, np.array([w[0] for w in wants])):
            m = self.metrics
            m.line_bits_per_token.observe(record["bits_per_token"])
            if record["score"] >= self.alert_quantile:
                m.surprising_lines.inc()
            if self._subscribed(topic("line", stream)):  # (all_streams: maybe not)
                self._send("line", stream, record)

    def _send(self, kind: str, stream: str, record: dict) -> None:
        name = topic(kind, stream)
        seq = self.seq.get(name, 0)
        self.seq[name] = seq + 1
        try:
            self.socket.send_multipart([name, pack({**record, "seq": seq, "run": self.run})],
                                       zmq.DONTWAIT)
            self.metrics.scores_published.inc()
        except zmq.Again:
            self.metrics.scores_dropped.inc()

    def close(self) -> None:
        self.socket.close(linger=0)

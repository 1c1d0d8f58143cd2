"""The producer library: push tokens to a streamrnn daemon and lose none of them.

    with Producer("tcp://127.0.0.1:5557") as producer:
        producer.send("logs/web-1", tokens)      # blocks while the window of unacked
        producer.send("logs/web-1", more)        #   messages is full (backpressure)
        producer.flush()                         # wait until every message is acked

Each message carries its stream's offset, so the daemon can tell a resend from new data.
Messages stay in the window until acked. When the daemon says busy, or a gap (it missed
an earlier message), or stops answering (restart, network), the producer resends the
stream's unacked messages from the daemon's expected offset, for up to
`retry_seconds` without progress before giving up with `Unreachable`.

Given any rank of a cluster, the producer asks it for the topology before the first
request and keeps a socket to every rank: a stream's messages and requests go to the
rank that owns it (routing.py). A `moved` nack (the cluster restarted with another
layout) makes it learn the topology again and send the stream's unacked messages to
the new owner; a single daemon is a cluster of one, on the one socket.

What the model made of the streams comes back on the score feed: `Scores` (from
subscriber.py) iterates over its records.
"""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

from .keys import secure_client
from .routing import (Links, Topology, cluster_totals, one_process, parse_topology,
                      reachable)
from .subscriber import ScoreReader
from .wire import encode_tokens, pack, token_array

__all__ = ["Producer", "ProducerError", "Refused", "Unreachable", "Scores",
           "score_endpoints"]

DEFAULT_WINDOW = 64  # unacknowledged messages in flight (the daemon's queues allow for it)


class ProducerError(Exception):
    """The daemon refused data or could not be reached."""


class Refused(ProducerError):
    def __init__(self, reason: str, message: str, stream: str | None = None):
        super().__init__(f"daemon refused {'stream ' + repr(stream) + ' ' if stream else ''}"
                         f"data ({reason}): {message}")
        self.reason, self.stream = reason, stream


class Unreachable(ProducerError):
    pass


@dataclass
class _Pending:
    stream: str
    offset: int
    tokens: np.ndarray
    transmission: int = 0        # id of the latest send of this message
    rank: int = 0                # the rank it was sent to, or goes to next
    sent_at: float = 0.0
    resend_at: float | None = None  # set when it waits to go out again

    @property
    def end(self) -> int:
        return self.offset + len(self.tokens)


@dataclass
class _Stats:
    messages_sent: int = 0
    resends: int = 0
    busy: int = 0
    tokens_acked: int = 0
    ack_latencies: list[float] = field(default_factory=list)


class Producer:
    def __init__(self, endpoint: str, *, window: int = DEFAULT_WINDOW,
                 max_tokens_per_message: int = 4096,
                 reply_timeout: float = 2.0, retry_seconds: float = 30.0,
                 context: zmq.Context | None = None, socket_options: dict | None = None,
                 keep_latencies: bool = False, server_key: str | None = None,
                 client_key: str | None = None):
        """`server_key` (the daemon's NAME.key) and `client_key` (this producer's
        NAME.key_secret) turn on CURVE, for a daemon that requires it."""
        self.endpoint = endpoint
        self.curve = bool(server_key or client_key)
        self.window, self.max_tokens = window, max_tokens_per_message
        self.reply_timeout, self.retry_seconds = reply_timeout, retry_seconds
        self.context = context or zmq.Context.instance()
        self.socket_options = socket_options or {}
        self.curve_keys = (server_key, client_key)
        self.links = Links(self._connect, endpoint)  # a socket per rank
        self.cluster: Topology | None = None      # learned before the first request
        self.home = 0                             # the rank of the endpoint given
        self.asked: tuple[int, float] | None = None  # a topology request out: id, sent at
        self.arrived: tuple[dict, int] | None = None  # its reply, and the rank it came from
        self.pending: OrderedDict[int, _Pending] = OrderedDict()  # by transmission id
        self.next_offset: dict[str, int] = {}   # where this producer appends next
        self.answers: dict[int, dict] = {}      # replies to position/status/... requests
        self.latest_ack: dict[str, int] = {}    # per stream, the newest acked transmission
        self.paused_until: dict[int, float] = {}  # by rank: after busy, new data waits
        self.ids = itertools.count(1)
        self.last_progress: dict[int, float] = {}  # by rank: its latest ack
        self.last_busy: dict[int, float] = {}      # by rank: its latest busy reply
        self.error: ProducerError | None = None  # the first one wins; raised once
        # streams whose message the daemon refused, with the transmissions dropped with it:
        # their late replies (gaps past the daemon's end, acks) are ignored
        self.refused: dict[str, set[int]] = {}
        self.stats = _Stats()
        self.keep_latencies = keep_latencies
        # called about every 50 ms while send or flush waits for the daemon (a full
        # window, a busy pause, the last acks): feed's progress line keeps moving
        self.on_wait: Callable[[], None] | None = None

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.links.close()

    def _connect(self, endpoint: str) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.linger = 0
        socket.immediate = 1         # no queueing for a daemon that is not there
        socket.reconnect_ivl = 100
        socket.reconnect_ivl_max = 1000
        for option, value in self.socket_options.items():
            socket.setsockopt(option, value)
        server_key, client_key = self.curve_keys
        if server_key or client_key:
            if not (server_key and client_key):
                socket.close(linger=0)
                given = "--server-key" if server_key else "--client-key"
                raise ProducerError("CURVE needs both --server-key (the daemon's public "
                                    "NAME.key) and --client-key (this producer's "
                                    f"NAME.key_secret); only {given} was given")
            try:
                secure_client(socket, server_key, client_key)
            except ValueError as e:
                socket.close(linger=0)
                raise ProducerError(str(e)) from None
        try:
            socket.connect(endpoint)
        except zmq.ZMQError as e:  # not an endpoint at all: say so, not a traceback
            socket.close(linger=0)
            raise ProducerError(f"cannot connect to {endpoint!r}: "
                                f"{zmq.strerror(e.errno).lower()}; expected tcp://HOST:PORT "
                                "or ipc:///PATH") from None
        return socket

    # ---- sending -------------------------------------------------------------------------
    def send(self, stream: str, tokens: Any, offset: int | None = None) -> None:
        """Append tokens to a stream (at `offset` if given: the position of the first one;
        else after what this producer sent, or at the daemon's end for a new stream).
        Tokens must be integers in 0 .. 2**32 - 1: anything else raises ValueError, and
        nothing of that call is sent."""
        tokens = token_array(tokens if not isinstance(tokens, (bytes, bytearray))
                             else np.frombuffer(tokens, np.uint8))
        self._raise_error()
        self.topology()
        if self.refused.pop(stream, None) is not None:
            # its refusal was raised: start over where the daemon's end of it is
            self.next_offset.pop(stream, None)
        if offset is None:
            offset = self.next_offset.get(stream)
            if offset is None:
                offset = self.position(stream)
        for begin in range(0, max(len(tokens), 1), self.max_tokens):
            piece = tokens[begin:begin + self.max_tokens]
            while len(self.pending) >= self.window or \
                    time.monotonic() < self.paused_until.get(self.cluster.owner(stream), 0):
                self._pump(0.05)
                self._raise_error()  # (no progress for retry_seconds: Unreachable)
                if self.on_wait:
                    self.on_wait()
            self._raise_error()
            self._transmit(_Pending(stream, offset + begin, piece))
        self.next_offset[stream] = offset + len(tokens)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every message sent so far is acknowledged."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending:
            self._raise_error()
            if deadline is not None and time.monotonic() > deadline:
                raise Unreachable(f"{len(self.pending)} messages still unacknowledged by "
                                  f"{self.endpoint} after {timeout} s")
            self._pump(0.05)
            if self.on_wait:
                self.on_wait()
        self._raise_error()

    @property
    def unacked(self) -> int:
        return len(self.pending)

    def answered_busy(self, rank: int | None = None) -> bool:
        """Whether a rank (any, if None) answered busy lately: within two reply timeouts,
        as a busy one is asked again within its retry_after_ms."""
        times = self.last_busy.values() if rank is None else [self.last_busy.get(rank, -1e9)]
        return any(time.monotonic() - t < 2 * self.reply_timeout for t in times)

    # ---- requests with one answer ----------------------------------------------------------
    def position(self, stream: str) -> int:
        """The daemon's next expected offset for a stream (0 for a new one)."""
        return int(self.request({"type": "position", "stream": stream})["next_offset"])

    def status(self) -> dict:
        """The status of the rank asked (of the endpoint given)."""
        return self.request({"type": "status"})

    def cluster_status(self) -> dict:
        """Every rank's status, each with its `rank` and `endpoint` (and `"error": "no
        answer"` for one silent for reply_timeout), and the cluster's totals
        (routing.cluster_totals)."""
        cluster = self.topology()
        ranks = []
        for rank, answer in enumerate(self._ask_every_rank({"type": "status"})):
            if answer is None:
                status = {"error": "no answer"}
            elif answer.get("type") == "nack":
                status = {"error": f"{answer.get('reason')}: {answer.get('message')}"}
            else:
                status = {k: v for k, v in answer.items() if k not in ("type", "id")}
            ranks.append({"rank": rank, "endpoint": self.links.endpoints[rank], **status})
        return {"world_size": cluster.world_size, "generation": cluster.generation,
                "ranks": ranks, "totals": cluster_totals(ranks)}

    def topology(self) -> Topology:
        """The cluster's layout, asked of the endpoint given at the first request; a
        daemon from before clusters is a cluster of one."""
        if self.cluster is None:
            try:
                reply = self.request({"type": "topology"})
            except Refused as e:
                if e.reason != "unknown_type":
                    raise
                self._adopt(one_process(self.endpoint))
            else:
                self._adopt(self._parsed(reply, self.home))
        return self.cluster

    def end(self, stream: str) -> dict:
        """Say the stream has ended (after sending all of it: call flush() first): the
        daemon trains what is left, then forgets the stream; its id may start again
        from offset 0 once `position` reports 0. A daemon that cannot log it yet (a
        full disk) answers busy: asked again after its retry_after_ms, for up to
        retry_seconds, then Unreachable."""
        reply = self._request_past_busy({"type": "end", "stream": stream},
                                        f"ending {stream!r} (its log cannot take it)")
        self.next_offset.pop(stream, None)
        return reply

    def predict(self, stream: str, top_k: int = 10) -> list[tuple[int, float]]:
        """The `top_k` most likely next tokens of the stream, [(token, probability)],
        most likely first (Refused `backlogged` while the stream has over 16,384 tokens
        not trained yet)."""
        reply = self.request({"type": "predict", "stream": stream, "top_k": top_k})
        return [(int(token), float(p)) for token, p in reply["top"]]

    def generate(self, stream: str, num_tokens: int = 200, temperature: float = 1.0,
                 seed: int = 0) -> list[int]:
        """A sampled continuation of the stream (the stream is not changed); with the
        byte vocabulary, bytes(...) of it is text. A long one is waited for, not asked
        twice; a daemon running its most generations at once answers busy: asked again
        after its retry_after_ms, for up to retry_seconds, then Unreachable."""
        reply = self._request_past_busy(
            {"type": "generate", "stream": stream, "num_tokens": num_tokens,
             "temperature": temperature, "seed": seed},
            f"generating for {stream!r} (it runs its most generations at once)")
        return list(reply["tokens"])

    def _request_past_busy(self, message: dict, what: str) -> dict:
        """request(), asked again while the answer is busy, for up to retry_seconds."""
        deadline = time.monotonic() + self.retry_seconds
        while (reply := self.request(message))["type"] == "busy":
            if time.monotonic() > deadline:
                raise Unreachable(f"{self.endpoint} answered busy to {what} for "
                                  f"{self.retry_seconds:g} s")
            time.sleep(reply.get("retry_after_ms", 100) / 1000)
        return reply

    def request(self, message: dict) -> dict:
        """Send a request and wait for its answer, asking again while the daemon is away.
        One about a stream goes to the rank that owns it, any other to the rank asked."""
        started, asked = time.monotonic(), None  # asked: (rank, id) of the request sent
        while True:
            # the topology itself is asked of the endpoint given, before there is one
            cluster = self.cluster if message.get("type") == "topology" else self.topology()
            rank = cluster.rank_for(message, self.home) if cluster else self.home
            if asked is None or asked[0] != rank:
                asked = (rank, next(self.ids))
            # asked again with the same id: the daemon recognises a request that still
            # runs (a long generate) and answers `working` instead of running it twice
            endpoint, request_id = self.links.endpoints[rank], asked[1]
            answer = None
            if not self._send({**message, "id": request_id}, rank):
                time.sleep(0.05)
            else:
                answer = self._answer(request_id)
                if answer is not None and answer.get("type") == "working":
                    started = time.monotonic()  # it runs: that is progress
                    answer = self._answer(request_id) or answer  # still quiet: ask again
            if answer is None:
                if cluster is not None and self.cluster is cluster:
                    # silence is no `moved`: a restart with fewer ranks may have left
                    # this rank's endpoint dead, and with nothing of the window waiting
                    # on it (all acked) _resend_due would never ask
                    self._ask_another(rank)
                    self._await_topology()
            elif answer.get("type") == "working":
                pass  # it runs and went quiet for a reply_timeout: ask again
            elif answer.get("type") != "nack":
                return answer
            elif answer.get("reason") != "moved":
                raise Refused(answer.get("reason", "?"), answer.get("message", ""),
                              message.get("stream"))
            elif self.cluster is cluster:  # else a new topology came meanwhile
                self._relearn(rank)
            waited = time.monotonic() - started
            if waited > self.retry_seconds:
                raise Unreachable(f"no answer from {endpoint} within {waited:.0f} s: "
                                  f"{self._no_answer_hint()}")

    def _answer(self, request_id: int) -> dict | None:
        """The answer to a request, if it comes within reply_timeout."""
        deadline = time.monotonic() + self.reply_timeout
        while time.monotonic() < deadline and request_id not in self.answers:
            self._pump(0.05)
        return self.answers.pop(request_id, None)

    # ---- internals -------------------------------------------------------------------------
    def _send(self, message: dict | bytes, rank: int) -> bool:
        return self.links.send(message if isinstance(message, bytes) else pack(message), rank)

    def _ask_every_rank(self, message: dict) -> list[dict | None]:
        """Send `message` to every rank at once and collect what they answer within
        reply_timeout (a send the socket cannot take yet is tried again meanwhile)."""
        ids: dict[int, int] = {}  # rank -> the id of the request it got
        ranks = range(len(self.links.endpoints))
        deadline = time.monotonic() + self.reply_timeout
        while time.monotonic() < deadline and not all(ids.get(r) in self.answers
                                                      for r in ranks):
            for rank in ranks:
                if rank not in ids:
                    request_id = next(self.ids)
                    if self._send({**message, "id": request_id}, rank):
                        ids[rank] = request_id
            self._pump(0.05)
        return [self.answers.pop(ids[r], None) if r in ids else None for r in ranks]

    def _transmit(self, entry: _Pending) -> None:
        entry.rank = self.cluster.owner(entry.stream)
        if not any(e.rank == entry.rank for e in self.pending.values()):
            self.last_progress[entry.rank] = time.monotonic()  # its no-progress clock starts
        entry.transmission = next(self.ids)
        entry.sent_at = time.monotonic()
        if self._send(encode_tokens(entry.stream, entry.offset, entry.tokens,
                                    entry.transmission), entry.rank):
            entry.resend_at = None
            self.stats.messages_sent += 1
        else:
            entry.resend_at = entry.sent_at + 0.1
        self.pending[entry.transmission] = entry

    def _pump(self, timeout: float) -> None:
        """Read every rank's replies for up to `timeout` seconds, then resend whatever is
        due."""
        for raw, rank in self.links.receive(timeout):
            self._on_reply(raw, rank)
        if self.arrived is not None:
            self._topology_arrived()
        self._resend_due()

    def _on_reply(self, raw: bytes, rank: int) -> None:
        try:
            reply = msgpack.unpackb(raw, raw=False)
        except Exception:
            return  # not from a streamrnn daemon; nothing to act on
        if not isinstance(reply, dict):
            return
        kind, reply_id = reply.get("type"), reply.get("id")
        entry = self.pending.get(reply_id)
        if entry is None and isinstance(reply_id, int) and any(
                reply_id in dropped for dropped in self.refused.values()):
            return  # a message dropped with its stream's refusal: nothing to act on
        if kind == "ack" and isinstance(reply.get("next_offset"), int):
            if isinstance(reply_id, int):
                self.latest_ack[reply["stream"]] = max(reply_id,
                                                       self.latest_ack.get(reply["stream"], 0))
            self._acked(reply["stream"], reply["next_offset"])
        elif kind == "busy" and entry is not None:
            # the rank's queue is shared by all its streams: hold every new message to it
            # back for a while, not just this stream's, or the others keep it overloaded
            self.stats.busy += 1
            self.last_busy[rank] = time.monotonic()
            delay = reply.get("retry_after_ms", 100) / 1000
            self.paused_until[rank] = max(self.paused_until.get(rank, 0),
                                          time.monotonic() + delay)
            self._rewind(entry.stream, None, delay)
        elif kind == "nack" and entry is not None:
            self._on_nack(reply, entry, rank)
        elif kind == "topology" and self.asked is not None and reply_id == self.asked[0]:
            self.arrived = (reply, rank)
        elif reply_id is not None and entry is None:
            self.answers[reply_id] = reply
        if len(self.answers) > 1000:  # answers nobody waits for any more
            self.answers.clear()

    def _on_nack(self, reply: dict, entry: _Pending, rank: int) -> None:
        reason, reply_id = reply.get("reason"), reply.get("id")
        if reason == "gap" and isinstance(reply.get("next_offset"), int):
            # the daemon handles one producer's messages in order: a gap reported for
            # a message sent before the latest acked one is old news, only a resend
            fresh = reply_id > self.latest_ack.get(entry.stream, 0)
            self._rewind(entry.stream, reply["next_offset"] if fresh else None, 0.0)
        elif reason == "moved":
            # another rank owns the stream now: neither an ack nor a refusal. Its messages
            # wait for the new topology (or reply_timeout, should none come)
            self._ask_topology(rank)
            self._rewind(entry.stream, None, self.reply_timeout)
        else:
            self._refuse(entry.stream, Refused(reason or "?", reply.get("message", ""),
                                               entry.stream))

    # ---- the cluster's topology ------------------------------------------------------------
    def _parsed(self, reply: dict, rank: int) -> Topology:
        reached = self.links.endpoints[rank]
        try:
            return parse_topology(reply, reached)
        except ValueError as e:
            raise ProducerError(f"the topology that {reached} sent is not usable: "
                                f"{e}") from None

    def _ask_topology(self, rank: int) -> None:
        """Ask `rank` for the topology, unless a request for it is out (for up to
        reply_timeout); the reply is taken in _pump."""
        now = time.monotonic()
        if self.asked is not None and now - self.asked[1] < self.reply_timeout:
            return
        request_id = next(self.ids)
        self.asked = (request_id, now) if self._send(
            {"type": "topology", "id": request_id}, rank) else None

    def _relearn(self, rank: int) -> None:
        """Ask `rank` for the topology and wait for it, up to reply_timeout."""
        self._ask_topology(rank)
        self._await_topology()

    def _await_topology(self) -> None:
        """Wait for the topology asked for, if any, up to reply_timeout."""
        deadline = time.monotonic() + self.reply_timeout
        while self.asked is not None and time.monotonic() < deadline:
            self._pump(0.05)

    def _topology_arrived(self) -> None:
        reply, rank = self.arrived
        self.arrived = self.asked = None
        try:
            cluster = self._parsed(reply, rank)
        except ProducerError as e:
            self._fail(e)
            return
        if cluster == self.cluster:
            return
        self._adopt(cluster)
        now = time.monotonic()
        for entry in self.pending.values():  # due at their owners now
            entry.rank, entry.resend_at = cluster.owner(entry.stream), now

    def _adopt(self, cluster: Topology) -> None:
        """Route by `cluster` from now on. A rank's socket stays while its endpoint and
        the generation do; a new generation gets all new sockets, so no reply from the
        cluster before it comes in."""
        self.links.rebuild(cluster.endpoints, keep=self.cluster is None or
                           self.cluster.generation == cluster.generation)
        self.cluster = cluster
        self.home = cluster.endpoints.index(self.endpoint) \
            if self.endpoint in cluster.endpoints else min(self.home, cluster.world_size - 1)

    # ---- keeping the window moving --------------------------------------------------------
    def _fail(self, error: ProducerError) -> None:
        if self.error is None:  # the first real error wins: later ones are its echoes
            self.error = error

    def _refuse(self, stream: str, error: Refused) -> None:
        """The daemon refused one of the stream's messages: the ones after it are past the
        daemon's end of the stream and can only come back as gaps, so drop them all."""
        dropped = self.refused.setdefault(stream, set())
        for tid in [t for t, e in self.pending.items() if e.stream == stream]:
            del self.pending[tid]
            dropped.add(tid)
        self.next_offset.pop(stream, None)
        self._fail(error)

    def _acked(self, stream: str, next_offset: int) -> None:
        now = time.monotonic()
        for tid in [t for t, e in self.pending.items()
                    if e.stream == stream and e.end <= next_offset]:
            entry = self.pending.pop(tid)
            self.stats.tokens_acked += len(entry.tokens)
            if self.keep_latencies:
                self.stats.ack_latencies.append(now - entry.sent_at)
            self.last_progress[entry.rank] = now

    def _rewind(self, stream: str, expected: int | None, delay: float) -> None:
        """Send the stream's unacked messages again, in order, after `delay` seconds.
        `expected` is the daemon's current end of the stream, when known."""
        entries = sorted((e for e in self.pending.values() if e.stream == stream),
                         key=lambda e: e.offset)
        if entries and expected is not None and entries[0].offset > expected:
            self._fail(ProducerError(
                f"the daemon expects stream {stream!r} at offset {expected}, but this "
                f"producer's oldest unacknowledged data starts at {entries[0].offset}: "
                "acknowledged data was lost on the daemon's side"))
            return
        due = time.monotonic() + delay
        for entry in entries:  # a later gap nack must not cut a busy wait short
            entry.resend_at = due if entry.resend_at is None else max(entry.resend_at, due)

    def _resend_due(self) -> None:
        now = time.monotonic()
        oldest: dict[int, _Pending] = {}  # by rank, its oldest unacked message
        for entry in self.pending.values():
            oldest.setdefault(entry.rank, entry)
        for rank, entry in oldest.items():
            if now - self.last_progress.setdefault(rank, now) > self.retry_seconds:
                # still answering busy (a busy wait is resent within retry_after_ms), or
                # silent: stopped, frozen, gone
                why = ("it kept answering busy (overloaded)" if self.answered_busy(rank)
                       else self._no_answer_hint())
                waiting = sum(e.rank == rank for e in self.pending.values())
                self._fail(Unreachable(
                    f"no progress from {self.links.endpoints[rank]} for "
                    f"{self.retry_seconds:g} s with {waiting} messages unacknowledged: {why}"))
                # raised to the caller once; a caller that goes on keeps its window,
                # which is still resent: the next silence as long raises again
                self.last_progress[rank] = now
            if entry.resend_at is None and now - entry.sent_at > self.reply_timeout:
                self._silent(rank, now)
        due = [e for e in self.pending.values() if e.resend_at is not None and e.resend_at <= now]
        for entry in due:
            del self.pending[entry.transmission]
            self.stats.resends += 1
            self._transmit(entry)

    def _silent(self, rank: int, now: float) -> None:
        """No answer from a rank: it restarted or the network dropped. Go back to the
        oldest unacked message of each of its streams (duplicates are acked, not
        retrained), and ask another rank whether the cluster changed: a restart with
        fewer ranks leaves this one's endpoint silent for good."""
        for entry in self.pending.values():
            if entry.rank == rank:
                entry.resend_at = now
        self._ask_another(rank)

    def _ask_another(self, rank: int) -> None:
        """Ask a rank other than the silent `rank` for the topology (the rank given,
        unless it is the silent one): a restart with fewer ranks leaves this one's
        endpoint silent for good, and only another can say so."""
        if self.cluster.world_size > 1:
            self._ask_topology(self.home if rank != self.home else
                               (rank + 1) % self.cluster.world_size)

    def _no_answer_hint(self) -> str:
        """Silence has two usual causes: no daemon, or one that requires CURVE and lets
        this producer's handshake fail without a reply it could show."""
        if self.curve:
            return ("is `streamrnn serve` running there? Or it does not accept these CURVE "
                    "keys: --server-key must be the daemon's public key, and this "
                    "producer's public key must be in its ingest.curve_allowed_keys folder")
        return ("is `streamrnn serve` running there? Or it requires CURVE keys "
                "(--server-key, --client-key)")

    def _raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def score_endpoints(endpoint: str, timeout: float = 5.0, server_key: str | None = None,
                    client_key: str | None = None) -> list[str]:
    """Every rank's score feed, asked of the daemon (any rank) at its ingest endpoint.
    Raises ProducerError if it does not answer within `timeout` seconds, ValueError if
    it has no score feed (scores.endpoint is empty)."""
    with Producer(endpoint, retry_seconds=timeout, reply_timeout=timeout,
                  server_key=server_key, client_key=client_key) as producer:
        reply = producer.request({"type": "topology"})
    listed = [reachable(e, endpoint) for e in reply.get("score_endpoints") or [] if e]
    if not listed:
        raise ValueError(f"the daemon at {endpoint} publishes no scores (its "
                         "scores.endpoint is empty, or it predates the score feed)")
    return listed


class Scores(ScoreReader):
    """The score feed's records (subscriber.py): Scores(endpoints, ...) reads the feeds
    given; Scores.of(ingest endpoint, ...) asks the daemon where they are first."""

    @classmethod
    def of(cls, endpoint: str, streams: list[str] | None = None,
           kinds: tuple[str, ...] = ("line",), *, server_key: str | None = None,
           client_key: str | None = None, timeout: float = 5.0,
           idle_timeout: float | None = None) -> "Scores":
        """Scores of the daemon whose ingest endpoint (any rank's) is `endpoint`."""
        return cls(score_endpoints(endpoint, timeout, server_key, client_key), streams,
                   kinds, server_key=server_key, client_key=client_key,
                   idle_timeout=idle_timeout)

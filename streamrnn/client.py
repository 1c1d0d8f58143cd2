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
"""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from .keys import secure_client
from .wire import encode_tokens, pack, token_array

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
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.immediate = 1         # no queueing for a daemon that is not there
        self.socket.reconnect_ivl = 100
        self.socket.reconnect_ivl_max = 1000
        for option, value in (socket_options or {}).items():
            self.socket.setsockopt(option, value)
        if server_key or client_key:
            if not (server_key and client_key):
                self.socket.close(linger=0)
                given = "--server-key" if server_key else "--client-key"
                raise ProducerError("CURVE needs both --server-key (the daemon's public "
                                    "NAME.key) and --client-key (this producer's "
                                    f"NAME.key_secret); only {given} was given")
            try:
                secure_client(self.socket, server_key, client_key)
            except ValueError as e:
                self.socket.close(linger=0)
                raise ProducerError(str(e)) from None
        try:
            self.socket.connect(endpoint)
        except zmq.ZMQError as e:  # not an endpoint at all: say so, not a traceback
            self.socket.close(linger=0)
            raise ProducerError(f"cannot connect to {endpoint!r}: "
                                f"{zmq.strerror(e.errno).lower()}; expected tcp://HOST:PORT "
                                "or ipc:///PATH") from None
        self.pending: OrderedDict[int, _Pending] = OrderedDict()  # by transmission id
        self.next_offset: dict[str, int] = {}   # where this producer appends next
        self.answers: dict[int, dict] = {}      # replies to position/status/... requests
        self.latest_ack: dict[str, int] = {}    # per stream, the newest acked transmission
        self.paused_until = 0.0                 # after a busy reply, new data waits
        self.ids = itertools.count(1)
        self.last_progress = time.monotonic()
        self.error: ProducerError | None = None  # the first one wins; raised once
        # streams whose message the daemon refused, with the transmissions dropped with it:
        # their late replies (gaps past the daemon's end, acks) are ignored
        self.refused: dict[str, set[int]] = {}
        self.stats = _Stats()
        self.keep_latencies = keep_latencies

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.socket.close(linger=0)

    # ---- sending -------------------------------------------------------------------------
    def send(self, stream: str, tokens: Any, offset: int | None = None) -> None:
        """Append tokens to a stream (at `offset` if given: the position of the first one;
        else after what this producer sent, or at the daemon's end for a new stream).
        Tokens must be integers in 0 .. 2**32 - 1: anything else raises ValueError, and
        nothing of that call is sent."""
        tokens = token_array(tokens if not isinstance(tokens, (bytes, bytearray))
                             else np.frombuffer(tokens, np.uint8))
        self._raise_error()
        if self.refused.pop(stream, None) is not None:
            # its refusal was raised: start over where the daemon's end of it is
            self.next_offset.pop(stream, None)
        if offset is None:
            offset = self.next_offset.get(stream)
            if offset is None:
                offset = self.position(stream)
        for begin in range(0, max(len(tokens), 1), self.max_tokens):
            piece = tokens[begin:begin + self.max_tokens]
            while len(self.pending) >= self.window or time.monotonic() < self.paused_until:
                self._pump(0.05)
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
        self._raise_error()

    @property
    def unacked(self) -> int:
        return len(self.pending)

    # ---- requests with one answer ----------------------------------------------------------
    def position(self, stream: str) -> int:
        """The daemon's next expected offset for a stream (0 for a new one)."""
        return int(self.request({"type": "position", "stream": stream})["next_offset"])

    def status(self) -> dict:
        return self.request({"type": "status"})

    def end(self, stream: str) -> dict:
        """Say the stream has ended (after sending all of it: call flush() first): the
        daemon trains what is left, then forgets the stream; its id may start again
        from offset 0 once `position` reports 0."""
        reply = self.request({"type": "end", "stream": stream})
        self.next_offset.pop(stream, None)
        return reply

    def request(self, message: dict) -> dict:
        """Send a request and wait for its answer, asking again while the daemon is away."""
        started = time.monotonic()
        while True:
            request_id = next(self.ids)
            if self._send({**message, "id": request_id}):
                deadline = time.monotonic() + self.reply_timeout
                while time.monotonic() < deadline:
                    self._pump(0.05)
                    if request_id in self.answers:
                        answer = self.answers.pop(request_id)
                        if answer.get("type") == "nack":
                            raise Refused(answer.get("reason", "?"), answer.get("message", ""),
                                          message.get("stream"))
                        return answer
            else:
                time.sleep(0.05)
            waited = time.monotonic() - started
            if waited > self.retry_seconds:
                raise Unreachable(f"no answer from {self.endpoint} within {waited:.0f} s: "
                                  f"{self._no_answer_hint()}")

    # ---- internals -------------------------------------------------------------------------
    def _send(self, message: dict | bytes) -> bool:
        try:
            self.socket.send(message if isinstance(message, bytes) else pack(message),
                             zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected (immediate) or the pipe is full: try later
            return False

    def _transmit(self, entry: _Pending) -> None:
        if not self.pending:
            self.last_progress = time.monotonic()  # the no-progress clock starts now
        entry.transmission = next(self.ids)
        entry.sent_at = time.monotonic()
        if self._send(encode_tokens(entry.stream, entry.offset, entry.tokens,
                                    entry.transmission)):
            entry.resend_at = None
            self.stats.messages_sent += 1
        else:
            entry.resend_at = entry.sent_at + 0.1
        self.pending[entry.transmission] = entry

    def _pump(self, timeout: float) -> None:
        """Read replies for up to `timeout` seconds, then resend whatever is due."""
        if self.socket.poll(int(timeout * 1000), zmq.POLLIN):
            while True:
                try:
                    raw = self.socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_reply(raw)
        self._resend_due()

    def _on_reply(self, raw: bytes) -> None:
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
            # the daemon's queue is shared by all streams: hold every new message back for
            # a while, not just this stream's, or the other streams keep it overloaded
            self.stats.busy += 1
            delay = reply.get("retry_after_ms", 100) / 1000
            self.paused_until = max(self.paused_until, time.monotonic() + delay)
            self._rewind(entry.stream, None, delay)
        elif kind == "nack" and entry is not None:
            if reply.get("reason") == "gap" and isinstance(reply.get("next_offset"), int):
                # the daemon handles one producer's messages in order: a gap reported for
                # a message sent before the latest acked one is old news, only a resend
                fresh = reply_id > self.latest_ack.get(entry.stream, 0)
                self._rewind(entry.stream, reply["next_offset"] if fresh else None, 0.0)
            else:
                self._refuse(entry.stream, Refused(reply.get("reason", "?"),
                                                   reply.get("message", ""), entry.stream))
        elif reply_id is not None and entry is None:
            self.answers[reply_id] = reply
        if len(self.answers) > 1000:  # answers nobody waits for any more
            self.answers.clear()

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
            self.last_progress = now

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
        if self.pending and now - self.last_progress > self.retry_seconds:
            why = ("it kept answering busy (overloaded)" if self.stats.busy else
                   self._no_answer_hint())
            self._fail(Unreachable(
                f"no progress from {self.endpoint} for {self.retry_seconds:g} s with "
                f"{len(self.pending)} messages unacknowledged: {why}"))
            return
        oldest = next(iter(self.pending.values()), None)
        if oldest is not None and oldest.resend_at is None and \
                now - oldest.sent_at > self.reply_timeout:
            # no answer: the daemon restarted or the network dropped; go back to the
            # oldest unacked message of every stream (duplicates are acked, not retrained)
            for entry in self.pending.values():
                entry.resend_at = now
        due = [e for e in self.pending.values() if e.resend_at is not None and e.resend_at <= now]
        for entry in due:
            del self.pending[entry.transmission]
            self.stats.resends += 1
            self._transmit(entry)

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

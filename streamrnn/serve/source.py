"""The daemon's network edge: a ZeroMQ ROUTER that producers' DEALER (or REQ) sockets reach.

It receives without blocking, splits the routing envelope from the payload, and sends
replies back along the same envelope. Decoding and checking are wire.py's; deciding
what to answer is the daemon's. No torch here.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import auth
from ..config import IngestConfig, StartupError
from ..wire import pack


@dataclass(frozen=True)
class Incoming:
    envelope: list[bytes]  # routing id (and the empty delimiter a REQ socket adds)
    payload: bytes | None  # None: the frames did not have the shape of a request


# Messages ZeroMQ queues per connection, each way. The Producer client keeps at most
# 64 requests in flight (client.DEFAULT_WINDOW), so 256 leaves it (or a client with a few
# times that window) room, while bounding what one connection can make the daemon hold
# in memory to 256 messages of up to twice ingest.max_message_bytes. Beyond it ZeroMQ
# stops reading that connection (TCP backpressure); a reply to a peer that does not read
# them is dropped, and the peer asks again.
QUEUED_MESSAGES_PER_CONNECTION = 256


class Source:
    def __init__(self, config: IngestConfig, context: zmq.Context):
        self.socket = context.socket(zmq.ROUTER)
        self.socket.linger = 0
        # the transport drops peers sending more than this; up to twice the message limit
        # they still get a readable "too_large" refusal from the daemon
        self.socket.maxmsgsize = 2 * config.max_message_bytes + 4096
        self.socket.rcvhwm = QUEUED_MESSAGES_PER_CONNECTION
        self.socket.sndhwm = QUEUED_MESSAGES_PER_CONNECTION
        # reap half-open connections of producers that vanished
        self.socket.heartbeat_ivl = 10_000
        self.socket.heartbeat_timeout = 30_000
        self.curve = bool(config.curve_secret_key)  # producers must authenticate
        self.monitor = None
        try:
            if self.curve:  # (the daemon started the context's authenticator: auth.start)
                auth.curve_server(self.socket, config.curve_secret_key)
            # handshakes that fail (a key not allowed, a client without CURVE) are counted
            self.monitor = self.socket.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL |
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            bind(self.socket, config.endpoint, "ingest.endpoint")
        except BaseException:
            self.close()  # no half-made socket left behind
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def receive(self, max_messages: int) -> list[Incoming]:
        """Up to max_messages waiting requests, without blocking."""
        out: list[Incoming] = []
        while len(out) < max_messages:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) == 2:                      # DEALER: [id, payload]
                out.append(Incoming(frames[:1], frames[1]))
            elif len(frames) == 3 and frames[1] == b"":  # REQ: [id, "", payload]
                out.append(Incoming(frames[:2], frames[2]))
            else:
                out.append(Incoming(frames[:1], None))
        return out

    def reply(self, envelope: list[bytes], message: dict) -> None:
        try:
            payload = pack(message)
        except (TypeError, ValueError) as e:  # a bug's value, never a producer's: say so
            payload = pack({"type": "nack", "reason": "malformed",
                            "message": f"the reply could not be encoded: {e}"[:200]})
        try:
            self.socket.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except zmq.Again:
            pass  # the producer is not reading its replies: it will time out and ask again

    def failed_handshakes(self) -> dict[str, int]:
        """Handshakes refused since the last call, by kind (auth, protocol, other)."""
        counts: dict[str, int] = {}
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return counts
            kind = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
                    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol"}.get(event, "other")
            counts[kind] = counts.get(kind, 0) + 1

    def close(self) -> None:
        if not self.socket.closed:
            if self.monitor is not None:
                self.socket.disable_monitor()
                self.monitor.close(linger=0)
            self.socket.close(linger=0)


def bind(socket: zmq.Socket, endpoint: str, key: str) -> None:
    """Bind, or a StartupError in one line that says what to change."""
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as e:
        reason = zmq.strerror(e.errno)  # without the "(addr=...)" pyzmq appends
        hint = {errno.EADDRINUSE: "another process listens there",
                errno.ENODEV: "no interface or local address of that name on this host",
                errno.EADDRNOTAVAIL: "that address is not one of this host's",
                errno.EACCES: "not allowed for this user"}.get(e.errno)
        if e.errno == errno.ENOENT and endpoint.startswith("ipc://"):
            hint = f"the folder {os.path.dirname(endpoint[len('ipc://'):]) or '.'} " \
                   "does not exist"
        raise StartupError(f"cannot bind {key} {endpoint}: {reason[:1].lower()}"
                           f"{reason[1:]}" + (f" ({hint})" if hint else "")) from None

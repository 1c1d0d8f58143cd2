"""systemd's notify protocol: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

A datagram to the socket in $NOTIFY_SOCKET (an abstract one when it starts with '@'),
as sd_notify(3) specifies; nothing at all when that variable is unset. The watchdog is
on when $WATCHDOG_USEC is set (and $WATCHDOG_PID, if set, is this process): then the
main loop must ping at least every WATCHDOG_USEC, and pings at half that.
"""
from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ=os.environ):
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        pid = environ.get("WATCHDOG_PID")
        usec = environ.get("WATCHDOG_USEC")
        enabled = usec and usec.isdigit() and (pid is None or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if enabled else None
        self.next_ping = 0.0

    def send(self, *assignments: str) -> None:
        if self.address is None:
            return
        # non-blocking: a receiver that stopped reading fills its queue, and a blocking
        # send would then hold the loop for good; a message it cannot take is dropped
        kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.sendto("\n".join(assignments).encode(), self.address)
            except OSError:
                pass  # systemd went away or is not reading: nothing to fail

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, line: str) -> None:
        self.send(f"STATUS={line}")

    def extend_start(self, seconds: float, status: str) -> None:
        """Still starting (a long log replay): push TimeoutStartSec back by `seconds`."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}", f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: final checkpoint")

    def ping(self) -> None:
        """Call from the main loop: pings when due, so a loop that hangs stops them."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now >= self.next_ping:
            self.send("WATCHDOG=1")
            self.next_ping = now + self.watchdog_interval

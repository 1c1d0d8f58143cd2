"""The daemon's side of systemd's notify protocol, with this test playing systemd: a real
unix datagram socket in NOTIFY_SOCKET, real signals."""
from __future__ import annotations

import signal
import socket
import time
import urllib.request

import pytest

from harness import DaemonProcess


def listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.1)
    return s


def collect(s: socket.socket, seconds: float) -> list[tuple[float, str]]:
    """(arrival time, assignment) for every line received within `seconds`."""
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = s.recv(4096).decode()
        except socket.timeout:
            continue
        out += [(time.monotonic(), line) for line in data.splitlines()]
    return out


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_watchdog_status_stopping(tmp_path, abstract):
    name = f"streamrnn-test-{time.monotonic_ns()}"
    s = listen("\0" + name if abstract else str(tmp_path / "notify"))
    address = "@" + name if abstract else str(tmp_path / "notify")
    d = DaemonProcess(tmp_path, [])
    d.start(wait=False, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
    try:
        first = collect(s, 0.1)
        deadline = time.monotonic() + 60
        while not any(line == "READY=1" for _, line in first) and time.monotonic() < deadline:
            first += collect(s, 0.5)
        lines = [line for _, line in first]
        assert "READY=1" in lines, d.log()
        d.wait_ready()  # READY=1 came once it could answer
        later = collect(s, 2.0)
        pings = [t for t, line in later if line == "WATCHDOG=1"]
        assert len(pings) >= 5, later  # every 0.2 s: half of WATCHDOG_USEC
        assert max(b - a for a, b in zip(pings, pings[1:])) < 0.4
        assert any(line.startswith("STATUS=") for _, line in first + later)
        d.proc.send_signal(signal.SIGTERM)
        end = collect(s, 3.0)
        assert "STOPPING=1" in [line for _, line in end]
        assert d.proc.wait(timeout=30) == 0
    finally:
        d.stop()
        s.close()


def test_a_hung_loop_stops_the_pings(tmp_path):
    s = listen(str(tmp_path / "notify"))
    d = DaemonProcess(tmp_path, [])
    d.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000",
                 "STREAMRNN_HANG_AT": "turn:100"})
    try:
        pinged, silent = False, False
        deadline = time.monotonic() + 60
        while not silent and time.monotonic() < deadline:  # the 100th turn comes in seconds
            window = [line for _, line in collect(s, 1.5) if line == "WATCHDOG=1"]
            silent = pinged and not window  # 1.5 s without a ping: 7 missed
            pinged = pinged or bool(window)
        assert pinged and silent
        # the process is alive and its other threads serve: only the loop is stuck,
        # and only the loop pings
        assert d.proc.poll() is None
        with urllib.request.urlopen(d.metrics_url, timeout=10) as r:
            assert b"streamrnn_updates_total" in r.read()
    finally:
        d.stop(signal.SIGKILL)
        s.close()

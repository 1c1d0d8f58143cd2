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


def test_a_long_generate_runs_once_while_the_loop_trains_answers_and_pings(tmp_path):
    """generate(4096), the most one request may ask, from a producer whose reply timeout
    is far shorter: the daemon runs it once (asked again, it answers `working`), and
    meanwhile trains, answers status and pings the watchdog; no turn of its loop is
    long (each is measured)."""
    import threading

    from streamrnn.client import Producer

    s = listen(str(tmp_path / "notify"))
    d = DaemonProcess(tmp_path, ["model.hidden_size=128", "model.num_layers=2"])
    d.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"})
    stop, statuses, pings = threading.Event(), [], []

    def feed():  # keeps the model training while it generates (about as fast as it can)
        with Producer(d.endpoint) as p:
            for offset in range(0, 10**6, 200):
                if stop.wait(0.25):
                    break
                p.send("train", bytes(range(256))[:200], offset=offset)

    def ask_status():
        with Producer(d.endpoint, reply_timeout=1, retry_seconds=10) as p:
            while not stop.is_set():
                statuses.append((time.monotonic(), p.status()["tokens_trained"]))
                time.sleep(0.2)

    def listen_pings():
        while not stop.is_set():
            pings.extend(t for t, line in collect(s, 0.2) if line == "WATCHDOG=1")

    threads = [threading.Thread(target=f) for f in (feed, ask_status, listen_pings)]
    try:
        for thread in threads:
            thread.start()
        with Producer(d.endpoint) as p:
            p.send("s", b"the quick brown fox jumps over the lazy dog " * 4)
            p.flush()
        time.sleep(1.0)  # training under way
        with Producer(d.endpoint, reply_timeout=0.3, retry_seconds=30) as p:
            started = time.monotonic()
            reply = p.request({"type": "generate", "stream": "s", "num_tokens": 4096})
            ended = time.monotonic()
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert reply["type"] == "generated" and len(reply["tokens"]) == 4096
        took = ended - started
        assert took > 1.5, f"{took:.2f} s: too short to show the loop going on"
        with urllib.request.urlopen(d.metrics_url, timeout=10) as response:
            metrics = response.read().decode()

        def value(name: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith(name))
        assert value('streamrnn_messages_total{type="generate"}') >= 2  # asked again
        assert value("streamrnn_generated_tokens_total") == 4096  # run once
        turns = value("streamrnn_turn_duration_seconds_count")
        assert value('streamrnn_turn_duration_seconds_bucket{le="1.0"}') == turns, \
            "a turn of the loop took over a second"
        during = [(t, n) for t, n in statuses if started <= t <= ended]
        assert len(during) >= took / 0.5, statuses  # answered all along
        assert during[-1][1] > during[0][1], "nothing trained while it generated"
        beats = [started] + [t for t in pings if started <= t <= ended] + [ended]
        assert max(b - a for a, b in zip(beats, beats[1:])) < 1.5, beats
    finally:
        stop.set()
        d.stop()
        s.close()


def test_a_receiver_that_stops_reading_never_blocks_the_daemon(tmp_path):
    """Its queue fills; each later message is dropped at once, not waited on (a blocking
    send would hold the loop for good)."""
    from streamrnn.serve.systemd import Notifier

    s = listen(str(tmp_path / "notify"))  # never read
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    import threading

    def flood():
        for _ in range(5000):  # far more than a datagram queue holds
            notifier.status("x" * 200)
    sender = threading.Thread(target=flood, daemon=True)  # a blocked one is left behind
    try:
        sender.start()
        sender.join(timeout=20)
        assert not sender.is_alive(), "a send blocked on the full queue"
    finally:
        s.close()

"""The daemon's loop in this process, on a clock the test moves (see the make_daemon
fixture in conftest.py): real sockets and files, exact timing without sleeping."""
from __future__ import annotations

import time

from harness import TINY, RawClient, free_port
from streamrnn import load_config
from streamrnn.serve import faults
from streamrnn.serve.daemon import Daemon


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def daemon_maker(tmp_path, monkeypatch):
    """Yields make(*overrides, env=None) -> (daemon, clock, client); stops them after."""
    monkeypatch.setattr(faults, "_hits", {})  # fault cues count per test
    made = []

    def make(*overrides, env=None):
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        config = load_config(overrides=[
            *TINY, f"ingest.endpoint=tcp://127.0.0.1:{free_port()}", "metrics.port=0",
            f"checkpoint.dir={tmp_path / 'state'}", "train.flush_after_seconds=30",
            *overrides])
        clock = Clock()
        daemon = Daemon(config, clock=clock)
        daemon.start()
        client = RawClient(daemon.source.endpoint)
        made.append((daemon, client))
        return daemon, clock, client
    yield make
    for daemon, client in made:
        client.__exit__()
        daemon.shutdown()


def ask(daemon, client, message, turns=3):
    client.send(message)
    for _ in range(turns):
        daemon.turn()
    return client.receive(timeout=5)


def ask_until_answered(daemon, client, message, seconds=20):
    """A request answered later (a checkpoint): turn the loop until the reply comes."""
    client.send(message)
    deadline = time.monotonic() + seconds
    while not client.socket.poll(20):
        daemon.turn()
        assert time.monotonic() < deadline, "no reply"
    return client.receive()


def arrive(d, count: int) -> None:
    """Until `count` messages wait in the daemon's inbox: the next intake handles them
    together, before any update."""
    while len(d.inbox) < count:
        assert d.source.socket.poll(5000), "no message"
        d.inbox.extend(d.source.receive(count - len(d.inbox)))

"""Real daemons for tests: `streamrnn serve` in a subprocess on free loopback ports."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import zmq

# a model small enough that a 2-core CI machine trains it instantly: one plain layer,
# which the tests' pace and timeouts were set with (a crash test also runs the default
# shape, several layers with skip connections)
TINY = ["model.hidden_size=16", "model.embed_dim=8", "model.num_layers=1",
        "model.skip=false", "train.k1=4", "train.k2=8",
        "train.device=cpu", "log.format=json", "log.summary_seconds=0"]


STARTED: list[subprocess.Popen] = []  # every daemon a test started; conftest reaps them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    def __init__(self, workdir: Path, overrides: list[str], port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.overrides = [*TINY, f"ingest.endpoint={self.endpoint}",
                          f"metrics.port={self.metrics_port}", *overrides]
        self.log_path = workdir / f"daemon-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, env: dict | None = None,
              args: tuple[str, ...] = ()) -> "DaemonProcess":
        command = [sys.executable, "-m", "streamrnn", "serve", *args]
        for item in self.overrides:
            command += ["--set", item]
        with open(self.log_path, "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, env={**os.environ,
                                                                "PYTHONUNBUFFERED": "1",
                                                                **(env or {})})
        STARTED.append(self.proc)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with RawClient(self.endpoint) as client:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"daemon exited:\n{self.log()}"
                try:
                    client.ask({"type": "status"}, timeout=0.5)
                    return
                except TimeoutError:
                    pass
        raise TimeoutError(f"daemon not ready:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def events(self) -> list[dict]:
        import json
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class RawClient:
    """A bare DEALER socket: send exactly these bytes, read one reply."""

    def __init__(self, endpoint: str):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.connect(endpoint)

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.socket.close(linger=0)
        self.context.term()

    def send(self, message) -> None:
        payload = message if isinstance(message, bytes) else msgpack.packb(message)
        self.socket.send(payload)

    def receive(self, timeout: float = 10) -> dict:
        if not self.socket.poll(int(timeout * 1000)):
            raise TimeoutError("no reply")
        return msgpack.unpackb(self.socket.recv(), raw=False)

    def ask(self, message, timeout: float = 10) -> dict:
        self.send(message)
        return self.receive(timeout)

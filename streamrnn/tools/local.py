"""A `streamrnn serve` of our own on loopback, for the demo and the benchmarks."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ..config import Config, format_config


def free_port(count: int = 1) -> int:
    """A port p with p .. p + count - 1 free now (the ranks of a cluster bind base + rank)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if all(_free(port) for port in range(base + 1, base + count)):
            return base
    raise RuntimeError(f"no {count} free ports in a row on 127.0.0.1")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class LocalDaemon:
    """Starts `streamrnn serve` in `state` (its checkpoint folder and log file) on a free
    port; `config` (if given) is written there as its config file, `settings` are --set."""

    def __init__(self, state: str, settings: list[str] = (), config: Config | None = None,
                 nproc: int = 1):
        """`nproc` > 1: that many ranks (serve --nproc), on `endpoint`'s port and the
        ones after it."""
        self.endpoint = f"tcp://127.0.0.1:{free_port(nproc)}"
        self.log_path = Path(state) / "daemon.log"
        args = [sys.executable, "-m", "streamrnn", "serve"]
        if nproc > 1:
            args += ["--nproc", str(nproc), "--max-restarts", "0"]
        if config is not None:
            config_path = Path(state) / "config.toml"
            config_path.write_text(format_config(config))
            args += ["--config", str(config_path)]
        # the score feed on any free port (one bench daemon beside another, or beside a
        # service on the default port); Scores.of(endpoint) finds it
        for item in [f"ingest.endpoint={self.endpoint}", "scores.endpoint=tcp://127.0.0.1:*",
                     "log.format=json", *settings]:
            args += ["--set", item]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, cwd=state, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 300) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@contextlib.contextmanager
def running(prefix: str, settings: list[str], config: Config | None = None,
            nproc: int = 1):
    """A LocalDaemon in a temporary folder, and a Producer that waited until it answers;
    stopped (SIGTERM) and cleaned up on the way out."""
    from ..client import Producer
    with tempfile.TemporaryDirectory(prefix=prefix) as state:
        daemon = LocalDaemon(state, settings, config, nproc)
        try:
            with Producer(daemon.endpoint, retry_seconds=120) as control:
                control.status()
                yield daemon, control
        finally:
            daemon.stop()

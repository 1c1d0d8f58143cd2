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

from streamrnn.keygroups import owner

# a model small enough that a 2-core CI machine trains it instantly: one plain layer,
# which the tests' pace and timeouts were set with (a crash test also runs the default
# shape, several layers with skip connections)
TINY = ["model.hidden_size=16", "model.embed_dim=8", "model.num_layers=1",
        "model.skip=false", "train.k1=4", "train.k2=8",
        "train.device=cpu", "train.cpu_threads=1", "log.format=json", "log.summary_seconds=0",
        "scores.endpoint=tcp://127.0.0.1:*"]  # a free port: tests run side by side


# the durability and cluster tests train tens of thousands of tokens each, many of them
# on two ranks, where every update is a collective: windows of the default k1 (k2 > k1,
# so a replayed update still rebuilds a state inside its window) take 4x fewer updates
# than TINY's. Their modules use it through the `long_windows` fixture (conftest.py).
LONG_WINDOWS = ["train.k1=16", "train.k2=24"]


STARTED: list[subprocess.Popen] = []  # every daemon a test started; conftest reaps them


def free_port() -> int:
    """A port free now, below the kernel's range for outgoing connections (a port from
    that range, free when a test picks it, may be some client's own a moment later,
    when the daemon restarts on it)."""
    return free_ports(1)


class DaemonProcess:
    def __init__(self, workdir: Path, overrides: list[str], port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.metrics_urls = [self.metrics_url]
        self.overrides = [*TINY, f"ingest.endpoint={self.endpoint}",
                          f"metrics.port={self.metrics_port}", *overrides]
        self.log_path = workdir / f"daemon-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, env: dict | None = None,
              args: tuple[str, ...] = ()) -> "DaemonProcess":
        command = ["serve", *args]
        for item in self.overrides:
            command += ["--set", item]
        self.proc = start_streamrnn(command, self.log_path, self.workdir, env)
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

    # what a test of one process or of ranks asks alike (see ClusterProcess)
    world_size = 1

    def kill(self) -> None:
        """SIGKILL, and gone."""
        self.stop(signal.SIGKILL)

    def wait_exit(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def rank_of(self, stream: str) -> int:
        return 0

    def endpoint_of(self, stream: str) -> str:
        return self.endpoint

    def cue(self, cue: str, stream: str | None = None) -> str:
        """A fault cue (serve/faults.py) for this process."""
        return cue

    @property
    def state(self) -> Path:
        return self.workdir / "streamrnn-state"

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


STARTED_GROUPS: list[subprocess.Popen] = []  # clusters: their whole process group is reaped


def free_ports(count: int) -> int:
    """A port p such that p .. p + count - 1 are free now (ranks bind base + rank), in
    10000 .. 32767: below the kernel's ephemeral range (ip_local_port_range)."""
    import random
    rng = random.Random()
    for _ in range(1000):
        base = rng.randrange(10000, 32768 - count)
        probes = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                probes.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in probes:
                s.close()
    raise RuntimeError(f"no {count} free ports in a row")


class ClusterProcess:
    """`streamrnn serve --nproc N` in its own session (its ranks are its children; a
    test that fails must not leave them behind). `nnodes` M > 1: M such launchers, as
    on M machines, meeting at a rendezvous port on loopback, with one state folder."""

    def __init__(self, workdir: Path, overrides: list[str], nproc: int = 2,
                 max_restarts: int = 0, nnodes: int = 1):
        self.workdir, self.nproc, self.max_restarts = workdir, nproc, max_restarts
        self.nnodes, self.world_size = nnodes, nproc * nnodes
        self.port = free_ports(self.world_size + 1)  # and the rendezvous's, when nnodes > 1
        self.endpoints = [f"tcp://127.0.0.1:{self.port + r}" for r in range(self.world_size)]
        metrics = free_ports(self.world_size)
        self.metrics_urls = [f"http://127.0.0.1:{metrics + r}/metrics"
                             for r in range(self.world_size)]
        self.overrides = [*TINY, f"ingest.endpoint={self.endpoints[0]}",
                          f"metrics.port={metrics}", "train.cpu_threads=1", *overrides]
        self.log_paths = [workdir / f"cluster-{self.port}-{n}.log" for n in range(nnodes)]
        self.procs: list[subprocess.Popen] = []

    def start(self, wait: bool = True, args: tuple[str, ...] = (),
              env: dict | None = None) -> "ClusterProcess":
        command = ["serve", "--nproc", str(self.nproc),
                   "--max-restarts", str(self.max_restarts), *args]
        if self.nnodes > 1:
            command += ["--nnodes", str(self.nnodes), "--rdzv-endpoint",
                        f"127.0.0.1:{self.port + self.world_size}"]
        for item in self.overrides:
            command += ["--set", item]
        self.procs = [start_streamrnn(command, log_path, self.workdir, env, new_session=True)
                      for log_path in self.log_paths]
        STARTED_GROUPS.extend(self.procs)
        if wait:
            self.wait_ready()
        return self

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]

    @property
    def proc(self) -> subprocess.Popen:
        return self.procs[0]

    @property
    def state(self) -> Path:
        return self.workdir / "streamrnn-state"

    def kill(self) -> None:
        self.kill_all()

    def wait_exit(self, timeout: float = 120) -> int:
        """The launcher's exit status once every launcher has ended."""
        codes = [p.wait(timeout=timeout) for p in self.procs]
        return next((c for c in codes if c), 0)

    def rank_of(self, stream: str) -> int:
        return owner(stream, self.world_size)

    def endpoint_of(self, stream: str) -> str:
        return self.endpoints[self.rank_of(stream)]

    def cue(self, cue: str, stream: str | None = None) -> str:
        """A fault cue for the rank that owns `stream` (rank 1 if none is named), before
        torchrun's first restart (serve/faults.py)."""
        return f"{cue}@{self.rank_of(stream) if stream is not None else 1}"

    def topology(self, rank: int, timeout: float = 1.0) -> dict:
        with RawClient(self.endpoints[rank]) as client:
            return client.ask({"type": "topology"}, timeout=timeout)

    def ask(self, rank: int, message: dict, timeout: float = 30) -> dict:
        with RawClient(self.endpoints[rank]) as client:
            return client.ask(message, timeout=timeout)

    def wait_ready(self, timeout: float = 120, after_generation: int = 0) -> int:
        """Until every rank answers topology with one generation (> after_generation);
        returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in self.procs), \
                f"cluster exited:\n{self.log()[-5000:]}"
            try:
                generations = {self.topology(r)["generation"]
                               for r in range(self.world_size)}
            except TimeoutError:
                continue
            if len(generations) == 1 and min(generations) > after_generation:
                return generations.pop()
            time.sleep(0.2)
        raise TimeoutError(f"cluster not ready:\n{self.log()[-5000:]}")

    def rank_pids(self, node: int | None = None) -> list[int]:
        """The ranks' processes (of one launcher's if given): the children of the
        forkserver each launcher forks them from (serve/launch.py)."""
        procs = self.procs if node is None else [self.procs[node]]
        return [rank for p in procs for child in _children(p.pid)
                if b"forkserver" in _cmdline(child) for rank in _children(child)]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Signal every launcher; the exit status of each (0 when all are 0)."""
        running = [p for p in self.procs if p.poll() is None]
        for p in running:
            p.send_signal(sig)
        codes = [p.wait(timeout=timeout) for p in self.procs]
        return next((c for c in codes if c), 0)

    def kill_all(self) -> None:
        """SIGKILL every rank, then the launchers (a power cut, as far as the processes
        can tell); returns once they are gone."""
        ranks = self.rank_pids()
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)

    def events(self) -> list[dict]:
        import json
        out = []
        for line in self.log().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.log_paths if p.exists())


def start_streamrnn(argv: list[str], log_path: Path, cwd: Path, env: dict | None = None,
                    new_session: bool = False):
    """`python -m streamrnn ARGV`, its output appended to `log_path`: forked from this
    test process's zygote (tests/zygote.py: torch imported once, not at every start),
    or, with STREAMRNN_TEST_ZYGOTE=0, started from scratch by subprocess.Popen."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if os.environ.get("STREAMRNN_TEST_ZYGOTE", "1") == "0":
        with open(log_path, "ab") as log:  # the child keeps its own copy
            return subprocess.Popen([sys.executable, "-m", "streamrnn", *argv], stdout=log,
                                    stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                    start_new_session=new_session)
    return Zygote.get().spawn(argv, log_path, cwd, env, new_session)


class Zygote:
    """The client of this test process's tests/zygote.py, started at its first use."""
    _instance: "Zygote | None" = None

    @classmethod
    def get(cls) -> "Zygote":
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        import tempfile
        import threading
        self.folder = tempfile.mkdtemp(prefix="streamrnn-zygote-")
        path = os.path.join(self.folder, "socket")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zygote.py")),
                                      path], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE)
        ready = self.proc.stdout.readline()  # once it has imported torch and the daemon
        assert ready == b"ready\n", f"the test zygote did not start ({ready!r})"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.connect(path)
        self.replies = self.socket.makefile("rb")
        self.lock = threading.Lock()

    def ask(self, request: dict) -> dict:
        import json
        with self.lock:
            self.socket.sendall(json.dumps(request).encode() + b"\n")
            return json.loads(self.replies.readline())

    def close(self) -> None:
        """It ends when its client goes away."""
        import shutil
        self.replies.close()
        self.socket.close()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)

    def spawn(self, argv: list[str], log_path: Path, cwd: Path, env: dict,
              new_session: bool) -> "Forked":
        reply = self.ask({"op": "spawn", "argv": argv, "env": env, "cwd": str(cwd),
                          "log": str(log_path), "new_session": new_session})
        return Forked(self, reply["pid"])


class Forked:
    """A process the zygote forked, as much of subprocess.Popen as the tests use."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid, self.returncode = zygote, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.ask({"op": "status", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"streamrnn (pid {self.pid})", timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # (a pid that ended may be another process's by now)
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def serve(workdir: Path, overrides: list[str], nproc: int = 1, **options):
    """`streamrnn serve` as one process (nproc 1) or as `--nproc N` ranks: the two answer
    the tests alike (endpoint, endpoint_of, kill, wait_exit, state, log, events ...)."""
    if nproc == 1:
        return DaemonProcess(workdir, overrides, **options)
    return ClusterProcess(workdir, overrides, nproc=nproc, **options)


def load_checkpoint(manifest: Path) -> dict:
    """Every file of a committed checkpoint: {"manifest", "replicated", "parts"}."""
    import json

    import torch
    manifest = Path(manifest)
    root = manifest.parent.parent
    m = json.loads(manifest.read_text())
    return {"manifest": m,
            "replicated": torch.load(root / m["replicated"], weights_only=True),
            "parts": [torch.load(root / p["path"], weights_only=True) for p in m["parts"]]}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # it ended
        return []


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    """Running (a zombie has ended: it holds no lock or port any more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False

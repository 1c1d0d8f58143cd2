"""How tests/data/states-0.2.0.tar.gz was made: state folders left by streamrnn 0.2.0,
which the upgrade tests (tests/test_upgrade.py) start today's version on.

It drives the 0.2.0 daemon, so it runs against a checkout of that release (commit
78f729d), with that checkout's tests/harness.py:

    git worktree add /tmp/v020 78f729d
    PYTHONPATH=/tmp/v020:/tmp/v020/tests .venv/bin/python \
        tests/data/make_states_0_2_0.py tests/data/states-0.2.0.tar.gz

Each folder holds the state and `expected.json`: every stream's acknowledged length,
the streams ended, and the targets trained once every acknowledged token is.
    single-clean          one process, stopped cleanly (its checkpoint holds it all)
    single-crashed        one process, SIGKILLed after a checkpoint: tokens, updates,
                          flushes and an end only in the log after it
    single-no-checkpoint  one process, SIGKILLed before its first checkpoint
    cluster-crashed       two ranks, killed after a committed step: flush steps and
                          tokens in each rank's log after it
    cluster-no-checkpoint two ranks, killed before their first committed step
"""
from __future__ import annotations

import json
import shutil
import signal
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import streamrnn
from harness import ClusterProcess, DaemonProcess, RawClient
from streamrnn.keygroups import owner

TEXT = (Path(streamrnn.__file__).parent.parent / "README.md").read_bytes()
COMMON = ["checkpoint.interval_seconds=0", "train.flush_after_seconds=1",
          "train.cpu_threads=1"]


def send(endpoint: str, stream: str, offset: int, data: bytes) -> None:
    with RawClient(endpoint) as client:
        for start in range(0, len(data), 200):
            reply = client.ask({"type": "tokens", "stream": stream, "offset": offset + start,
                                "tokens": data[start:start + 200], "width": 1})
            assert reply["type"] == "ack", reply


def ask(endpoint: str, message: dict) -> dict:
    with RawClient(endpoint) as client:
        return client.ask(message, timeout=60)


def expected(acked: dict[str, int], ended: list[str]) -> dict:
    return {"acked": acked, "ended": ended,
            "tokens_trained_when_done": sum(n - 1 for n in acked.values())}


def single(root: Path, name: str, checkpoint: bool, clean: bool) -> None:
    state = root / name
    d = DaemonProcess(root, [f"checkpoint.dir={state}", *COMMON]).start()
    acked = {"a": 0, "b": 0, "c": 0}
    for stream, size in (("a", 1500), ("b", 900)):
        send(d.endpoint, stream, 0, TEXT[:size])
        acked[stream] = size
    if checkpoint:
        assert ask(d.endpoint, {"type": "checkpoint"})["ok"]
    for stream, size in (("a", 700), ("b", 333), ("c", 411)):
        send(d.endpoint, stream, acked[stream], TEXT[acked[stream]:][:size])
        acked[stream] += size
    time.sleep(2.5)  # idle flushes: flush records (and the updates before them)
    send(d.endpoint, "a", acked["a"], TEXT[5000:5123])
    acked["a"] += 123
    assert ask(d.endpoint, {"type": "end", "stream": "c"})["type"] == "ended"
    if clean:
        time.sleep(2.5)  # c is flushed and forgotten
        assert d.stop() == 0
    else:
        d.stop(signal.SIGKILL)
    (state / "expected.json").write_text(json.dumps(expected(acked, ["c"]), indent=1))


def cluster(root: Path, name: str, checkpoint: bool) -> None:
    state = root / name
    c = ClusterProcess(root, [f"checkpoint.dir={state}", *COMMON]).start()
    streams = [s for s in (f"s{i}" for i in range(40))]
    streams = [s for s in streams if owner(s, 2) == 0][:2] + \
        [s for s in streams if owner(s, 2) == 1][:2]
    acked = {s: 0 for s in streams}
    for i, stream in enumerate(streams):
        size = 600 + 150 * i
        send(c.endpoints[owner(stream, 2)], stream, 0, TEXT[:size])
        acked[stream] = size
    if checkpoint:
        assert ask(c.endpoints[1], {"type": "checkpoint"})["ok"]
    time.sleep(2.5)  # flush steps
    for i, stream in enumerate(streams):
        size = 250 + 40 * i
        send(c.endpoints[owner(stream, 2)], stream, acked[stream],
             TEXT[acked[stream]:][:size])
        acked[stream] += size
    c.kill_all()
    (state / "expected.json").write_text(json.dumps(expected(acked, []), indent=1))


def main(out: str) -> None:
    assert streamrnn.__version__ == "0.2.0", streamrnn.__file__
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        single(root, "single-clean", checkpoint=True, clean=True)
        single(root, "single-crashed", checkpoint=True, clean=False)
        single(root, "single-no-checkpoint", checkpoint=False, clean=False)
        cluster(root, "cluster-crashed", checkpoint=True)
        cluster(root, "cluster-no-checkpoint", checkpoint=False)
        for folder in root.glob("*/"):
            (folder / "lock").unlink(missing_ok=True)
            for lock in folder.glob("rank-*/lock"):
                lock.unlink()
        with tarfile.open(out, "w:gz") as tar:
            for name in ("single-clean", "single-crashed", "single-no-checkpoint",
                         "cluster-crashed", "cluster-no-checkpoint"):
                tar.add(root / name, arcname=name)
    shutil.rmtree(Path(out).parent / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])

"""Lose nothing: kill -9 at random instants, at fsync, mid-checkpoint; corrupt
checkpoints; full disks. Real daemons, real files, real SIGKILL.

The exactness bar: with one stream, a daemon killed and restarted several times ends
with model, optimizer and stream state equal, bit for bit, to one that never crashed.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import DaemonProcess, RawClient
from streamrnn.serve import checkpoint
from streamrnn.client import Producer
from streamrnn.tools.textdata import text_streams

# no idle flushes (their timing would differ between runs); checkpoints every 20 updates,
# so a kill usually lands between two and recovery needs the log
DURABLE = ["train.flush_after_seconds=0", "checkpoint.interval_updates=20",
           "checkpoint.interval_seconds=0"]


def text(n: int, seed: int = 0) -> np.ndarray:
    data = text_streams(seed + 1, n)[seed]
    return np.frombuffer(data, np.uint8)


def ask(d: DaemonProcess, message: dict, timeout: float = 60) -> dict:
    with Producer(d.endpoint, retry_seconds=timeout, reply_timeout=timeout) as p:
        return p.request(message)


def finish(d: DaemonProcess) -> dict:
    """Flush everything, wait until trained, checkpoint; the checkpoint's state."""
    ask(d, {"type": "flush"})
    deadline = time.monotonic() + 120
    while ask(d, {"type": "status"})["queued_tokens"] > 0:
        assert time.monotonic() < deadline, "training did not catch up"
        time.sleep(0.1)
    reply = ask(d, {"type": "checkpoint"})
    assert reply["ok"], reply
    return checkpoint.load(Path(d.workdir) / reply["path"])


def send_all(d: DaemonProcess, stream: str, tokens, offset: int | None = 0, **options):
    """Send tokens to one stream (at `offset`; None: after what it has) and wait for
    every ack."""
    with Producer(d.endpoint, **options) as p:
        p.send(stream, tokens, offset=offset)
        p.flush(timeout=60)


def wait_trained(d: DaemonProcess, at_most: int = 3) -> dict:
    """Wait until at most `at_most` targets are queued (default: the r < k1 = 4 of one
    stream, which only a flush trains); the status."""
    deadline = time.monotonic() + 120
    while (status := ask(d, {"type": "status"}))["queued_tokens"] > at_most:
        assert time.monotonic() < deadline, "training did not catch up"
        time.sleep(0.1)
    return status


def assert_identical(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def learned(state: dict) -> dict:
    """The whole checkpoint but what says when and where in the log it was written
    (each restart logs its config, so a crashed run's log position is further on), and
    the endpoints of the saved config (the two runs listen on ports of their own)."""
    learner = dict(state["learner"])
    learner["config"] = {k: v for k, v in learner["config"].items()
                         if k not in ("ingest", "metrics")}
    return {**{k: v for k, v in state.items() if k not in ("created", "wal_seq")},
            "learner": learner}


def feed_in_thread(d: DaemonProcess, stream: str, data: np.ndarray, chunk: int = 100):
    errors: list[Exception] = []

    def produce():
        try:
            with Producer(d.endpoint, retry_seconds=90, reply_timeout=0.5,
                          max_tokens_per_message=chunk) as producer:
                producer.send(stream, data, offset=0)
                producer.flush(timeout=180)
        except Exception as e:  # checked by the test
            errors.append(e)

    thread = threading.Thread(target=produce)
    thread.start()
    return thread, errors


def uninterrupted(tmp_path: Path, data: np.ndarray, shape: tuple[str, ...] = ()) -> dict:
    d = DaemonProcess(tmp_path / "calm", [*DURABLE, *shape]).start()
    thread, errors = feed_in_thread(d, "s", data)
    thread.join()
    assert not errors, errors
    state = finish(d)
    assert d.stop() == 0
    return state


@pytest.fixture
def workdirs(tmp_path):
    for name in ("calm", "crash"):
        (tmp_path / name).mkdir()
    return tmp_path


@pytest.mark.parametrize("shape", [(), ("model.num_layers=3", "model.skip=true")],
                         ids=["one layer", "three layers with skip connections"])
def test_sigkill_at_random_instants_changes_nothing(workdirs, shape):
    data = text(6000)
    calm = uninterrupted(workdirs, data, shape)
    d = DaemonProcess(workdirs / "crash", [*DURABLE, *shape]).start()
    thread, errors = feed_in_thread(d, "s", data)
    rng = random.Random(7)
    for _ in range(3):
        time.sleep(rng.uniform(0.3, 1.2))
        d.stop(signal.SIGKILL)
        d.start()
    thread.join()
    assert not errors, errors
    crashed = finish(d)
    assert d.stop() == 0
    replayed = [e for e in d.events() if e["event"] == "replayed the log"]
    assert replayed, "no restart needed the log: the test did not test recovery"
    assert crashed["learner"]["totals"]["tokens_trained"] == len(data) - 1
    assert_identical(learned(crashed), learned(calm))


@pytest.mark.parametrize("point", ["wal_fsync:6", "checkpoint_write:2"])
def test_kill_at_fsync_or_mid_checkpoint_changes_nothing(workdirs, point):
    data = text(4000, seed=1)
    calm = uninterrupted(workdirs, data)
    d = DaemonProcess(workdirs / "crash", DURABLE)
    d.start(env={"STREAMRNN_CRASH_AT": point})
    thread, errors = feed_in_thread(d, "s", data)
    d.proc.wait(timeout=120)  # it kills itself at the point
    assert d.proc.returncode == -signal.SIGKILL
    if point.startswith("checkpoint"):
        assert list((workdirs / "crash/streamrnn-state/checkpoints").glob("*.tmp"))
    d.start()
    thread.join()
    assert not errors, errors
    crashed = finish(d)
    assert d.stop() == 0
    assert not list((workdirs / "crash/streamrnn-state/checkpoints").glob("*.tmp"))
    assert_identical(learned(crashed), learned(calm))


def test_many_streams_and_producers_exactly_once_through_kills(tmp_path):
    """Producers in other processes feed several streams; the daemon is killed with
    SIGKILL at random instants; every token is trained exactly once."""
    files = []
    for i, data in enumerate(text_streams(4, 5000)):
        path = tmp_path / f"stream{i}.txt"
        path.write_bytes(data)
        files.append(path)
    d = DaemonProcess(tmp_path, DURABLE).start()
    feeders = [subprocess.Popen(
        [sys.executable, "-m", "streamrnn", "feed", "--endpoint", d.endpoint,
         "--retry-seconds", "90", "--chunk", "200", "--no-flush", *pair],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        for pair in ([files[0].name, files[1].name], [files[2].name], [files[3].name])]
    rng = random.Random(11)
    for _ in range(4):
        time.sleep(rng.uniform(0.5, 1.5))
        d.stop(signal.SIGKILL)
        d.start()
    for feeder in feeders:
        _, err = feeder.communicate(timeout=240)
        assert feeder.returncode == 0, err
    state = finish(d)
    status = ask(d, {"type": "status"})
    for path in files:
        assert ask(d, {"type": "position", "stream": path.name})["next_offset"] == 5000
    assert status["tokens_trained"] == 4 * (5000 - 1)
    assert status["tokens_received"] == 4 * 5000
    assert state["learner"]["totals"]["tokens_trained"] == 4 * (5000 - 1)
    assert d.stop() == 0


def test_sigterm_under_load_checkpoints_and_next_start_replays_nothing(tmp_path):
    d = DaemonProcess(tmp_path, ["checkpoint.interval_seconds=0"]).start()
    thread, errors = feed_in_thread(d, "s", text(20000, seed=2), chunk=500)
    time.sleep(1.5)
    started = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 20
    saved = [e for e in d.events() if e["event"] == "checkpoint saved"]
    assert saved, d.log()
    d.start()
    events = d.events()
    assert not any(e["event"] == "replayed the log" for e in events[-10:]), d.log()
    assert ask(d, {"type": "status"})["updates"] > 0
    thread.join()  # the producer resumes from the daemon's offset and finishes
    assert not errors, errors
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 20000
    assert d.stop() == 0


def test_corrupt_newest_checkpoint_falls_back_and_replays_more(tmp_path):
    d = DaemonProcess(tmp_path, DURABLE).start()
    send_all(d, "s", text(3000, seed=3))
    first = ask(d, {"type": "checkpoint"})
    send_all(d, "s", text(1000, seed=4), offset=None)
    status_before = wait_trained(d)
    second = ask(d, {"type": "checkpoint"})
    d.stop(signal.SIGKILL)
    newest = tmp_path / second["path"]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated: a torn disk, say
    d.start()
    after = ask(d, {"type": "status"})
    assert after["tokens_received"] == status_before["tokens_received"] == 4000
    assert after["updates"] == status_before["updates"]
    assert any(e["event"].startswith("checkpoint unreadable") for e in d.events())
    assert any(e["event"] == "replayed the log" for e in d.events())
    text_metrics = _scrape(d)
    assert "streamrnn_checkpoint_load_failures_total 1.0" in text_metrics
    assert first["wal_seq"] < second["wal_seq"]
    assert d.stop() == 0


def test_incompatible_config_is_refused_unless_fresh(tmp_path):
    d = DaemonProcess(tmp_path, DURABLE).start()
    with RawClient(d.endpoint) as c:
        c.ask({"type": "tokens", "stream": "s", "offset": 0, "tokens": list(range(50))})
    assert d.stop() == 0
    other = DaemonProcess(tmp_path, [*DURABLE, "model.hidden_size=24"], port=d.port)
    other.start(wait=False)
    assert other.proc.wait(timeout=60) == 2
    assert "model.hidden_size (saved 16, now 24). To continue it, use its settings " \
        "(`--set model.hidden_size=16`" in other.log()
    other.start(args=("--fresh",))
    assert ask(other, {"type": "position", "stream": "s"})["next_offset"] == 0
    assert list(tmp_path.glob("streamrnn-state/previous-*/checkpoints/checkpoint-*.pt"))
    assert other.stop() == 0


def test_failed_checkpoint_write_keeps_serving(tmp_path):
    # only the requested checkpoint: a periodic one in flight would leave its .tmp there
    d = DaemonProcess(tmp_path, [*DURABLE, "checkpoint.interval_updates=0"])
    d.start(env={"STREAMRNN_FAIL_AT": "checkpoint_write:1"})
    send_all(d, "s", text(2000))
    reply = ask(d, {"type": "checkpoint"})
    assert reply == {"type": "checkpoint", "ok": False,
                     "error": "the write failed; see the daemon's log", "id": reply["id"]}
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 2000
    assert "streamrnn_checkpoint_failures_total" in _scrape(d)
    assert float(_metric(_scrape(d), "streamrnn_checkpoint_failures_total")) >= 1
    assert not list((tmp_path / "streamrnn-state/checkpoints").glob("*"))  # no debris
    d.stop(signal.SIGKILL)
    d.start()  # the log has it all
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 2000
    assert d.stop() == 0


def test_full_log_disk_answers_busy_and_acks_nothing(tmp_path):
    d = DaemonProcess(tmp_path, DURABLE)
    d.start(env={"STREAMRNN_FAIL_AT": "wal_write:3"})
    with RawClient(d.endpoint) as c:
        ok = c.ask({"type": "tokens", "stream": "s", "offset": 0, "tokens": list(range(10))})
        assert ok["type"] == "ack"
        busy = c.ask({"type": "tokens", "stream": "s", "offset": 10, "tokens": [1, 2, 3]})
        assert busy["type"] == "busy"
        assert c.ask({"type": "position", "stream": "s"})["next_offset"] == 10
    assert float(_metric(_scrape(d), "streamrnn_wal_write_failures_total")) >= 1
    d.stop(signal.SIGKILL)
    d.start()
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 10
    assert d.stop() == 0


def test_checkpoint_commands(tmp_path):
    d = DaemonProcess(tmp_path, DURABLE).start()
    send_all(d, "s", text(1500))
    status = wait_trained(d)  # nothing changes from here on
    cli = [sys.executable, "-m", "streamrnn", "checkpoint"]
    saved = subprocess.run([*cli, "save", "--endpoint", d.endpoint], capture_output=True,
                           text=True, timeout=120)
    assert saved.returncode == 0 and saved.stdout.startswith("saved "), saved.stderr
    listing = subprocess.run([*cli, "list", "--json"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    rows = __import__("json").loads(listing.stdout)
    assert listing.returncode == 0 and rows
    newest = rows[0]
    for key in ("tokens_trained", "updates", "bits"):
        assert newest[key] == status[key]
    inspect = subprocess.run([*cli, "inspect", newest["path"]], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0 and "TBPTT(4, 8)" in inspect.stdout
    bad = tmp_path / "not-a-checkpoint.pt"
    bad.write_bytes(b"garbage")
    refused = subprocess.run([*cli, "inspect", str(bad)], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 1 and "UNREADABLE" in refused.stdout
    assert d.stop() == 0


def _scrape(d: DaemonProcess) -> str:
    import urllib.request
    with urllib.request.urlopen(d.metrics_url, timeout=10) as r:
        return r.read().decode()


def _metric(text: str, name: str) -> str:
    return next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " "))


# ---- refusing what cannot be continued as it is ---------------------------------------

def test_second_daemon_on_the_same_state_folder_is_refused(tmp_path):
    d = DaemonProcess(tmp_path, DURABLE).start()
    writing = tmp_path / "streamrnn-state/checkpoints/checkpoint-being-written.tmp"
    writing.write_bytes(b"the first daemon's checkpoint in progress")
    other = DaemonProcess(tmp_path, DURABLE)  # same folder (cwd), other ports
    other.start(wait=False)
    assert other.proc.wait(timeout=60) == 2
    assert f"is in use by streamrnn serve, pid {d.proc.pid}" in other.log()
    assert writing.exists()  # refused before touching anything in the folder
    assert ask(d, {"type": "status"})["type"] == "status"  # the first one is unharmed
    assert d.stop() == 0


SMALL_LOG = [*DURABLE, "wal.segment_bytes=2000", "checkpoint.keep=2"]


def _feed_with_checkpoints(d: DaemonProcess, rounds: int) -> int:
    sent = 0
    for i in range(rounds):
        send_all(d, "s", text(600, seed=i), offset=sent)
        sent += 600
        wait_trained(d)
        assert ask(d, {"type": "checkpoint"})["ok"]
    return sent


def test_log_with_a_hole_is_refused_not_replayed(tmp_path):
    """All checkpoints unreadable and the early log already deleted: replaying what is
    left would silently drop acknowledged input, so the daemon refuses to start."""
    d = DaemonProcess(tmp_path, SMALL_LOG).start()
    _feed_with_checkpoints(d, 4)
    d.stop(signal.SIGKILL)
    root = tmp_path / "streamrnn-state"
    segments = sorted((root / "wal").glob("wal-*.log"))
    assert segments[0].name != "wal-0000000000000001.log"  # covered ones were removed
    for path in (root / "checkpoints").glob("checkpoint-*.pt"):
        path.write_bytes(b"torn")
    d.start(wait=False)
    assert d.proc.wait(timeout=60) == 2
    assert "continues at record" in d.log() and "no checkpoint could be loaded" in d.log()
    d.start(args=("--fresh",))  # the way out is explicit, and keeps the old files
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 0
    assert list(root.glob("previous-*/wal/wal-*.log"))
    assert d.stop() == 0


def test_damage_inside_an_older_log_segment_is_refused(tmp_path):
    d = DaemonProcess(tmp_path, ["train.flush_after_seconds=0", "checkpoint.interval_seconds=0",
                                 "wal.segment_bytes=2000"]).start()
    send_all(d, "s", text(3000), max_tokens_per_message=100)
    d.stop(signal.SIGKILL)  # no checkpoint: everything is in the log
    first = sorted((tmp_path / "streamrnn-state/wal").glob("wal-*.log"))[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    d.start(wait=False)
    assert d.proc.wait(timeout=60) == 2
    assert f"log segment streamrnn-state/wal/{first.name} is damaged at byte" in d.log()


def test_log_of_another_model_is_refused_without_a_checkpoint(tmp_path):
    d = DaemonProcess(tmp_path, ["train.flush_after_seconds=0",
                                 "checkpoint.interval_seconds=0"]).start()
    with RawClient(d.endpoint) as c:
        c.ask({"type": "tokens", "stream": "s", "offset": 0, "tokens": list(range(50))})
    d.stop(signal.SIGKILL)
    other = DaemonProcess(tmp_path, ["checkpoint.interval_seconds=0", "model.hidden_size=24"])
    other.start(wait=False)
    assert other.proc.wait(timeout=60) == 2
    assert "was written with a different config: model.hidden_size (saved 16, now 24)" \
        in other.log()


def test_replay_uses_the_batch_width_the_log_was_written_with(tmp_path):
    """train.max_batch_streams and the learning settings may change between runs: the
    logged updates replay with the width, rate and betas they ran with, not the new
    ones; the change is logged."""
    narrow = ["train.flush_after_seconds=0", "checkpoint.interval_seconds=0",
              "train.max_batch_streams=1", "train.lr=0.02", "train.adam_beta1=0.5"]
    d = DaemonProcess(tmp_path, narrow).start()
    for half in range(2):  # a checkpoint between: the log after it ran narrow too
        with Producer(d.endpoint) as p:
            for i in range(6):
                p.send(f"s{i}", text(200, seed=i)[half * 100:(half + 1) * 100],
                       offset=half * 100)
            p.flush(timeout=60)
        before = wait_trained(d, at_most=6 * ((100 * half + 99) % 4))
        if half == 0:
            assert ask(d, {"type": "checkpoint"})["ok"]
    d.stop(signal.SIGKILL)
    wide = DaemonProcess(tmp_path, [*narrow[:2], "train.max_batch_streams=256",
                                    "train.lr=0.001", "train.adam_beta1=0.9"], port=d.port)
    wide.start()
    after = ask(wide, {"type": "status"})
    for key in ("updates", "tokens_trained", "bits", "tokens_received"):
        assert after[key] == before[key], key
    assert "train.lr 0.02 -> 0.001, train.adam_beta1 0.5 -> 0.9" in wide.log()
    assert wide.stop() == 0


def test_switching_the_log_off_keeps_what_the_old_log_holds(tmp_path):
    d = DaemonProcess(tmp_path, ["train.flush_after_seconds=0",
                                 "checkpoint.interval_seconds=0"]).start()
    with RawClient(d.endpoint) as c:
        c.ask({"type": "tokens", "stream": "s", "offset": 0, "tokens": list(range(40))})
    d.stop(signal.SIGKILL)  # acked: only the log has it
    off = DaemonProcess(tmp_path, ["checkpoint.interval_seconds=0", "wal.mode=off"],
                        port=d.port).start()
    assert ask(off, {"type": "position", "stream": "s"})["next_offset"] == 40
    assert not list((tmp_path / "streamrnn-state/wal").glob("wal-*.log"))  # folded in
    assert off.stop() == 0
    d.start()  # back to the log: nothing stale replays onto the newer checkpoint
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 40
    assert d.stop() == 0


def test_full_disk_when_the_log_starts_a_new_file_answers_busy(tmp_path):
    # the config record each start writes first takes about 1 kB
    d = DaemonProcess(tmp_path, [*DURABLE, "wal.segment_bytes=2000"])
    d.start(env={"STREAMRNN_FAIL_AT": "wal_rotate:1"})
    acked = 0
    with RawClient(d.endpoint) as c:
        for _ in range(40):
            reply = c.ask({"type": "tokens", "stream": "s", "offset": acked,
                           "tokens": list(range(50))})
            if reply["type"] != "ack":
                break
            acked += 50
        assert reply["type"] == "busy" and 0 < acked < 2000
        assert c.ask({"type": "position", "stream": "s"})["next_offset"] == acked
    assert d.proc.poll() is None
    assert float(_metric(_scrape(d), "streamrnn_wal_write_failures_total")) >= 1
    d.stop(signal.SIGKILL)
    d.start()
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == acked
    assert d.stop() == 0


def test_a_failing_request_is_answered_and_the_daemon_goes_on(tmp_path):
    d = DaemonProcess(tmp_path, DURABLE)
    d.start(env={"STREAMRNN_FAIL_AT": "request_predict:1"})
    with RawClient(d.endpoint) as c:
        reply = c.ask({"type": "predict", "stream": "s"})
        assert reply["type"] == "nack" and reply["reason"] == "internal"
        assert "No space left on device" in reply["message"]
        assert c.ask({"type": "status"})["type"] == "status"
    assert 'streamrnn_messages_rejected_total{reason="internal"} 1.0' in _scrape(d)
    assert d.stop() == 0


def test_repeated_checkpoint_requests_write_once(tmp_path):
    d = DaemonProcess(tmp_path, DURABLE).start()
    send_all(d, "s", text(500))
    wait_trained(d)
    first = ask(d, {"type": "checkpoint"})
    writes = sum(e["event"] == "checkpoint saved" for e in d.events())
    again = [ask(d, {"type": "checkpoint"}) for _ in range(3)]
    assert all(r["path"] == first["path"] for r in again)
    assert sum(e["event"] == "checkpoint saved" for e in d.events()) == writes
    assert d.stop() == 0


def test_an_ended_stream_is_forgotten_and_its_id_starts_again(tmp_path):
    d = DaemonProcess(tmp_path, ["checkpoint.interval_seconds=0"]).start()
    with RawClient(d.endpoint) as c:
        assert c.ask({"type": "tokens", "stream": "s", "offset": 0,
                      "tokens": list(range(30))})["type"] == "ack"
        ended = c.ask({"type": "end", "stream": "s"})
        assert ended["type"] == "ended" and ended["known"] and ended["next_offset"] == 30
        refused = c.ask({"type": "tokens", "stream": "s", "offset": 30, "tokens": [1]})
        assert refused["type"] == "nack" and refused["reason"] == "ended"
        deadline = time.monotonic() + 30
        while c.ask({"type": "position", "stream": "s"})["next_offset"] != 0:
            assert time.monotonic() < deadline, "never forgotten"
            time.sleep(0.1)
        assert c.ask({"type": "tokens", "stream": "s", "offset": 0,
                      "tokens": [5, 6, 7]})["type"] == "ack"
        assert c.ask({"type": "end", "stream": "nobody"})["known"] is False
    assert "streamrnn_streams_forgotten_total 1.0" in _scrape(d)
    status = ask(d, {"type": "status"})
    assert status["streams"] == 1 and status["tokens_received"] == 33
    d.stop(signal.SIGKILL)
    d.start()  # the log replays the end, the forgetting and the new start alike
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 3
    assert ask(d, {"type": "status"})["streams"] == 1
    assert d.stop() == 0


def test_a_failed_fsync_acknowledges_nothing_and_ends_the_daemon(tmp_path):
    """After a failed fsync a later one may report success for data that never reached
    the disk: nothing more may be acked, so the daemon ends (systemd restarts it)."""
    d = DaemonProcess(tmp_path, DURABLE)
    d.start(env={"STREAMRNN_FAIL_AT": "wal_fsync:2"})  # the 1st: wait_ready's status
    with RawClient(d.endpoint) as c:
        with pytest.raises(TimeoutError):
            c.ask({"type": "tokens", "stream": "s", "offset": 0, "tokens": [1, 2, 3]},
                  timeout=5)
    assert d.proc.wait(timeout=30) == 1
    assert "fsync of the write-ahead log" in d.log()

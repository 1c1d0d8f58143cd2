"""Lose nothing: kill -9 at random instants, at fsync, mid-checkpoint; corrupt
checkpoints; holed and damaged logs; full disks; a failed fsync; wal.mode = off; a stop
during a replay. Real daemons, real files, real SIGKILL. Each test runs against one
process and against two ranks under torchrun (gloo): one durability path serves both.

The exactness bar: with one stream, a daemon killed and restarted several times ends
with model, optimizer and stream state equal, bit for bit, to one that never crashed.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import RawClient, load_checkpoint, serve
from streamrnn.client import Producer
from streamrnn.tools.textdata import text_streams

# every test starts, kills and restarts real daemons, and trains with long windows
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("long_windows")]

# no idle flushes (their timing would differ between runs); checkpoints every 20 updates,
# so a kill usually lands between two and recovery needs the log
DURABLE = ["train.flush_after_seconds=0", "checkpoint.interval_updates=20",
           "checkpoint.interval_seconds=0"]

# one process, and two ranks (a stream's messages and faults go to the rank that owns it)
LAYOUTS = [pytest.param(1, id="one process"),
           pytest.param(2, id="two ranks", marks=pytest.mark.skipif(
               not torch.distributed.is_available(), reason="no torch.distributed"))]


@pytest.fixture(params=LAYOUTS)
def nproc(request) -> int:
    return request.param


def text(n: int, seed: int = 0) -> np.ndarray:
    data = text_streams(seed + 1, n)[seed]
    return np.frombuffer(data, np.uint8)


def ask(d, message: dict, timeout: float = 60) -> dict:
    """A request, to the rank it is about (the rank asked, for one about none)."""
    with Producer(d.endpoint, retry_seconds=timeout, reply_timeout=timeout) as p:
        return p.request(message)


def status(d) -> dict:
    """The daemon's status; of ranks, their totals (and `last_checkpoint`, rank 0's)."""
    with Producer(d.endpoint, retry_seconds=60, reply_timeout=60) as p:
        if d.world_size == 1:
            return p.status()
        cluster = p.cluster_status()
    assert not [r for r in cluster["ranks"] if "error" in r], cluster
    return {**cluster["totals"], "last_checkpoint": cluster["ranks"][0]["last_checkpoint"]}


def flush_all(d) -> None:
    for endpoint in getattr(d, "endpoints", [d.endpoint]):
        with RawClient(endpoint) as client:
            assert client.ask({"type": "flush"}, timeout=60)["type"] == "flush"


def wait_trained(d, at_most: int = 15) -> dict:
    """Wait until at most `at_most` targets are queued (default: the r < k1 = 16 of one
    stream, which only a flush trains); the status."""
    deadline = time.monotonic() + 120
    while (s := status(d))["queued_tokens"] > at_most:
        assert time.monotonic() < deadline, "training did not catch up"
        time.sleep(0.1)
    return s


def finish(d) -> dict:
    """Flush everything, wait until trained, checkpoint; the checkpoint's files."""
    flush_all(d)
    wait_trained(d, at_most=0)
    reply = ask(d, {"type": "checkpoint"})
    assert reply["ok"], reply
    return load_checkpoint(Path(reply["path"]))


def send_all(d, stream: str, tokens, offset: int | None = 0, **options):
    """Send tokens to one stream (at `offset`; None: after what it has) and wait for
    every ack."""
    with Producer(d.endpoint, **options) as p:
        p.send(stream, tokens, offset=offset)
        p.flush(timeout=60)


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


def learned(files: dict) -> dict:
    """A checkpoint's learned state: all of it but what says when it was written, which
    checkpoint it is and where in the log (each restart logs its start records, so a
    crashed run's log position is further on), and the endpoints of the saved config
    (the two runs listen on ports of their own)."""
    replicated = {k: v for k, v in files["replicated"].items()
                  if k not in ("created", "number")}
    learner = dict(replicated["learner"])
    learner["config"] = {k: v for k, v in learner["config"].items()
                         if k not in ("ingest", "metrics")}
    return {"replicated": {**replicated, "learner": learner},
            "parts": [{k: v for k, v in part.items()
                       if k not in ("created", "number", "wal_seq")}
                      for part in files["parts"]]}


def feed_in_thread(d, stream: str, data: np.ndarray, chunk: int = 100):
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


def uninterrupted(workdir: Path, run_folder: Path, data: np.ndarray, nproc: int,
                  shape=()) -> dict:
    """What a daemon that never crashed learned from `data`: computed once per test run
    (the first test that needs it runs the daemon; xdist workers share it on disk)."""
    key = hashlib.sha256(repr((data.tobytes(), nproc, shape)).encode()).hexdigest()[:16]
    stored = run_folder / f"uninterrupted-{key}.pt"
    with open(run_folder / f"uninterrupted-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker computing it: wait for it
        if not stored.exists():
            d = serve(workdir / "calm", [*DURABLE, *shape], nproc).start()
            thread, errors = feed_in_thread(d, "s", data)
            thread.join()
            assert not errors, errors
            files = learned(finish(d))
            assert d.stop() == 0
            torch.save(files, stored.with_suffix(".tmp"))
            stored.with_suffix(".tmp").rename(stored)
    return torch.load(stored, weights_only=True)


def scrape(d, rank: int = 0) -> str:
    with urllib.request.urlopen(d.metrics_urls[rank], timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str) -> str:
    return next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " "))


def count(d, event: str) -> int:
    return sum(e.get("event") == event for e in d.events())


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory) -> Path:
    """A folder of this test run that every xdist worker sees."""
    base = tmp_path_factory.getbasetemp()  # under xdist: this run's folder / the worker's
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture
def workdirs(tmp_path):
    for name in ("calm", "crash"):
        (tmp_path / name).mkdir()
    return tmp_path


# ---- kills ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(), ("model.num_layers=3", "model.skip=true")],
                         ids=["one layer", "three layers with skip connections"])
def test_sigkill_at_random_instants_changes_nothing(workdirs, run_folder, nproc, shape):
    data = text(6000)
    calm = uninterrupted(workdirs, run_folder, data, nproc, shape)
    d = serve(workdirs / "crash", [*DURABLE, *shape], nproc).start()
    thread, errors = feed_in_thread(d, "s", data)
    rng = random.Random(7)
    for _ in range(3):
        time.sleep(rng.uniform(0.3, 1.2))
        d.kill()
        d.start()
    thread.join()
    assert not errors, errors
    crashed = finish(d)
    assert d.stop() == 0
    assert count(d, "replayed the log"), "no restart needed the log: the test did not test recovery"
    assert crashed["manifest"]["totals"]["tokens_trained"] == len(data) - 1
    assert_identical(learned(crashed), calm)


@pytest.mark.parametrize("point", ["wal_fsync:6", "checkpoint_write:2"])
def test_kill_at_fsync_or_mid_checkpoint_changes_nothing(workdirs, run_folder, nproc,
                                                       point):
    data = text(6000)  # what the random kills' test sends: the calm run is shared
    calm = uninterrupted(workdirs, run_folder, data, nproc)
    d = serve(workdirs / "crash", DURABLE, nproc)
    d.start(env={"STREAMRNN_CRASH_AT": d.cue(point, "s")})
    thread, errors = feed_in_thread(d, "s", data)
    code = d.wait_exit()  # it kills itself at the point (one rank: then all end)
    assert code == (-signal.SIGKILL if nproc == 1 else 1)
    checkpoints = d.state / "checkpoints"
    if point.startswith("checkpoint"):
        assert list(checkpoints.glob("*.tmp"))
    d.start()
    thread.join()
    assert not errors, errors
    crashed = finish(d)
    assert d.stop() == 0
    assert not list(checkpoints.glob("*.tmp"))
    assert_identical(learned(crashed), calm)


def test_many_streams_and_producers_exactly_once_through_kills(tmp_path, nproc):
    """Producers in other processes feed several streams; the daemon is killed with
    SIGKILL at random instants; every token is trained exactly once."""
    files = []
    for i, data in enumerate(text_streams(4, 5000)):
        path = tmp_path / f"stream{i}.txt"
        path.write_bytes(data)
        files.append(path)
    d = serve(tmp_path, DURABLE, nproc).start()
    feeders = [subprocess.Popen(
        [sys.executable, "-m", "streamrnn", "feed", "--endpoint", d.endpoint,
         "--retry-seconds", "90", "--chunk", "200", "--no-flush", *pair],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        for pair in ([files[0].name, files[1].name], [files[2].name], [files[3].name])]
    rng = random.Random(11)
    for _ in range(4):
        time.sleep(rng.uniform(0.5, 1.5))
        d.kill()
        d.start()
    for feeder in feeders:
        _, err = feeder.communicate(timeout=240)
        assert feeder.returncode == 0, err
    state = finish(d)
    totals = status(d)
    for path in files:
        assert ask(d, {"type": "position", "stream": path.name})["next_offset"] == 5000
    assert totals["tokens_trained"] == 4 * (5000 - 1)
    assert totals["tokens_received"] == 4 * 5000
    assert state["manifest"]["totals"]["tokens_trained"] == 4 * (5000 - 1)
    assert d.stop() == 0


def test_sigterm_under_load_checkpoints_and_next_start_replays_nothing(tmp_path, nproc):
    d = serve(tmp_path, ["checkpoint.interval_seconds=0"], nproc).start()
    thread, errors = feed_in_thread(d, "s", text(20000, seed=2), chunk=500)
    time.sleep(1.5)
    started = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 20
    assert count(d, "checkpoint saved"), d.log()
    replays = count(d, "replayed the log")
    d.start()
    assert count(d, "replayed the log") == replays, d.log()
    assert status(d)["updates"] > 0
    thread.join()  # the producer resumes from the daemon's offset and finishes
    assert not errors, errors
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 20000
    assert d.stop() == 0


def test_a_stop_during_a_replay_writes_nothing_and_the_next_start_replays_it(tmp_path,
                                                                             nproc):
    # short windows (TINY's): many steps to replay, to stop in the middle of
    d = serve(tmp_path, DURABLE[:1] + ["checkpoint.interval_seconds=0", "train.k1=4",
                                       "train.k2=8"], nproc).start()
    send_all(d, "s", text(3000, seed=5))
    before = wait_trained(d, at_most=3)
    d.kill()  # no checkpoint: everything is in the log, ~750 steps to replay
    starts = count(d, "starting")
    d.start(wait=False, env={"STREAMRNN_SLOW_AT": "replay_step:1"})  # 20 ms a step
    deadline = time.monotonic() + 60
    while count(d, "starting") < starts + nproc:  # (every rank is in its recovery)
        assert time.monotonic() < deadline and d.proc.poll() is None, d.log()
        time.sleep(0.1)
    time.sleep(2)
    assert d.stop(signal.SIGTERM) == 0
    assert count(d, "stop requested during the replay; it starts again at the next start")
    assert not list((d.state / "checkpoints").glob("checkpoint-*.json"))  # nothing written
    d.start()
    after = status(d)
    for key in ("updates", "tokens_trained", "bits", "tokens_received"):
        assert after[key] == before[key], key
    assert d.stop() == 0


# ---- damaged files -------------------------------------------------------------------------
def test_corrupt_newest_checkpoint_falls_back_and_replays_more(tmp_path, nproc):
    d = serve(tmp_path, DURABLE, nproc).start()
    send_all(d, "s", text(3000, seed=3))
    first = ask(d, {"type": "checkpoint"})
    send_all(d, "s", text(1000, seed=4), offset=None)
    status_before = wait_trained(d)
    second = ask(d, {"type": "checkpoint"})
    d.kill()
    newest = load_checkpoint(Path(second["path"]))["manifest"]["replicated"]
    newest = d.state / newest
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated: a torn disk, say
    d.start()
    after = status(d)
    assert after["tokens_received"] == status_before["tokens_received"] == 4000
    assert after["updates"] == status_before["updates"]
    assert count(d, "checkpoint unreadable, using the one before it and more of the log")
    assert count(d, "replayed the log")
    assert "streamrnn_checkpoint_load_failures_total 1.0" in scrape(d)
    assert first["number"] < second["number"] and first["wal_seq"] < second["wal_seq"]
    assert d.stop() == 0


def test_incompatible_config_is_refused_unless_fresh(tmp_path, nproc):
    d = serve(tmp_path, DURABLE, nproc).start()
    with RawClient(d.endpoint_of("s")) as c:
        c.ask({"type": "tokens", "stream": "s", "offset": 0, "tokens": list(range(50))})
    assert d.stop() == 0
    other = serve(tmp_path, [*DURABLE, "model.hidden_size=24"], nproc)
    other.start(wait=False)
    assert other.wait_exit(timeout=60) == 2
    assert "model.hidden_size (saved 16, now 24). To continue it, use its settings " \
        "(`--set model.hidden_size=16`" in other.log()
    other.start(args=("--fresh",))
    assert ask(other, {"type": "position", "stream": "s"})["next_offset"] == 0
    assert list(tmp_path.glob("streamrnn-state/previous-*/checkpoints/checkpoint-*.json"))
    assert other.stop() == 0


SMALL_LOG = [*DURABLE, "wal.segment_bytes=2000", "checkpoint.keep=2"]


def test_log_with_a_hole_is_refused_not_replayed(tmp_path, nproc):
    """All checkpoints unreadable and the early log already deleted: replaying what is
    left would silently drop acknowledged input, so the daemon refuses to start."""
    d = serve(tmp_path, SMALL_LOG, nproc).start()
    sent = 0
    for i in range(4):
        send_all(d, "s", text(600, seed=i), offset=sent)
        sent += 600
        wait_trained(d)
        assert ask(d, {"type": "checkpoint"})["ok"]
    d.kill()
    log = d.state / "logs" / f"rank-{d.rank_of('s')}-of-{nproc}"
    segments = sorted(log.glob("wal-*.log"))
    assert segments[0].name != "wal-0000000000000001.log"  # covered ones were removed
    for path in (d.state / "checkpoints").glob("replicated-*.pt"):
        path.write_bytes(b"torn")
    d.start(wait=False)
    assert d.wait_exit(timeout=60) == 2
    assert "continues at record" in d.log() and "no checkpoint could be loaded" in d.log()
    d.start(args=("--fresh",))  # the way out is explicit, and keeps the old files
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 0
    assert list(d.state.glob(f"previous-*/logs/{log.name}/wal-*.log"))
    assert d.stop() == 0


def test_damage_inside_an_older_log_segment_is_refused(tmp_path, nproc):
    d = serve(tmp_path, ["train.flush_after_seconds=0", "checkpoint.interval_seconds=0",
                         "wal.segment_bytes=2000"], nproc).start()
    send_all(d, "s", text(3000), max_tokens_per_message=100)
    d.kill()  # no checkpoint: everything is in the log
    log = f"streamrnn-state/logs/rank-{d.rank_of('s')}-of-{nproc}"
    first = sorted((tmp_path / log).glob("wal-*.log"))[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    d.start(wait=False)
    assert d.wait_exit(timeout=60) == 2
    assert f"log segment {log}/{first.name} is damaged at byte" in d.log()


def test_a_crash_before_any_input_then_a_crash_after_some_loses_nothing(tmp_path, nproc):
    """The first run is killed before any input or checkpoint: its logs hold only start
    records. The next start must go on with them, not set them aside as another
    layout's: it would move its own live log away, and lose what it then acknowledged."""
    d = serve(tmp_path, ["checkpoint.interval_seconds=0"], nproc).start()
    d.kill()
    d.start()
    send_all(d, "s", text(400))
    d.kill()
    d.start()
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 400
    assert not list(d.state.glob("previous-*")), "a start set its own log aside"
    assert d.stop() == 0


def test_log_of_another_model_is_refused_without_a_checkpoint(tmp_path, nproc):
    d = serve(tmp_path, ["train.flush_after_seconds=0", "checkpoint.interval_seconds=0"],
              nproc).start()
    with RawClient(d.endpoint_of("s")) as c:
        c.ask({"type": "tokens", "stream": "s", "offset": 0, "tokens": list(range(50))})
    d.kill()
    other = serve(tmp_path, ["checkpoint.interval_seconds=0", "model.hidden_size=24"], nproc)
    other.start(wait=False)
    assert other.wait_exit(timeout=60) == 2
    assert "was written with a different config: model.hidden_size (saved 16, now 24)" \
        in other.log()


def test_replay_uses_the_batch_width_the_log_was_written_with(tmp_path, nproc):
    """train.max_batch_streams and the learning settings may change between runs: the
    logged updates replay with the width, rate and betas they ran with, not the new
    ones; the change is logged."""
    narrow = ["train.flush_after_seconds=0", "checkpoint.interval_seconds=0",
              "train.max_batch_streams=1", "train.lr=0.02", "train.adam_beta1=0.5"]
    d = serve(tmp_path, narrow, nproc).start()
    for half in range(2):  # a checkpoint between: the log after it ran narrow too
        with Producer(d.endpoint) as p:
            for i in range(6):
                p.send(f"s{i}", text(200, seed=i)[half * 100:(half + 1) * 100],
                       offset=half * 100)
            p.flush(timeout=60)
        before = wait_trained(d, at_most=6 * ((100 * half + 99) % 16))
        if half == 0:
            assert ask(d, {"type": "checkpoint"})["ok"]
    d.kill()
    wide = serve(tmp_path, [*narrow[:2], "train.max_batch_streams=256", "train.lr=0.001",
                            "train.adam_beta1=0.9"], nproc)
    wide.start()
    after = status(wide)
    for key in ("updates", "tokens_trained", "bits", "tokens_received"):
        assert after[key] == before[key], key
    assert "train.lr 0.02 -> 0.001, train.adam_beta1 0.5 -> 0.9" in wide.log()
    assert wide.stop() == 0


def test_switching_the_log_off_keeps_what_the_old_log_holds(tmp_path, nproc):
    d = serve(tmp_path, ["train.flush_after_seconds=0", "checkpoint.interval_seconds=0"],
              nproc).start()
    with RawClient(d.endpoint_of("s")) as c:
        c.ask({"type": "tokens", "stream": "s", "offset": 0, "tokens": list(range(40))})
    d.kill()  # acked: only the log has it
    off = serve(tmp_path, ["checkpoint.interval_seconds=0", "wal.mode=off"], nproc).start()
    assert ask(off, {"type": "position", "stream": "s"})["next_offset"] == 40
    with RawClient(off.endpoint_of("t")) as c:  # and no rank logs anything now
        c.ask({"type": "tokens", "stream": "t", "offset": 0, "tokens": list(range(40))})
    assert not list((tmp_path / "streamrnn-state/logs").glob("*/wal-*.log"))  # folded in
    assert off.stop() == 0
    d.start()  # back to the log: nothing stale replays onto the newer checkpoint
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 40
    assert ask(d, {"type": "position", "stream": "t"})["next_offset"] == 40
    assert d.stop() == 0


# ---- full disks, failed writes -------------------------------------------------------------
def test_failed_checkpoint_write_keeps_serving(tmp_path, nproc):
    # only the requested checkpoint: a periodic one in flight would leave its .tmp there
    d = serve(tmp_path, [*DURABLE, "checkpoint.interval_updates=0"], nproc)
    d.start(env={"STREAMRNN_FAIL_AT": d.cue("checkpoint_write:1")})
    send_all(d, "s", text(2000))
    reply = ask(d, {"type": "checkpoint"})
    assert reply == {"type": "checkpoint", "ok": False,
                     "error": "the write failed; see the daemon's log", "id": reply["id"]}
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 2000
    assert float(metric(scrape(d), "streamrnn_checkpoint_failures_total")) >= 1
    assert not list((d.state / "checkpoints").glob("*"))  # no debris, on any rank
    d.kill()
    d.start()  # the log has it all
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 2000
    assert d.stop() == 0


def test_full_log_disk_answers_busy_and_acks_nothing(tmp_path, nproc):
    # records: resume (1), config (2), tokens (3), then the first update's (4) fails
    d = serve(tmp_path, DURABLE, nproc)
    d.start(env={"STREAMRNN_FAIL_AT": d.cue("wal_write:4", "s")})
    with RawClient(d.endpoint_of("s")) as c:
        # 19 targets: one update (k1 = 16)
        ok = c.ask({"type": "tokens", "stream": "s", "offset": 0, "tokens": list(range(20))})
        assert ok["type"] == "ack"
        busy = c.ask({"type": "tokens", "stream": "s", "offset": 20, "tokens": [1, 2, 3]})
        assert busy["type"] == "busy"
        assert c.ask({"type": "position", "stream": "s"})["next_offset"] == 20
    assert float(metric(scrape(d, d.rank_of("s")), "streamrnn_wal_write_failures_total")) >= 1
    d.kill()
    d.start()
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 20
    assert d.stop() == 0


def test_full_disk_when_the_log_starts_a_new_file_answers_busy(tmp_path, nproc):
    # the start records each start writes first take about 1 kB
    d = serve(tmp_path, [*DURABLE, "wal.segment_bytes=2000"], nproc)
    d.start(env={"STREAMRNN_FAIL_AT": d.cue("wal_rotate:1", "s")})
    acked = 0
    with RawClient(d.endpoint_of("s")) as c:
        for _ in range(40):
            reply = c.ask({"type": "tokens", "stream": "s", "offset": acked,
                           "tokens": list(range(50))})
            if reply["type"] != "ack":
                break
            acked += 50
        assert reply["type"] == "busy" and 0 < acked < 2000
        assert c.ask({"type": "position", "stream": "s"})["next_offset"] == acked
    assert d.proc.poll() is None
    assert float(metric(scrape(d, d.rank_of("s")), "streamrnn_wal_write_failures_total")) >= 1
    d.kill()
    d.start()
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == acked
    assert d.stop() == 0


def test_a_failed_fsync_acknowledges_nothing_and_ends_the_daemon(tmp_path, nproc):
    """After a failed fsync a later one may report success for data that never reached
    the disk: nothing more may be acked, so the daemon ends (systemd restarts it)."""
    d = serve(tmp_path, DURABLE, nproc)
    # the 1st: the start records'
    d.start(env={"STREAMRNN_FAIL_AT": d.cue("wal_fsync:2", "s")})
    with RawClient(d.endpoint_of("s")) as c:
        with pytest.raises(TimeoutError):
            c.ask({"type": "tokens", "stream": "s", "offset": 0, "tokens": [1, 2, 3]},
                  timeout=5)
    assert d.wait_exit(timeout=60) == 1
    assert "fsync of the write-ahead log" in d.log()


# ---- requests ------------------------------------------------------------------------------
def test_checkpoint_commands(tmp_path, nproc):
    d = serve(tmp_path, DURABLE, nproc).start()
    send_all(d, "s", text(1500))
    totals = wait_trained(d)  # nothing changes from here on
    cli = [sys.executable, "-m", "streamrnn", "checkpoint"]
    saved = subprocess.run([*cli, "save", "--endpoint", d.endpoint], capture_output=True,
                           text=True, timeout=120)
    assert saved.returncode == 0 and saved.stdout.startswith("saved "), saved.stderr
    listing = subprocess.run([*cli, "list", "--json"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    rows = __import__("json").loads(listing.stdout)
    assert listing.returncode == 0 and rows and rows[0]["next_start"]
    newest = rows[0]
    for key in ("tokens_trained", "updates", "bits"):
        assert newest[key] == totals[key]
    assert newest["ranks"] == nproc
    assert Path(saved.stdout.split()[1]) == (tmp_path / newest["path"]).absolute()
    inspect = subprocess.run([*cli, "inspect", newest["path"]], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0 and "TBPTT(16, 24)" in inspect.stdout
    bad = tmp_path / "not-a-checkpoint.pt"
    bad.write_bytes(b"garbage")
    refused = subprocess.run([*cli, "inspect", str(bad)], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 1 and "UNREADABLE" in refused.stdout
    assert d.stop() == 0


def test_second_daemon_on_the_same_state_folder_is_refused(tmp_path, nproc):
    d = serve(tmp_path, DURABLE, nproc).start()
    writing = d.state / "checkpoints" / "checkpoint-00000007.json.tmp"
    writing.parent.mkdir(exist_ok=True)
    writing.write_bytes(b"the first daemon's checkpoint in progress")
    for other in (serve(tmp_path, DURABLE, 1), serve(tmp_path, DURABLE, 2)):
        other.start(wait=False)  # same folder (cwd), other ports
        assert other.wait_exit(timeout=60) == 2
        holder = int(other.log().split("is in use by streamrnn serve, pid ")[1].split()[0]
                     .rstrip(":"))
        assert holder in ([d.proc.pid] if nproc == 1 else d.rank_pids())
    assert writing.exists()  # refused before touching anything in the folder
    assert status(d)["updates"] == 0  # the first one is unharmed
    assert d.stop() == 0


def test_a_failing_request_is_answered_and_the_daemon_goes_on(tmp_path, nproc):
    d = serve(tmp_path, DURABLE, nproc)
    d.start(env={"STREAMRNN_FAIL_AT": d.cue("request_predict:1", "s")})
    with RawClient(d.endpoint_of("s")) as c:
        reply = c.ask({"type": "predict", "stream": "s"})
        assert reply["type"] == "nack" and reply["reason"] == "internal"
        assert "No space left on device" in reply["message"]
        assert c.ask({"type": "status"})["type"] == "status"
    assert 'streamrnn_messages_rejected_total{reason="internal"} 1.0' in \
        scrape(d, d.rank_of("s"))
    assert d.stop() == 0


def test_repeated_checkpoint_requests_write_once(tmp_path, nproc):
    d = serve(tmp_path, DURABLE, nproc).start()
    send_all(d, "s", text(500))
    wait_trained(d)
    first = ask(d, {"type": "checkpoint"})
    writes = count(d, "checkpoint saved")
    again = [ask(d, {"type": "checkpoint"}) for _ in range(3)]
    assert all(r["path"] == first["path"] for r in again)
    assert count(d, "checkpoint saved") == writes
    assert d.stop() == 0


def test_an_ended_stream_is_forgotten_and_its_id_starts_again(tmp_path, nproc):
    d = serve(tmp_path, ["checkpoint.interval_seconds=0"], nproc).start()
    with RawClient(d.endpoint_of("s")) as c:
        assert c.ask({"type": "tokens", "stream": "s", "offset": 0,
                      "tokens": list(range(30))})["type"] == "ack"
        ended = c.ask({"type": "end", "stream": "s"})
        assert ended["type"] == "ended" and ended["known"] and ended["next_offset"] == 30
        deadline = time.monotonic() + 30
        while (position := c.ask({"type": "position", "stream": "s"}))["next_offset"]:
            refused = c.ask({"type": "tokens", "stream": "s", "offset": 30, "tokens": [1]})
            assert refused["type"] == "nack" and refused["reason"] == "ended"
            assert time.monotonic() < deadline, "never forgotten"
            time.sleep(0.1)
        assert position["next_offset"] == 0
        assert c.ask({"type": "tokens", "stream": "s", "offset": 0,
                      "tokens": [5, 6, 7]})["type"] == "ack"
    assert ask(d, {"type": "end", "stream": "nobody"})["known"] is False
    assert "streamrnn_streams_forgotten_total 1.0" in scrape(d, d.rank_of("s"))
    totals = status(d)
    assert totals["streams"] == 1 and totals["tokens_received"] == 33
    d.kill()
    d.start()  # the log replays the end, the forgetting and the new start alike
    assert ask(d, {"type": "position", "stream": "s"})["next_offset"] == 3
    assert status(d)["streams"] == 1
    assert d.stop() == 0

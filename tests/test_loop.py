"""The daemon's loop in this process, on a clock the test moves: real sockets and files,
exact timing (idle flushes, forgetting, checkpoint retries) without sleeping."""
from __future__ import annotations

import threading
import time

import prometheus_client
import pytest
import torch

from inprocess import arrive, ask, ask_until_answered
from streamrnn.serve import checkpointer
from streamrnn.serve.handlers import MAX_RETRY_MS


def tokens(stream, offset, values):
    return {"type": "tokens", "stream": stream, "offset": offset, "tokens": list(values)}


def test_idle_streams_are_flushed_after_exactly_flush_after_seconds(make_daemon):
    d, clock, c = make_daemon()
    ask(d, c, tokens("idle", 0, range(10)))   # 9 targets: 8 trained, 1 waits
    assert d.learner.tokens_trained == 8
    clock.now += 29.9
    d.housekeeping(clock.now)
    d.turn()
    assert d.learner.tokens_trained == 8
    clock.now += 0.1
    d.housekeeping(clock.now)  # the flush is logged; the next turn's update trains it
    assert d.learner.tokens_trained == 8
    d.turn()
    assert d.learner.tokens_trained == 9 and d.learner.num_untrained == 0
    flush = ask(d, c, {"type": "flush", "stream": "idle"})
    assert flush["scheduled"] == 0  # nothing left


def test_a_flush_request_trains_in_the_next_turn(make_daemon):
    d, clock, c = make_daemon()
    ask(d, c, tokens("asked", 0, range(7)))   # 6 targets: 4 trained, 2 wait
    c.send({"type": "flush", "stream": "asked"})
    d.turn()  # takes the request, then trains: no time passed, no housekeeping needed
    assert c.receive(timeout=5)["scheduled"] == 1
    assert d.learner.tokens_trained == 6


def test_silent_streams_are_forgotten_after_exactly_forget_after_seconds(make_daemon):
    d, clock, c = make_daemon("train.flush_after_seconds=1", "train.forget_after_seconds=5")
    ask(d, c, tokens("quiet", 0, range(9)))
    ask(d, c, tokens("chatty", 0, range(9)))
    for i in range(6):  # chatty keeps talking once a second, quiet does not
        clock.now += 1.0
        ask(d, c, tokens("chatty", 9 + i, [i]))
        d.housekeeping(clock.now)
        d.housekeeping(clock.now)  # the end's flush, which forgets
        quiet = ask(d, c, {"type": "position", "stream": "quiet"})["next_offset"]
        assert quiet == (9 if i < 4 else 0), i  # silent for 5 s after the 5th second
    assert ask(d, c, {"type": "position", "stream": "chatty"})["next_offset"] == 15
    assert d.learner.tokens_trained == 8 + 12  # quiet's 8; chatty's 3 windows of 4 (2 wait)


def test_busy_hint_follows_the_training_rate(make_daemon):
    d, clock, c = make_daemon("ingest.max_queued_tokens=100",
                              "ingest.max_tokens_per_message=100",
                              "train.k1=100", "train.k2=100",  # nothing trains
                              "ingest.busy_retry_ms=20")
    handlers = d.handlers
    # nothing trained yet: no rate to go by, a second
    assert ask(d, c, tokens("a", 0, range(30)))["type"] == "ack"   # 29 targets wait
    busy = ask(d, c, tokens("b", 0, range(80)))
    assert busy == {"type": "busy", "stream": "b", "retry_after_ms": 1000}
    # 1,000 targets trained in 0.5 s of training (over any wall time): 2,000/s
    from streamrnn.core.learner import LearnResult
    handlers.rate.add(clock.now, LearnResult(targets=1000), 0.5)
    ask(d, c, tokens("a", 30, range(60)))  # 89 queued; 3/4 of the limit is 75
    expected = int(1000 * (89 - 75) / 2000)  # 7 ms, below busy_retry_ms
    assert handlers.retry_after_ms() == max(20, expected) == 20
    handlers.rate.add(clock.now, LearnResult(targets=10), 10.0)  # now 1,010 in 10.5 s
    assert handlers.retry_after_ms() == int(1000 * 14 * 10.5 / 1010)
    handlers.rate.add(clock.now, LearnResult(targets=1), 1000.0)
    assert handlers.retry_after_ms() == MAX_RETRY_MS


def test_an_update_the_log_cannot_take_does_not_run(make_daemon):
    # records: resume (1), config (2), tokens (3), train (4): the first update's fails
    d, clock, c = make_daemon(env={"STREAMRNN_FAIL_AT": "wal_write:4"})
    reply = ask(d, c, tokens("s", 0, range(9)))
    assert reply["type"] == "ack"
    assert d.learner.updates == 0 and d.learner.num_untrained == 8
    assert ask(d, c, tokens("s", 9, [1]))["type"] == "busy"  # and input waits


def test_a_checkpoint_request_does_not_stop_the_loop(make_daemon, monkeypatch):
    d, clock, c = make_daemon()
    ask(d, c, tokens("s", 0, range(9)))
    release = threading.Event()
    write = checkpointer.write_atomically

    def slow_write(path, state):
        release.wait(timeout=20)  # a big model's checkpoint, on the writer thread
        return write(path, state)
    monkeypatch.setattr(checkpointer, "write_atomically", slow_write)
    c.send({"type": "checkpoint", "id": 1})
    started = time.monotonic()
    for _ in range(3):
        d.turn()
    status = ask(d, c, {"type": "status", "id": 2})
    assert status["id"] == 2 and time.monotonic() - started < 10  # answered meanwhile
    assert d.checkpointer.busy
    release.set()
    deadline = time.monotonic() + 20
    while not c.socket.poll(20):
        d.turn()
        assert time.monotonic() < deadline
    reply = c.receive()
    assert reply["id"] == 1 and reply["ok"] and reply["path"].endswith(".json")
    assert ask(d, c, {"type": "checkpoint", "id": 3})["path"] == reply["path"]  # no news


def test_a_failed_checkpoint_is_retried_soon_then_less_often(make_daemon):
    d, clock, c = make_daemon("checkpoint.interval_seconds=300",
                              env={"STREAMRNN_FAIL_AT": "checkpoint_write:1"})
    ask(d, c, tokens("s", 0, range(9)))
    tries = []
    for wait in (300, 5, 10, 20, 40, 80, 160, 300, 300):
        clock.now += wait - 0.01
        d.turn()
        d.checkpointer.close()  # (waits for the writer thread)
        assert d.checkpointer.num_started == len(tries), wait  # not yet
        clock.now += 0.01
        d.turn()
        d.checkpointer.close()
        d.turn()  # collects the failure
        tries.append(d.checkpointer.num_started)
    assert tries == list(range(1, 10))
    failures = prometheus_client.generate_latest(d.metrics.registry).decode()
    assert "streamrnn_checkpoint_failures_total 9.0" in failures


def test_non_finite_updates_are_skipped_counted_and_never_checkpointed(make_daemon):
    d, clock, c = make_daemon(env={"STREAMRNN_NAN_AT": "update:2"})
    before = {}

    def remember():
        before.update({k: v.clone() for k, v in d.learner.model.state_dict().items()})
    ask(d, c, tokens("s", 0, range(5)))  # one update
    remember()
    ask(d, c, tokens("s", 5, range(4)))  # the second: NaN
    assert all(torch.equal(before[k], v) for k, v in d.learner.model.state_dict().items())
    ask(d, c, tokens("s", 9, range(4)))  # the third trains again
    assert d.learner.skipped_updates == 1 and d.learner.tokens_trained == 8
    text = prometheus_client.generate_latest(d.metrics.registry).decode()
    assert "streamrnn_nonfinite_loss_updates_total 1.0" in text
    assert "streamrnn_tokens_trained_total 8.0" in text
    saved = ask_until_answered(d, c, {"type": "checkpoint"})
    assert saved["ok"]
    with torch.no_grad():
        d.learner.model.head.bias[0] = float("nan")  # however it came to be
    ask(d, c, tokens("s", 13, [1]))
    refused = ask_until_answered(d, c, {"type": "checkpoint"})
    assert refused == {"type": "checkpoint", "ok": False,
                       "error": "the write failed; see the daemon's log"}
    assert len(d.statedir.committed()) == 1


def test_a_scrape_never_touches_the_disk(make_daemon, monkeypatch, tmp_path):
    d, clock, c = make_daemon()
    ask(d, c, tokens("s", 0, range(50)))
    import pathlib

    def gone(self, *args, **kwargs):  # the loop deleted it between a glob and a stat
        raise FileNotFoundError(str(self))
    monkeypatch.setattr(pathlib.Path, "stat", gone)
    text = prometheus_client.generate_latest(d.metrics.registry).decode()
    assert "streamrnn_wal_bytes" in text and "streamrnn_ingest_queue_tokens" in text


def test_checkpoints_count_up_without_a_log_and_keep_the_newest(make_daemon):
    """wal.mode = off: no log position moves, the checkpoints' numbers still do; the
    newest checkpoint.keep stay, with their files."""
    d, clock, c = make_daemon("wal.mode=off", "checkpoint.keep=3")
    for i in range(5):
        ask(d, c, tokens("s", 9 * i, range(9)))
        assert ask_until_answered(d, c, {"type": "checkpoint"})["number"] == i + 1
    assert [k.number for k in d.statedir.committed()] == [5, 4, 3]
    names = sorted(p.name for p in d.statedir.checkpoints.iterdir())
    assert names == sorted(f"{kind}-{n:08d}{suffix}" for n in (3, 4, 5) for kind, suffix in
                           (("checkpoint", ".json"), ("replicated", ".pt"),
                            ("part", "-0-of-1.pt")))
    assert not list(d.statedir.logs.glob("rank-0-of-1/*"))  # no log at all


def test_tokens_after_an_end_are_refused_until_the_stream_is_forgotten(make_daemon):
    d, clock, c = make_daemon()
    ask(d, c, tokens("s", 0, range(30)))  # 29 targets: 28 trained, 1 waits
    c.send({"type": "end", "stream": "s"})
    c.send(tokens("s", 30, [1]))
    arrive(d, 2)
    d.intake()  # both, before any update: the end's flush has not trained yet
    ended, refused = c.receive(timeout=5), c.receive(timeout=5)
    assert ended == {"type": "ended", "stream": "s", "known": True, "next_offset": 30}
    assert refused["type"] == "nack" and refused["reason"] == "ended"
    d.turn()  # the last target trains; the stream is forgotten
    assert ask(d, c, {"type": "position", "stream": "s"})["next_offset"] == 0
    assert d.learner.tokens_trained == 29


def test_a_flush_trains_at_the_loops_cadence_not_all_at_once(make_daemon):
    """A flush of many streams with a backlog: each turn runs at most
    train.updates_per_turn updates (intake, acks and the tick go on between)."""
    d, clock, c = make_daemon("train.max_batch_streams=2", "train.updates_per_turn=3",
                              "train.flush_after_seconds=0")
    for i in range(10):  # 10 streams, 7 targets each: a window and 3 left
        c.send(tokens(f"s{i}", 0, range(8)))
    c.send({"type": "flush"})
    arrive(d, 11)
    d.intake()
    assert [c.receive(timeout=5)["type"] for _ in range(11)].count("flush") == 1
    updates = []
    while d.learner.num_untrained:
        before = d.learner.updates
        d.turn()
        updates.append(d.learner.updates - before)
    assert max(updates) == 3 and len(updates) >= 4  # 10 windows + 10 rests, 2 a time
    assert d.learner.tokens_trained == 70


def test_the_daemon_gives_back_the_signal_handlers_it_replaced(tmp_path):
    import signal
    from harness import TINY, free_port
    from streamrnn import load_config
    from streamrnn.serve.daemon import Daemon

    def mine(signum, frame):
        pass

    def also_mine(signum, frame):
        pass
    # both replaced here: how SIGINT was set depends on how pytest was started (a job
    # started in the background by a shell ignores it)
    previous = signal.signal(signal.SIGTERM, mine), signal.signal(signal.SIGINT, also_mine)
    try:
        daemon = Daemon(load_config(overrides=[
            *TINY, f"ingest.endpoint=tcp://127.0.0.1:{free_port()}", "metrics.port=0",
            f"checkpoint.dir={tmp_path / 'state'}"]), environ={})
        daemon.stop_requested = True  # stops at its first turn
        assert daemon.run() == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is also_mine
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def test_the_training_rate_keeps_its_sums_as_a_walk_would_find_them():
    """Every tokens message reads the rate: its sums are kept as turns come and expire,
    equal to summing the last 60 s again."""
    import random

    from streamrnn.core.learner import LearnResult
    from streamrnn.serve.handlers import RECENT_SECONDS, Rate

    rng, rate, now, kept = random.Random(3), Rate(), 0.0, []
    for _ in range(5000):
        # mostly turns that expire one by one; now and then a pause that expires all
        now += rng.choices([0.001, 0.05, 0.3, 2.0, 70.0], [30, 30, 30, 9, 0.2])[0]
        entry = (now, rng.randrange(0, 500), rng.uniform(0, 4000), rng.uniform(0, 0.2))
        rate.add(now, LearnResult(targets=entry[1], bits=entry[2]), entry[3])
        kept = [k for k in kept + [entry] if k[0] >= now - RECENT_SECONDS]
        targets, bits, seconds = rate.totals()
        assert targets == sum(k[1] for k in kept)
        assert bits == pytest.approx(sum(k[2] for k in kept), rel=1e-9, abs=1e-6)
        assert seconds == pytest.approx(sum(k[3] for k in kept), rel=1e-9, abs=1e-9)


def test_status_computes_the_weights_checksum_once_per_update(make_daemon, monkeypatch):
    from streamrnn.core.collective import weights_checksum
    from streamrnn.serve import handlers
    computed = []
    monkeypatch.setattr(handlers, "weights_checksum",
                        lambda params: computed.append(1) or weights_checksum(params))
    d, clock, c = make_daemon()
    first = [ask(d, c, {"type": "status"})["weights_checksum"] for _ in range(3)]
    assert len(set(first)) == 1 and len(computed) == 1
    ask(d, c, tokens("s", 0, range(9)))  # two updates change the weights
    after = ask(d, c, {"type": "status"})["weights_checksum"]
    assert len(computed) == 2 and after != first[0]
    assert after == weights_checksum(list(d.learner.model.parameters()))

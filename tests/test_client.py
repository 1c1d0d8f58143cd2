"""The producer client against real daemons: it waits for them, rides out restarts."""
from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from harness import DaemonProcess, free_port
from streamrnn.keys import generate
from streamrnn.client import Producer, ProducerError, Refused, Unreachable
from streamrnn.wire import encode_tokens


def test_producer_waits_for_a_daemon_that_starts_late(tmp_path):
    port = free_port()
    d = DaemonProcess(tmp_path, [], port=port)
    done = threading.Event()
    errors = []
    attempts: list[bool] = []  # each send the producer tried, and whether it went out

    def produce():
        try:
            with Producer(d.endpoint, retry_seconds=60) as producer:
                real_send = producer._send

                def counting_send(message, rank):
                    sent = real_send(message, rank)
                    attempts.append(sent)
                    return sent

                producer._send = counting_send
                producer.send("late", np.arange(500) % 256)
                producer.flush(timeout=60)
        except Exception as e:
            errors.append(e)
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    time.sleep(1.5)
    # still trying: it asked again and again, and nothing went out (nobody listens yet)
    assert thread.is_alive() and not done.is_set() and not errors, errors
    tried = list(attempts)
    assert len(tried) >= 3 and not any(tried), tried
    d.start()
    try:
        thread.join(timeout=90)
        assert done.is_set() and not errors, errors
        assert any(attempts[len(tried):])  # once the daemon is up, its sends go out
        with Producer(d.endpoint) as p:
            assert p.position("late") == 500
    finally:
        assert d.stop() == 0


def test_producer_rides_out_a_restart(tmp_path):
    d = DaemonProcess(tmp_path, []).start()
    with Producer(d.endpoint, retry_seconds=60, reply_timeout=0.5) as producer:
        producer.send("before", np.arange(300) % 256)
        producer.flush(timeout=30)
        assert d.stop() == 0
        errors = []

        def produce():
            try:  # a new stream while the daemon is down: blocks, resends, then gets in
                producer.send("during", np.arange(700) % 256, offset=0)
                producer.flush(timeout=60)
            except Exception as e:
                errors.append(e)

        thread = threading.Thread(target=produce)
        thread.start()
        time.sleep(1.0)
        d.start()
        thread.join(timeout=90)
        assert not thread.is_alive() and not errors, errors
        assert producer.position("during") == 700
        assert producer.stats.resends > 0
    assert d.stop() == 0


def test_gives_up_with_a_clear_error(tmp_path):
    with Producer(f"tcp://127.0.0.1:{free_port()}", retry_seconds=1) as producer:
        with pytest.raises(Unreachable, match="is `streamrnn serve` running"):
            producer.send("x", [1, 2, 3])


def test_refusals_surface_as_errors(tmp_path):
    d = DaemonProcess(tmp_path, ["model.vocab_size=10"]).start()
    try:
        with Producer(d.endpoint) as producer:
            producer.send("ok", [1, 2, 3])
            producer.send("bad", [1, 20])
            with pytest.raises(ProducerError, match="token_out_of_range"):
                producer.flush(timeout=30)
            assert producer.position("ok") == 3 and producer.position("bad") == 0
    finally:
        assert d.stop() == 0


def test_a_refusal_is_not_hidden_by_the_gaps_that_follow_it(tmp_path):
    # the first of three messages to "bad" is refused: the daemon's end of the stream
    # stays at 0, so the next two come back as gaps; the refusal must still be the error
    d = DaemonProcess(tmp_path, ["model.vocab_size=10"]).start()
    try:
        with Producer(d.endpoint, max_tokens_per_message=2) as producer:
            producer.send("ok", [1, 2, 3])
            producer.send("bad", [1, 20, 3, 4, 5, 6])  # [1, 20] [3, 4] [5, 6]
            with pytest.raises(Refused) as info:
                producer.flush(timeout=30)
            assert info.value.reason == "token_out_of_range" and info.value.stream == "bad"
            assert producer.unacked == 0  # nothing of the refused stream lingers
            producer.flush(timeout=30)    # and no second error is waiting
            assert producer.position("ok") == 3 and producer.position("bad") == 0
            producer.send("bad", [7, 8, 9])  # the stream starts over at the daemon's end
            producer.flush(timeout=30)
            assert producer.position("bad") == 3
    finally:
        assert d.stop() == 0


INVALID_TOKENS = [
    ([-1, 5], "token -1 is negative"),                      # was sent as 65535
    ([1.9, 5], "tokens must be integers, got float64"),     # was truncated to 1
    ([2**32 + 7], "token 4294967303 does not fit the wire's 32 bits"),  # was 7
    ([2**64], "does not fit the wire's 32 bits"),
    ([True, False], "tokens must be integers, got bool"),
    (np.array([[1, 2]]), "tokens must be a flat sequence"),
]


def test_invalid_tokens_raise_before_anything_is_sent(tmp_path):
    d = DaemonProcess(tmp_path, ["model.vocab_size=65536"]).start()
    try:
        with Producer(d.endpoint) as producer:
            producer.send("s", [1, 2])
            for tokens, message in INVALID_TOKENS:
                with pytest.raises(ValueError, match=re.escape(message)):
                    producer.send("s", tokens)
            producer.flush(timeout=30)
            assert producer.position("s") == 2  # nothing of the bad calls went out
            producer.send("s", [3])             # and the producer carries on
            producer.flush(timeout=30)
            assert producer.position("s") == 3
    finally:
        assert d.stop() == 0


def test_encode_tokens_checks_the_width():
    with pytest.raises(ValueError, match="token 70000 does not fit width 2"):
        encode_tokens("s", 0, [1, 70000], width=2)
    assert encode_tokens("s", 0, [1, 70000])  # width 4 chosen by itself
    assert encode_tokens("s", 0, [])          # an empty message is fine


def test_no_answer_names_both_causes_and_the_flags(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Producer(endpoint, retry_seconds=1) as producer:
        with pytest.raises(Unreachable) as info:
            producer.status()
    assert "is `streamrnn serve` running there? Or it requires CURVE keys (--server-key, " \
        "--client-key)" in str(info.value)
    public, secret = generate(str(tmp_path), "me")
    with Producer(endpoint, retry_seconds=1, server_key=str(public),
                  client_key=str(secret)) as producer:
        with pytest.raises(Unreachable, match="in its ingest.curve_allowed_keys folder"):
            producer.status()
    with pytest.raises(ProducerError, match="only --client-key was given"):
        Producer(endpoint, client_key=str(secret))


def test_a_bad_endpoint_is_a_clear_error():
    with pytest.raises(ProducerError, match="cannot connect to 'foo': invalid argument; "
                       "expected tcp://HOST:PORT"):
        Producer("foo")


# ---- a daemon that stops answering (SIGSTOP) ---------------------------------------------
def _frozen_feed(tmp_path, d, freeze_seconds: float | None, retry_seconds: float = 8):
    """`streamrnn feed --retry-seconds R` of 4 files of 10 kB (a stream each); the
    daemon is frozen (SIGSTOP) once some of it is acknowledged, for `freeze_seconds`
    (None: until the feed gives up). Returns (the feed's exit status, its output,
    seconds from the freeze to its end, the bytes of each file)."""
    import signal
    import subprocess
    import sys
    data = (b"the quick brown fox jumps over the lazy dog. " * 250)[:10_000]
    names = [f"f{i}.txt" for i in range(4)]
    for name in names:
        (tmp_path / name).write_bytes(data)
    feed = subprocess.Popen([sys.executable, "-m", "streamrnn", "feed", "--endpoint",
                             d.endpoint, "--retry-seconds", str(retry_seconds), "--no-flush",
                             "--chunk", "1024", *names], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with Producer(d.endpoint) as p:
        deadline = time.monotonic() + 60
        while p.status()["tokens_received"] < 10_000:  # a quarter of it
            assert time.monotonic() < deadline and feed.poll() is None, feed.poll()
            time.sleep(0.05)
    d.proc.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        if freeze_seconds is not None:
            time.sleep(freeze_seconds)
            d.proc.send_signal(signal.SIGCONT)
        output = feed.communicate(timeout=300)[0]
        return feed.returncode, output, time.monotonic() - frozen, {n: len(data) for n in names}
    finally:
        d.proc.send_signal(signal.SIGCONT)


# a short queue: the feed goes at the pace of training, so it is still sending when frozen
PACED = ["train.flush_after_seconds=0", "ingest.max_queued_tokens=8000",
         "ingest.max_tokens_per_message=1024"]


@pytest.mark.slow
def test_a_frozen_daemon_makes_feed_give_up_within_retry_seconds(tmp_path):
    d = DaemonProcess(tmp_path, PACED).start()
    code, output, seconds, _ = _frozen_feed(tmp_path, d, None)
    assert code == 1, output
    assert f"no progress from {d.endpoint} for 8 s" in output, output
    # frozen, not overloaded: busy answers before the freeze do not count
    assert "is `streamrnn serve` running there?" in output, output
    assert seconds < 8 + 2.0 + 2.0  # retry_seconds, a reply timeout, and some slack
    assert d.stop() == 0


@pytest.mark.slow
def test_a_daemon_back_within_retry_seconds_gets_the_rest_exactly_once(tmp_path):
    d = DaemonProcess(tmp_path, PACED).start()
    code, output, _, sizes = _frozen_feed(tmp_path, d, 3.0, retry_seconds=20)
    assert code == 0, output
    with Producer(d.endpoint) as p:
        assert {name: p.position(name) for name in sizes} == sizes
        p.request({"type": "flush"})
        deadline = time.monotonic() + 300
        while (status := p.status())["queued_tokens"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
    assert status["tokens_received"] == sum(sizes.values())
    assert status["tokens_trained"] == sum(sizes.values()) - len(sizes)
    assert d.stop() == 0


def test_producer_send_and_flush_raise_unreachable_within_retry_seconds(tmp_path):
    import signal
    d = DaemonProcess(tmp_path, []).start()
    with Producer(d.endpoint, retry_seconds=2, reply_timeout=0.5, window=4) as p:
        p.send("s", np.arange(100) % 256)
        p.flush(timeout=30)
        d.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(Unreachable, match="no progress"):
                for i in range(100):  # the window fills, then waits, then gives up
                    p.send("s", np.arange(100) % 256)
            assert time.monotonic() - started < 2 + 0.5 + 1.0
            started = time.monotonic()
            with pytest.raises(Unreachable):
                p.flush(timeout=30)  # the next silence as long: raised again
            assert time.monotonic() - started < 2 + 0.5 + 1.0
        finally:
            d.proc.send_signal(signal.SIGCONT)
        p.flush(timeout=30)  # back: what was in the window goes through
        assert p.position("s") == 100 * (1 + 4)
    assert d.stop() == 0


@pytest.mark.slow
def test_a_feed_under_backpressure_is_answered_busy_never_refused(tmp_path):
    """The messages a producer had on their way after one answered busy are busy too:
    the rejection counter (and its alert) and the refusal log stay for real faults."""
    import subprocess
    import sys
    import urllib.request
    d = DaemonProcess(tmp_path, PACED).start()
    names = [f"f{i}.txt" for i in range(4)]
    for name in names:
        (tmp_path / name).write_bytes(b"backpressure is no fault. " * 400)
    feed = subprocess.run([sys.executable, "-m", "streamrnn", "feed", "--endpoint",
                           d.endpoint, "--chunk", "1024", *names], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert feed.returncode == 0, feed.stderr
    with urllib.request.urlopen(d.metrics_url, timeout=10) as r:
        metrics = r.read().decode()
    busy = next(line for line in metrics.splitlines()
                if line.startswith("streamrnn_busy_replies_total "))
    assert float(busy.split()[-1]) > 0  # there was backpressure
    refused = [line for line in metrics.splitlines()
               if line.startswith("streamrnn_messages_rejected_total{")]
    assert refused and all(line.endswith(" 0.0") for line in refused), refused
    assert d.stop() == 0
    assert "refused input" not in d.log()


def test_feed_names_its_endpoint_at_once_and_gives_up_clearly(tmp_path):
    """Against an endpoint where nothing listens: whom it feeds is said before the
    wait, and the wait ends in a clear error within retry_seconds."""
    import subprocess
    import sys
    from harness import free_port
    (tmp_path / "a.txt").write_bytes(b"hello")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    feed = subprocess.run([sys.executable, "-m", "streamrnn", "feed", "--endpoint", endpoint,
                           "--retry-seconds", "2", "a.txt"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert feed.returncode == 1
    lines = feed.stderr.splitlines()
    assert lines[0] == f"streamrnn feed: feeding 1 stream(s) to {endpoint}", feed.stderr
    assert endpoint in lines[-1] and lines[-1].startswith("streamrnn feed: "), feed.stderr
    assert time.monotonic() - started < 2 + 10  # its reply timeout and a python start


def test_end_asks_again_while_the_daemon_answers_busy(tmp_path):
    """The daemon cannot log the end (its 4th log write fails once: resume, config,
    tokens, end): it answers busy, and end() asks again instead of taking busy for done."""
    d = DaemonProcess(tmp_path, ["train.flush_after_seconds=0"]).start(
        env={"STREAMRNN_FAIL_AT": "wal_write:4-4"})
    with Producer(d.endpoint, retry_seconds=30) as p:
        p.send("s", [1, 2, 3])  # two targets: under k1, no update logged
        p.flush(timeout=30)
        reply = p.end("s")
        assert reply["type"] == "ended" and reply["known"], reply
    import urllib.request
    with urllib.request.urlopen(d.metrics_url, timeout=10) as r:
        failures = next(line for line in r.read().decode().splitlines()
                        if line.startswith("streamrnn_wal_write_failures_total "))
    assert float(failures.split()[-1]) == 1  # the busy answer was asked again
    assert d.stop() == 0


def test_predict_and_generate_from_python(tmp_path):
    """The README's example: the most likely next bytes, and a continuation as text."""
    d = DaemonProcess(tmp_path, []).start()
    try:
        with Producer(d.endpoint) as producer:
            producer.send("log", b"GET /index.html 200\n" * 20)
            producer.flush()
            producer.request({"type": "flush"})  # trained to the end: the model stays
            deadline = time.monotonic() + 60
            while producer.status()["queued_tokens"]:
                assert time.monotonic() < deadline, "never trained"
                time.sleep(0.1)
            top = producer.predict("log", top_k=5)
            assert len(top) == 5 and all(0 <= t < 256 for t, _ in top)
            assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
            text = bytes(producer.generate("log", 64, temperature=0.5, seed=1))
            assert len(text) == 64
            assert producer.generate("log", 64, temperature=0.5, seed=1) == list(text)
            assert producer.generate("log", 64, temperature=0.5, seed=2) != list(text)
            assert producer.predict("nobody", top_k=2) == [(0, 1 / 256), (1, 1 / 256)]
            producer.send("big", bytes(17000))
            producer.flush()
            with pytest.raises(Refused) as refused:
                producer.generate("big")
            assert refused.value.reason == "backlogged"
    finally:
        d.stop()

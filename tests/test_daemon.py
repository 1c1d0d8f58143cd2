"""The daemon over real ZeroMQ sockets on loopback: protocol, limits, metrics, lifecycle."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import msgpack
import numpy as np
import pytest
import zmq

from harness import DaemonProcess, RawClient
from streamrnn.client import Producer
from tools import promtool

LIMITS = ["ingest.max_message_bytes=4096", "ingest.max_tokens_per_message=100",
          "ingest.max_stream_id_bytes=16", "ingest.max_streams=3",
          "ingest.max_queued_tokens=200"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("daemon"), LIMITS).start()
    yield d
    assert d.stop() == 0


@pytest.fixture
def client(daemon):
    with RawClient(daemon.endpoint) as c:
        yield c


def tokens(stream, offset, values, **extra):
    data = np.asarray(values, "<u2").tobytes()
    return {"type": "tokens", "stream": stream, "offset": offset, "tokens": data, "width": 2,
            **extra}


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def status(client):
    return client.ask({"type": "status"})


def scrape(daemon) -> str:
    with urllib.request.urlopen(daemon.metrics_url, timeout=10) as response:
        return response.read().decode()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_ack_duplicates_gaps_and_position(client):
    reply = client.ask(tokens("ack-test", 0, range(10), id=7))
    assert reply == {"type": "ack", "id": 7, "stream": "ack-test", "next_offset": 10,
                     "accepted": 10, "duplicates": 0}
    again = client.ask(tokens("ack-test", 0, range(10)))
    assert (again["next_offset"], again["accepted"], again["duplicates"]) == (10, 0, 10)
    overlap = client.ask(tokens("ack-test", 5, range(10)))
    assert (overlap["next_offset"], overlap["accepted"], overlap["duplicates"]) == (15, 5, 5)
    gap = client.ask(tokens("ack-test", 20, range(3), id="g"))
    assert gap["type"] == "nack" and gap["reason"] == "gap" and gap["next_offset"] == 15
    assert gap["id"] == "g" and "expected offset is 15" in gap["message"]
    assert client.ask({"type": "position", "stream": "ack-test"})["next_offset"] == 15
    assert client.ask({"type": "position", "stream": "nobody"})["next_offset"] == 0
    plain = client.ask({"type": "tokens", "stream": "ack-test", "offset": 15,
                        "tokens": [1, 2, 3]})  # an array of integers works too
    assert plain["type"] == "ack" and plain["next_offset"] == 18


def test_a_req_socket_works_too(daemon):
    context = zmq.Context()
    socket = context.socket(zmq.REQ)
    socket.linger = 0
    socket.connect(daemon.endpoint)
    socket.send(msgpack.packb({"type": "position", "stream": "req"}))
    assert socket.poll(10_000)
    assert msgpack.unpackb(socket.recv())["type"] == "position"
    socket.close()
    context.term()


REFUSALS = [
    (b"\xc1", "malformed"),
    (msgpack.packb([1, 2]), "malformed"),
    (msgpack.packb({"type": "tokens", "stream": "x", "offset": 0, "tokens": b"\0" * 4500,
                    "width": 2}), "too_large"),
    (msgpack.packb({"type": "hello"}), "unknown_type"),
    (msgpack.packb({"stream": "x"}), "unknown_type"),
    (msgpack.packb({"type": "tokens", "stream": "x", "offset": "0", "tokens": b"",
                    "width": 2}), "bad_field"),
    (msgpack.packb({"type": "tokens", "stream": "x", "offset": -1, "tokens": b"",
                    "width": 2}), "bad_field"),
    (msgpack.packb({"type": "tokens", "stream": "x", "offset": 0, "tokens": b"\0\0\0",
                    "width": 2}), "bad_field"),
    (msgpack.packb({"type": "tokens", "stream": "x", "offset": 0, "tokens": b"\0\0\0",
                    "width": 3}), "bad_field"),
    (msgpack.packb({"type": "tokens", "stream": "x", "offset": 0, "tokens": "abc"}),
     "bad_field"),
    (msgpack.packb({"type": "tokens", "stream": "x", "offset": 0, "tokens": [1, True]}),
     "bad_field"),
    (msgpack.packb({"type": "predict", "stream": "x", "top_k": 0}), "bad_field"),
    (msgpack.packb({"type": "tokens", "stream": 5, "offset": 0, "tokens": []}),
     "bad_stream_id"),
    (msgpack.packb({"type": "tokens", "stream": "", "offset": 0, "tokens": []}),
     "bad_stream_id"),
    (msgpack.packb({"type": "tokens", "stream": "x" * 17, "offset": 0, "tokens": []}),
     "bad_stream_id"),
    (msgpack.packb({"type": "tokens", "stream": "a\nb", "offset": 0, "tokens": []}),
     "bad_stream_id"),
    (msgpack.packb({"type": "tokens", "stream": "@@", "offset": 0, "tokens": []}).replace(
        b"\xa2@@", b"\xa2\xff\xfe"), "bad_stream_id"),  # a str that is not UTF-8
    (msgpack.packb({"type": "tokens", "stream": "x" * 3000, "offset": 0, "tokens": []}),
     "bad_stream_id"),
    (msgpack.packb({"type": "tokens", "stream": "x", "offset": 0, "tokens": list(range(101))}),
     "too_many_tokens"),
    (msgpack.packb(tokens("x", 0, [1, 256])), "token_out_of_range"),
    (msgpack.packb({"type": "tokens", "stream": "x", "offset": 0, "tokens": [3, -1]}),
     "token_out_of_range"),
    (msgpack.packb({"type": "tokens", "stream": "x", "offset": 0, "tokens": [2**64 - 1]}),
     "token_out_of_range"),
    (msgpack.packb({"type": "status", "id": [1]}), "bad_field"),
]


@pytest.mark.parametrize("payload,reason", REFUSALS)
def test_every_refusal_has_its_reason(daemon, client, payload, reason):
    before = metric(scrape(daemon), f'streamrnn_messages_rejected_total{{reason="{reason}"}}')
    reply = client.ask(payload)
    assert reply["type"] == "nack" and reply["reason"] == reason, reply
    assert reply["message"]
    after = metric(scrape(daemon), f'streamrnn_messages_rejected_total{{reason="{reason}"}}')
    assert after == before + 1
    assert client.ask(tokens("still-fine", 0, [1, 2]))["type"] == "ack"  # daemon unharmed


def test_frames_of_the_wrong_shape_are_refused(daemon):
    with RawClient(daemon.endpoint) as c:
        c.socket.send_multipart([b"a", b"b", b"c"])
        reply = c.receive()
        assert reply["reason"] == "malformed"


def test_stream_cap_and_busy(tmp_path):
    d = DaemonProcess(tmp_path, ["ingest.max_streams=2", "ingest.max_queued_tokens=50",
                                 "ingest.max_tokens_per_message=40", "train.k1=32",
                                 "train.k2=64", "ingest.busy_retry_ms=250"]).start()
    try:
        with RawClient(d.endpoint) as c:
            # 29 targets each stay queued: fewer than k1, and no flush for 30 s
            assert c.ask(tokens("a", 0, range(30)))["type"] == "ack"
            busy = c.ask(tokens("b", 0, range(30)))
            assert busy["type"] == "busy" and busy["stream"] == "b"
            # nothing trained yet, so no rate to go by: a second (test_loop.py has the
            # formula); never less than ingest.busy_retry_ms
            assert busy["retry_after_ms"] == 1000
            assert c.ask(tokens("b", 0, range(20)))["type"] == "ack"  # 29 + 19 <= 50
            cap = c.ask(tokens("c", 0, range(2)))
            assert cap["reason"] == "too_many_streams"
            assert c.ask({"type": "position", "stream": "b"})["next_offset"] == 20
        text = scrape(d)
        assert metric(text, "streamrnn_busy_replies_total") == 1
        assert metric(text, "streamrnn_ingest_queue_tokens") == 29 + 19
    finally:
        assert d.stop() == 0


def test_trains_and_predicts_while_learning(tmp_path):
    d = DaemonProcess(tmp_path, LIMITS).start()  # its own: the counters are this stream's
    text = (b"the quick brown fox jumps over the lazy dog. " * 40)
    with Producer(d.endpoint, max_tokens_per_message=90) as producer:
        producer.send("fox", text)  # the queue holds 200 tokens: busy, retried, all taken
        producer.flush(timeout=60)
    try:
        with RawClient(d.endpoint) as client:
            full_windows = (len(text) - 1) // 4 * 4  # k1 = 4; the rest waits for a flush
            wait_for(lambda: status(client)["tokens_trained"] == full_windows,
                     what="training")
            _predicts(client, len(text))
            client.ask({"type": "flush", "stream": "fox"})
            wait_for(lambda: status(client)["tokens_trained"] == len(text) - 1,
                     what="the flush")
    finally:
        assert d.stop() == 0


def _predicts(client, length):
    prediction = client.ask({"type": "predict", "stream": "fox", "top_k": 5, "id": 3})
    assert prediction["type"] == "prediction" and prediction["id"] == 3
    assert prediction["next_offset"] == length
    probs = [p for _, p in prediction["top"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    assert all(0 <= t < 256 for t, _ in prediction["top"])
    unknown = client.ask({"type": "predict", "stream": "nobody", "top_k": 2})
    assert unknown["top"][0][1] == pytest.approx(1 / 256)
    generated = client.ask({"type": "generate", "stream": "fox", "num_tokens": 20,
                            "temperature": 0.5})
    assert len(generated["tokens"]) == 20 and all(0 <= t < 256 for t in generated["tokens"])
    assert client.ask({"type": "position", "stream": "fox"})["next_offset"] == length


METRIC_NAMES = [
    "streamrnn_tokens_received_total", "streamrnn_tokens_trained_total",
    "streamrnn_prequential_bits_total", "streamrnn_updates_total",
    "streamrnn_messages_rejected_total", "streamrnn_active_streams",
    "streamrnn_update_duration_seconds_bucket", "streamrnn_ingest_queue_tokens",
    "streamrnn_learning_rate", "streamrnn_grad_norm", "streamrnn_device_memory_bytes",
    "streamrnn_build_info", "streamrnn_start_time_seconds", "streamrnn_busy_replies_total",
    "streamrnn_resident_streams", "streamrnn_spilled_streams", "streamrnn_wal_bytes",
    "streamrnn_checkpoint_last_success_timestamp_seconds",
    "streamrnn_checkpoint_duration_seconds_bucket", "streamrnn_checkpoint_failures_total",
    "streamrnn_recovery_replayed_tokens_total",
]


def test_metrics_endpoint(daemon, client):
    client.ask(tokens("metrics", 0, range(50)))
    wait_for(lambda: metric(scrape(daemon), "streamrnn_updates_total") > 0, what="an update")
    text = scrape(daemon)
    for name in METRIC_NAMES:
        assert name in text, name
    assert not re.search(r"[{,]stream(_id)?=", text)  # no per-stream labels
    assert "_created" not in text
    trained = metric(text, "streamrnn_tokens_trained_total")
    bits = metric(text, "streamrnn_prequential_bits_total")
    assert trained > 0 and 0 < bits / trained < 16
    check = subprocess.run([promtool(), "check", "metrics"], input=text, text=True,
                           capture_output=True)
    # The one finding is the name the project's docs and dashboards use: promlint reads any
    # "bits" as a data size to be given in bytes, but these bits are information
    # (-log2 p), and bytes of information would be a wrong unit, not a base one.
    findings = (check.stdout + check.stderr).strip().splitlines()
    # bits of information (-log2 p), which promtool takes for a data size
    assert findings == ['streamrnn_line_bits_per_token use base unit "bytes" instead of '
                        '"bits"', 'streamrnn_prequential_bits_total use base unit "bytes" '
                        'instead of "bits"'], findings


def test_logs_are_json_lines_without_per_update_noise(daemon):
    lines = [line for line in daemon.log().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]
    kinds = Counter(e["event"] for e in events)
    assert {"starting", "listening"} <= set(kinds)
    # lifecycle events once; refusals summed up in one line per 10 s burst, not one per
    # message (this daemon has refused dozens by now)
    assert set(kinds) <= {"starting", "listening", "refused input"}, kinds
    assert kinds["starting"] == kinds["listening"] == 1
    elapsed = (_when(events[-1]) - _when(events[0]))
    assert kinds["refused input"] <= 1 + elapsed / 10


def _when(event: dict) -> float:
    from datetime import datetime
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def test_sigterm_stops_cleanly(tmp_path):
    d = DaemonProcess(tmp_path, []).start()
    with RawClient(d.endpoint) as c:
        c.ask(tokens("s", 0, range(100)))
    started = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    assert '"event": "stopped"' in d.log()


@pytest.fixture
def small_daemon(tmp_path):
    d = DaemonProcess(tmp_path, ["ingest.max_message_bytes=4096",
                                 "ingest.max_tokens_per_message=100",
                                 "ingest.max_queued_tokens=40000"]).start()
    yield d
    assert d.stop() == 0


def test_status_and_feed_commands(tmp_path, small_daemon):
    daemon = small_daemon
    data = tmp_path / "input.txt"
    data.write_bytes(b"hello streamrnn " * 500)
    cli = [sys.executable, "-m", "streamrnn"]
    too_big = subprocess.run([*cli, "feed", "--endpoint", daemon.endpoint, data.name],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert too_big.returncode == 1  # 4096-byte chunks: over this daemon's limits
    assert "refused" in too_big.stderr and "(too_large)" in too_big.stderr
    fed = subprocess.run([*cli, "feed", "--endpoint", daemon.endpoint, "--chunk", "50",
                          data.name],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert fed.returncode == 0, fed.stderr
    assert "fed 8,000 bytes to 1 stream(s)" in fed.stderr and "all acknowledged" in fed.stderr
    again = subprocess.run([*cli, "feed", "--endpoint", daemon.endpoint, "--stream", "both",
                            "--chunk", "50",
                            data.name, "-"], input=b"stdin bytes", capture_output=True,
                           timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    with RawClient(daemon.endpoint) as c:
        # the refused first run sent nothing that was accepted: the stream holds one copy
        assert c.ask({"type": "position", "stream": data.name})["next_offset"] == 8000
        assert c.ask({"type": "position", "stream": "both"})["next_offset"] == 8011
    human = subprocess.run([*cli, "status", "--endpoint", daemon.endpoint],
                           capture_output=True, text=True, timeout=60)
    assert human.returncode == 0 and "tokens trained" in human.stdout
    as_json = subprocess.run([*cli, "status", "--endpoint", daemon.endpoint, "--json"],
                             capture_output=True, text=True, timeout=60)
    info = json.loads(as_json.stdout)
    assert info["tokens_received"] == 8000 + 8011 and info["streams"] == 2


def test_commands_fail_clearly_without_a_daemon(tmp_path):
    endpoint = "tcp://127.0.0.1:9"  # nothing listens there
    data = tmp_path / "x.txt"
    data.write_bytes(b"x" * 100)
    cli = [sys.executable, "-m", "streamrnn"]
    fed = subprocess.run([*cli, "feed", "--endpoint", endpoint, "--retry-seconds", "1",
                          str(data)], capture_output=True, text=True, timeout=60)
    assert fed.returncode == 1
    assert "no answer from tcp://127.0.0.1:9" in fed.stderr and "Traceback" not in fed.stderr
    stat = subprocess.run([*cli, "status", "--endpoint", endpoint, "--timeout", "1"],
                          capture_output=True, text=True, timeout=60)
    assert stat.returncode == 1 and "is `streamrnn serve` running" in stat.stderr
    missing = subprocess.run([*cli, "feed", "--endpoint", endpoint, str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "cannot read" in missing.stderr


def test_a_second_signal_ends_a_daemon_that_does_not_stop(tmp_path):
    d = DaemonProcess(tmp_path, [])
    d.start(wait=False, env={"STREAMRNN_HANG_AT": "turn:20"})  # stuck in its loop
    wait_for(lambda: '"event": "listening"' in d.log(), what="listening")
    time.sleep(2.0)  # 20 idle turns of 50 ms: it hangs from here on
    d.proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        d.proc.wait(timeout=1.0)  # the first asks; a hung loop never gets to it
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(timeout=10) == 128 + signal.SIGINT

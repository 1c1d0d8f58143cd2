"""The score feed on real sockets: a real daemon, its XPUB, `streamrnn watch` in a
subprocess, SIGKILL while it watches. What the records hold is test_scores.py's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

from harness import DaemonProcess, free_port, serve
from streamrnn.client import Producer, Scores, score_endpoints
from streamrnn.subscriber import topic

REPO = Path(__file__).resolve().parent.parent


def readme_line_fields() -> set[str]:
    """The line record's fields as README.md ("Score feed") lists them."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("A line record, once its last token is trained:"):]
    table = table[:table.index("\n\n", table.index("| field |"))]
    return {row.split("`")[1] for row in table.splitlines() if row.startswith("| `")}


def log_text(prefix: str, num_lines: int) -> bytes:
    return b"".join(f"{prefix} request {i % 7} served in {i % 13} ms\n".encode()
                    for i in range(num_lines))


def scrape(daemon, rank: int = 0) -> str:
    with urllib.request.urlopen(daemon.metrics_urls[rank], timeout=10) as response:
        return response.read().decode()


def status(endpoint: str) -> dict:
    with Producer(endpoint) as producer:
        return producer.status()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def feed(endpoint: str, streams: dict[str, bytes], chunk: int = 200) -> None:
    with Producer(endpoint, retry_seconds=60) as producer:
        longest = max(len(t) for t in streams.values())
        for start in range(0, longest, chunk):
            for stream, text in streams.items():
                if start < len(text):
                    producer.send(stream, text[start:start + chunk])
        producer.flush()
        for stream in streams:
            producer.request({"type": "flush", "stream": stream})
        deadline = time.monotonic() + 60  # trained to the last token
        while producer.status()["queued_tokens"] and time.monotonic() < deadline:
            time.sleep(0.05)


def collect(scores: Scores, until, timeout: float = 60) -> list[dict]:
    records, deadline = [], time.monotonic() + timeout
    while not until(records):
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(records)} records: {[r['line'] for r in records][-5:]}"
        record = scores.receive(timeout=left)
        if record is not None:
            records.append(record)
    return records


def test_a_watched_stream_gets_every_line_in_order_and_others_nothing(tmp_path):
    d = DaemonProcess(tmp_path, []).start()
    [feed_endpoint] = score_endpoints(d.endpoint)
    assert feed_endpoint.startswith("tcp://127.0.0.1:")
    web, db = log_text("web", 40), log_text("db", 30)
    with Scores(feed_endpoint, ["web"]) as scores:
        time.sleep(0.3)  # the subscription reaches the daemon (ZeroMQ: asynchronous)
        feed(d.endpoint, {"web": web, "db": db})
        records = collect(scores, lambda r: len(r) >= 40)
        assert scores.receive(timeout=1.0) is None  # nothing more: db is not watched
    lines = web.split(b"\n")[:-1]
    # exactly the README's fields, those of every record, and what the reader adds
    assert set(records[0]) == readme_line_fields() | {"kind", "stream", "seq", "run",
                                                      "missed", "restarted"}
    assert set(records[0]["worst"]) == {"offset", "bits", "expected", "p_expected"}
    assert [r["line"] for r in records] == list(range(40))
    assert [r["seq"] for r in records] == list(range(40))
    assert {r["stream"] for r in records} == {"web"}
    offset = 0
    for r, line in zip(records, lines):
        want = line + b"\n"
        if r["line"] == 0:  # the stream's first byte is predicted by nothing
            want, offset = want[1:], 1
        assert (r["offset"], r["text"], r["tokens"]) == (offset, want, len(want))
        assert r["complete"] and not r["missed"] and len(r["token_bits"]) == len(want)
        assert r["bits"] == pytest.approx(float(r["token_bits"].sum()), rel=1e-5)
        offset += len(want)
    assert status(d.endpoint)["score_endpoints"] == [feed_endpoint]
    m = scrape(d)
    assert metric(m, "streamrnn_scores_published_total") == 40
    assert metric(m, "streamrnn_line_bits_per_token_count") == 40  # web's only
    assert metric(m, "streamrnn_scores_dropped_total") == 0


def test_nothing_is_scored_or_sent_while_nobody_subscribes(tmp_path):
    d = DaemonProcess(tmp_path, []).start()
    feed(d.endpoint, {"web": log_text("web", 30)})
    m = scrape(d)
    assert metric(m, "streamrnn_tokens_trained_total") == len(log_text("web", 30)) - 1
    assert metric(m, "streamrnn_scores_published_total") == 0
    assert metric(m, "streamrnn_line_bits_per_token_count") == 0


def test_a_subscriber_that_never_reads_loses_records_not_training(tmp_path):
    d = DaemonProcess(tmp_path, ["scores.send_queue=5"]).start()
    context = zmq.Context()
    try:
        stuck = context.socket(zmq.SUB)
        stuck.rcvhwm = 5
        stuck.rcvbuf = 4096  # and the kernel's buffer small: the queue fills
        stuck.subscribe(b"")  # lines and tokens of every stream; never read
        stuck.connect(score_endpoints(d.endpoint)[0])
        time.sleep(0.3)
        text = log_text("web", 400)
        feed(d.endpoint, {"web": text, "db": text})
        m = scrape(d)
        assert metric(m, "streamrnn_scores_dropped_total") > 0
        assert metric(m, "streamrnn_tokens_trained_total") == 2 * (len(text) - 1)
        assert status(d.endpoint)["queued_tokens"] == 0
        stuck.close(linger=0)
    finally:
        context.destroy(linger=0)


def test_hostile_and_many_subscriptions_leave_the_daemon_unharmed(tmp_path):
    d = DaemonProcess(tmp_path, []).start()
    endpoint = score_endpoints(d.endpoint)[0]
    context = zmq.Context()
    try:
        raw = context.socket(zmq.XSUB)  # sends whatever frames it likes upstream
        raw.sndhwm = 0  # (past its send queue an XSUB drops subscriptions itself)
        raw.connect(endpoint)
        raw.send(b"\x05not a subscription")
        raw.send(b"")
        for i in range(5000):  # thousands of topics, of streams that do not exist
            raw.send(b"\x01" + topic("line", f"nobody-{i}"))
        raw.send(b"\x01" + topic("line", "web"))
        raw.send(b"\x00" + topic("line", "never-subscribed"))  # nothing to undo
        deadline = time.monotonic() + 30
        while metric(scrape(d), "streamrnn_score_topics") < 5001 and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        feed(d.endpoint, {"web": log_text("web", 20)})
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 20 and time.monotonic() < deadline:
            if raw.poll(1000):
                got.append(raw.recv_multipart())
        assert len(got) == 20 and all(name == topic("line", "web") for name, _ in got), scrape(d)[-3000:]
        m = scrape(d)
        assert metric(m, "streamrnn_score_subscriptions_refused_total") == 2
        assert metric(m, "streamrnn_score_topics") == 5001
        raw.close(linger=0)
        # a subscriber that comes and goes: its topics go with it
        deadline = time.monotonic() + 10
        while metric(scrape(d), "streamrnn_score_topics") and time.monotonic() < deadline:
            status(d.endpoint)  # a turn of the loop reads the unsubscriptions
            time.sleep(0.2)
        assert metric(scrape(d), "streamrnn_score_topics") == 0
    finally:
        context.destroy(linger=0)
    assert status(d.endpoint)["tokens_trained"] > 0


def watch(endpoint: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "streamrnn", "watch", "--endpoint",
                             endpoint, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


class Printed:
    """What a watch prints, JSON line by JSON line, read on a thread as it comes."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.records = proc, []
        self.reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.reader.start()

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: its exit status and what it said on stderr."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=10)
        self.reader.join(timeout=10)
        with self.proc.stdout, self.proc.stderr:
            return code, self.proc.stderr.read()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.records.append(json.loads(line))

    def wait(self, until, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not until(self.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.records)


def test_watch_prints_json_lines_and_ends_cleanly_on_ctrl_c(tmp_path):
    d = DaemonProcess(tmp_path, []).start()
    printed = Printed(watch(d.endpoint, "--all", "--json", "--stream", "web"))
    try:
        time.sleep(1.5)  # it found the feed and subscribed
        feed(d.endpoint, {"web": log_text("web", 25), "db": log_text("db", 25)})
        records = printed.wait(lambda r: len(r) >= 25)
    finally:
        code, err = printed.interrupt()
    assert code == 0 and "Traceback" not in err
    assert [r["line"] for r in records] == list(range(25))
    for r in records:
        assert {"stream", "line", "offset", "tokens", "bits", "bits_per_token",
                "score"} <= r.keys() and r["stream"] == "web"
        assert isinstance(r["text"], str) and len(r["token_bits"]) == r["tokens"]


def test_watch_says_what_is_wrong_when_there_is_no_daemon():
    done = subprocess.run([sys.executable, "-m", "streamrnn", "watch", "--endpoint",
                           f"tcp://127.0.0.1:{free_port()}"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("streamrnn watch: ")


@pytest.mark.slow
def test_a_sigkill_while_watch_runs_brings_lines_again_never_loses_one(tmp_path):
    """After a crash the daemon replays the updates logged since its last checkpoint;
    a watch still running reconnects and gets their lines again: the same stream, line
    and offset (a line begun before that checkpoint comes once more from its middle,
    complete false). Every line arrives; a line's complete records are equal."""
    scores_port = free_port()
    d = DaemonProcess(tmp_path, [f"scores.endpoint=tcp://127.0.0.1:{scores_port}",
                                 "checkpoint.interval_updates=150"]).start()
    printed = Printed(watch(d.endpoint, "--all", "--json"))
    text = log_text("app", 300)
    try:
        time.sleep(1.5)
        feed(d.endpoint, {"app": text[:len(text) // 2]})
        time.sleep(0.5)
        d.kill()
        d.start()
        feed(d.endpoint, {"app": text[len(text) // 2:]})
        records = printed.wait(lambda r: {x["line"] for x in r} == set(range(300)))
    finally:
        code, err = printed.interrupt()
    assert code == 0
    assert {r["line"] for r in records} == set(range(300)), err
    by_line: dict[int, list[dict]] = {}
    for r in records:
        by_line.setdefault(r["line"], []).append(r)
    for number, seen in by_line.items():
        whole = [(r["offset"], r["text"], r["bits"]) for r in seen if r["complete"]]
        assert whole and all(w == whole[0] for w in whole), (number, seen)
    assert "the daemon restarted" in err or len(records) == 300


@pytest.mark.slow
def test_each_rank_publishes_its_own_streams(tmp_path):
    cluster = serve(tmp_path, [], nproc=2).start()
    try:
        feeds = score_endpoints(cluster.endpoint)
        assert len(feeds) == 2 and feeds[0] != feeds[1]
        streams = {f"s{i}": log_text(f"s{i}", 10) for i in range(6)}
        assert len({cluster.rank_of(s) for s in streams}) == 2  # both ranks own some
        with Scores.of(cluster.endpoint) as scores:
            time.sleep(0.5)
            feed(cluster.endpoint, streams)
            records = collect(scores, lambda r: len(r) >= 60)
        assert sorted({(r["stream"], r["line"]) for r in records}) == \
            sorted((s, i) for s in streams for i in range(10))
    finally:
        cluster.stop()

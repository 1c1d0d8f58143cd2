"""Who may send: CURVE with an allow-list of producer keys, failing closed."""
from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request

import pytest
import zmq

from harness import DaemonProcess, free_port
from streamrnn.client import Producer, ProducerError, Unreachable
from streamrnn.config import IngestConfig
from streamrnn.serve.source import Source


@pytest.fixture
def keys(tmp_path):
    cli = [sys.executable, "-m", "streamrnn", "keys", "generate"]
    for folder, name in (("server", "server"), ("allowed", "good"), ("other", "stranger")):
        out = subprocess.run([*cli, str(tmp_path / folder), "--name", name],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "secret key:" in out.stdout, out.stderr
    secret = tmp_path / "server/server.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    return tmp_path


def curve_daemon(tmp_path, keys) -> DaemonProcess:
    return DaemonProcess(tmp_path, [
        f"ingest.curve_secret_key={keys / 'server/server.key_secret'}",
        f"ingest.curve_allowed_keys={keys / 'allowed'}"])


def handshake_failures(d: DaemonProcess) -> dict[str, float]:
    """streamrnn_handshake_failures_total by kind, after checking what its help says."""
    with urllib.request.urlopen(d.metrics_url, timeout=10) as r:
        text = r.read().decode()
    # the help says where a client without CURVE is counted: other (or protocol)
    help_line = next(line for line in text.splitlines()
                     if line.startswith("# HELP streamrnn_handshake_failures_total"))
    assert re.search(r"protocol \([^)]*without CURVE\)", help_line), help_line
    assert re.search(r"other \([^)]*without CURVE\)", help_line), help_line
    failed = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("streamrnn_handshake_failures_total{")}
    assert set(failed) == {"auth", "protocol", "other"}, failed
    return failed


def settled_failures(d: DaemonProcess, ready, timeout: float = 30) -> dict[str, float]:
    """The handshake failure counts once `ready(counts)` holds and they have stopped
    changing (housekeeping reads the monitor twice a second: 1 s apart is two reads)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        failed = handshake_failures(d)
        if ready(failed) and failed == last:
            return failed
        assert time.monotonic() < deadline, failed
        last = failed
        time.sleep(1.0)


def test_only_listed_producers_get_in(tmp_path, keys):
    d = curve_daemon(tmp_path, keys)
    d.start(wait=False)
    server = str(keys / "server/server.key")
    try:
        with Producer(d.endpoint, server_key=server, retry_seconds=60,
                      client_key=str(keys / "allowed/good.key_secret")) as good:
            good.send("s", b"hello, allowed producer")
            good.flush(timeout=60)
            assert good.position("s") == 23
        with Producer(d.endpoint, server_key=server, retry_seconds=2,
                      client_key=str(keys / "other/stranger.key_secret")) as stranger:
            with pytest.raises(Unreachable):
                stranger.position("s")
        # the stranger fails auth; once its counts stop growing, only the plain client
        # can add to them
        after_stranger = settled_failures(d, lambda failed: failed["auth"] >= 1)
        with Producer(d.endpoint, retry_seconds=2) as plain:  # no CURVE at all
            with pytest.raises(Unreachable):
                plain.position("s")
        # the plain client fails as protocol or other (the help says so), never as auth
        before = after_stranger["protocol"] + after_stranger["other"]
        after_plain = settled_failures(
            d, lambda failed: failed["protocol"] + failed["other"] > before)
        assert after_plain["auth"] == after_stranger["auth"], (after_stranger, after_plain)
        with Producer(d.endpoint, server_key=server, retry_seconds=30,
                      client_key=str(keys / "allowed/good.key_secret")) as good:
            assert good.position("s") == 23  # the strangers changed nothing
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("broken,message", [
    ("missing-secret", "cannot read key file"),
    ("public-as-secret", "holds no secret key"),
    ("no-folder", "ingest.curve_allowed_keys = '{allowed}' does not exist"),
    ("file-as-folder", "ingest.curve_allowed_keys = '{allowed}' is not a folder"),
    ("empty-folder", "no producer public keys"),
])
def test_curve_fails_closed(tmp_path, keys, broken, message):
    secret = keys / "server/server.key_secret"
    allowed = keys / "allowed"
    if broken == "missing-secret":
        secret = keys / "server/nope.key_secret"
    elif broken == "public-as-secret":
        secret = keys / "server/server.key"
    elif broken == "no-folder":
        allowed = keys / "nowhere"
    elif broken == "file-as-folder":
        allowed = keys / "allowed/good.key"
    else:
        allowed = keys / "empty"
        allowed.mkdir()
    d = DaemonProcess(tmp_path, [f"ingest.curve_secret_key={secret}",
                                 f"ingest.curve_allowed_keys={allowed}"])
    d.start(wait=False)
    assert d.proc.wait(timeout=60) == 2
    assert message.format(allowed=allowed) in d.log() and "refusing to start" in d.log()


@pytest.mark.parametrize("half", ["curve_secret_key", "curve_allowed_keys"])
def test_half_of_curve_is_refused_naming_both_keys(tmp_path, keys, half):
    value = {"curve_secret_key": keys / "server/server.key_secret",
             "curve_allowed_keys": keys / "allowed"}[half]
    other = "curve_allowed_keys" if half == "curve_secret_key" else "curve_secret_key"
    d = DaemonProcess(tmp_path, [f"ingest.{half}={value}"])
    d.start(wait=False)
    assert d.proc.wait(timeout=60) == 2  # not an open daemon the operator thinks is closed
    assert f"config error: ingest.{half} is set but ingest.{other} is empty" in d.log()


def test_source_says_whether_curve_is_on(tmp_path, keys):
    context = zmq.Context()
    try:
        for curve, settings in ((False, {}), (True, {
                "curve_secret_key": str(keys / "server/server.key_secret"),
                "curve_allowed_keys": str(keys / "allowed")})):
            source = Source(IngestConfig(endpoint=f"tcp://127.0.0.1:{free_port()}",
                                         **settings), context)
            try:
                assert source.curve is curve
            finally:
                source.close()
    finally:
        context.term()


def test_producer_key_errors_are_clear(keys):
    # the flags the user types, not the library's parameter names
    with pytest.raises(ProducerError, match="CURVE needs both --server-key .* and "
                       "--client-key .*; only --server-key was given"):
        Producer("tcp://127.0.0.1:9", server_key=str(keys / "server/server.key"))
    with pytest.raises(ProducerError, match="cannot read key file"):
        Producer("tcp://127.0.0.1:9", server_key=str(keys / "server/missing.key"),
                 client_key=str(keys / "allowed/good.key_secret"))


def test_the_score_feed_lets_in_only_allowed_keys(tmp_path, keys):
    """With CURVE on, a subscriber needs an allowed key as a producer does: a stranger
    and a plain SUB socket get nothing, while an allowed one gets the lines."""
    from streamrnn.client import Scores, score_endpoints
    d = curve_daemon(tmp_path, keys).start(wait=False)  # (its readiness check has no key)
    server, good = str(keys / "server/server.key"), str(keys / "allowed/good.key_secret")
    try:
        [feed] = score_endpoints(d.endpoint, 60, server_key=server, client_key=good)
        allowed = Scores(feed, server_key=server, client_key=good)
        stranger = Scores(feed, server_key=server,
                          client_key=str(keys / "other/stranger.key_secret"))
        plain = Scores(feed)
        time.sleep(1.0)  # every handshake done (or refused)
        with Producer(d.endpoint, server_key=server, client_key=good,
                      retry_seconds=60) as producer:
            producer.send("s", b"one line\nand another\n")
            producer.flush(timeout=60)
            producer.request({"type": "flush", "stream": "s"})
        got = [allowed.receive(timeout=30), allowed.receive(timeout=30)]
        assert [r["text"] for r in got] == [b"ne line\n", b"and another\n"]
        assert stranger.receive(timeout=1.0) is None and plain.receive(timeout=0.1) is None
        for scores in (allowed, stranger, plain):
            scores.close()
    finally:
        assert d.stop() == 0

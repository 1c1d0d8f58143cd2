"""The command line as a user meets it: real subprocesses, real output."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from harness import DaemonProcess
from streamrnn import __version__
from streamrnn.client import Producer


def streamrnn(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "streamrnn", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_the_commands():
    out = streamrnn("--help")
    assert out.returncode == 0
    for command in ("serve", "feed", "status", "demo", "bench", "config"):
        assert command in out.stdout


def test_bad_config_is_one_clear_error():
    out = streamrnn("config", "--set", "train.k1=64", "--set", "train.k2=32")
    assert out.returncode == 2
    assert out.stderr.strip() == ("streamrnn: config error: train.k2 = 32 must be >= "
                                  "train.k1 = 64: each update backpropagates through the "
                                  "last k2 inputs and trains the newest k1 targets")
    assert "Traceback" not in out.stderr


def test_print_config_shows_the_resolved_values():
    out = streamrnn("serve", "--print-config", "--set", "model.kind=gru")
    assert out.returncode == 0
    assert 'kind = "gru"' in out.stdout and "[train]" in out.stdout


def test_demo_learns_and_samples():
    # a small queue: what is left to train after the feeding stops stays small
    out = streamrnn("demo", "--seconds", "8", "--streams", "3", "--set",
                    "model.hidden_size=64", "--set", "train.k2=64", "--set",
                    "ingest.max_queued_tokens=4096", "--set",
                    "ingest.max_tokens_per_message=256", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "prequential bits/byte:" in out.stdout
    assert "sampled from the model" in out.stdout
    assert " bits than xz" in out.stdout or " bits than bzip2" in out.stdout
    summary = next(line for line in out.stdout.splitlines() if line.startswith("prequential"))
    overall = float(summary.split()[2].rstrip(","))
    assert 0 < overall < 8  # learning something: below the 8 bits of a uniform guess
    assert "daemon up at tcp://127.0.0.1:" in out.stdout


@pytest.mark.slow
def test_bench_writes_json_with_ratios(tmp_path):
    path = tmp_path / "bench.json"
    out = streamrnn("bench", "--configs", "small", "--seconds", "1.5", "--rounds", "1",
                    "--json", str(path), timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(path.read_text())
    strategies = {row["strategy"] for row in result["rows"]}
    assert strategies == {"engine", "recompute", "seed_chunk_cell", "seed_sliding_cell"}
    assert all(row["tokens_per_s"] > 0 and not row["error"] for row in result["rows"])
    ratio = result["ratios"][0]
    assert ratio["config"] == "small" and ratio["vs_recompute"] > 0
    assert "engine: recompute" in out.stdout


@pytest.mark.slow
def test_bench_e2e_reports_daemon_next_to_engine(tmp_path):
    path = tmp_path / "e2e.json"
    out = streamrnn("bench", "e2e", "--seconds", "2", "--streams", "4", "--producers", "2",
                    "--chunk", "64", "--set", "model.hidden_size=32", "--json", str(path),
                    timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(path.read_text())
    assert result["engine_tokens_per_s"] > 0 and result["daemon"]["tokens_per_s"] > 0
    daemon = result["daemon"]
    assert daemon["ack_latency_s"]["count"] > 0
    assert result["engine_cpu_seconds_per_token"] > 0 and daemon["cpu_seconds_per_token"] > 0
    assert daemon["cpu_vs_engine"] == pytest.approx(
        result["engine_cpu_seconds_per_token"] / daemon["cpu_seconds_per_token"])
    assert 0 < daemon["update_share"] <= 1.01  # of the wall time
    # messages of 64 tokens (shorter where a stream wraps around its text)
    assert result["tokens_per_message"] == 64
    assert 0 < daemon["tokens_acked"] <= 64 * daemon["ack_latency_s"]["count"]
    assert daemon["acks_per_s"] > 0 and "a second)" in out.stdout
    assert "CPU us/token" in out.stdout and "wal fsync" in out.stdout


@pytest.mark.slow
def test_bench_contention_measures_alone_and_beside_busy_processes(tmp_path):
    path = tmp_path / "contention.json"
    out = streamrnn("bench", "contention", "--seconds", "1", "--threads", "1",
                    "--hogs", "1", "--set", "model.hidden_size=32", "--json", str(path),
                    timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(path.read_text())
    assert result["hogs"] == 1 and [r["cpu_threads"] for r in result["rows"]] == ["1"]
    row = result["rows"][0]
    assert row["alone_tokens_per_s"] > 0 and row["beside_tokens_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["beside_tokens_per_s"] / row["alone_tokens_per_s"])
    assert "beside 1 busy process" in out.stdout


@pytest.mark.slow
def test_bench_soak_checks_the_books(tmp_path):
    path = tmp_path / "soak.json"
    out = streamrnn("bench", "soak", "--seconds", "4", "--streams", "4", "--producers", "2",
                    "--set", "model.hidden_size=16", "--set", "ingest.max_queued_tokens=20000",
                    "--set", "ingest.max_tokens_per_message=1024",
                    "--json", str(path), timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(path.read_text())
    assert result["tokens_sent"] > 0
    assert (result["lost_tokens"], result["duplicated_tokens"], result["mismatched_streams"]) \
        == (0, 0, 0)
    assert result["tokens_trained"] == result["tokens_sent"] - 4
    assert result["samples"] and result["samples"][-1]["rss_bytes"] > 0


# ---- start-up failures: one line, exit 2 (systemd does not restart) ---------------------
def occupied_port(stack: contextlib.ExitStack) -> int:
    """A loopback port another socket listens on for as long as `stack` is open."""
    s = stack.enter_context(socket.socket())
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s.getsockname()[1]


@pytest.mark.parametrize("case", ["ingest in use", "ingest host", "ipc folder",
                                  "metrics in use", "metrics host"])
def test_startup_failures_are_one_clear_line(tmp_path, case):
    with contextlib.ExitStack() as stack:
        port = occupied_port(stack)
        overrides, expected = {
            "ingest in use": ([], f"cannot bind ingest.endpoint tcp://127.0.0.1:{port}: "
                              "address already in use"),
            "ingest host": ([f"ingest.endpoint=tcp://no-such-host.invalid:{port}"],
                            f"cannot bind ingest.endpoint tcp://no-such-host.invalid:{port}: "
                            "no such device"),
            "ipc folder": ([f"ingest.endpoint=ipc://{tmp_path}/missing/ingest.sock"],
                           f"cannot bind ingest.endpoint ipc://{tmp_path}/missing/ingest.sock: "
                           f"no such file or directory (the folder {tmp_path}/missing does "
                           "not exist)"),
            "metrics in use": ([f"metrics.port={port}"], "cannot bind metrics.address:"
                               f"metrics.port 127.0.0.1:{port}: address already in use"),
            "metrics host": (["metrics.address=no-such-host.invalid"],
                             "cannot bind metrics.address:metrics.port no-such-host.invalid:"),
        }[case]
        d = DaemonProcess(tmp_path, overrides, port=port if case == "ingest in use" else None)
        d.start(wait=False)
        assert d.proc.wait(timeout=120) == 2, d.log()
    refusals = [e for e in d.events() if e.get("event") == "refusing to start"]
    assert len(refusals) == 1, d.log()
    assert refusals[0]["reason"].startswith(expected), refusals[0]["reason"]
    assert "\n" not in refusals[0]["reason"] and "Traceback" not in d.log()


# ---- keys --------------------------------------------------------------------------------
def test_keys_generate_never_overwrites_silently(tmp_path):
    out = streamrnn("keys", "generate", str(tmp_path), "--name", "server")
    assert out.returncode == 0, out.stderr
    secret = tmp_path / "server.key_secret"
    before = secret.read_bytes()
    out = streamrnn("keys", "generate", str(tmp_path), "--name", "server")
    assert out.returncode == 2
    assert out.stderr.strip().startswith(f"streamrnn keys: {tmp_path / 'server.key'} already "
                                         "exists") and "--force" in out.stderr
    assert secret.read_bytes() == before  # the pair in use is untouched
    (tmp_path / "server.key").unlink()    # half a pair left: still refused, by name
    out = streamrnn("keys", "generate", str(tmp_path), "--name", "server")
    assert out.returncode == 2 and str(secret) in out.stderr
    out = streamrnn("keys", "generate", str(tmp_path), "--name", "server", "--force")
    assert out.returncode == 0, out.stderr
    assert secret.read_bytes() != before and (tmp_path / "server.key").exists()


# ---- feed --------------------------------------------------------------------------------
def test_feed_sends_what_a_pipe_has_without_waiting_for_more(tmp_path):
    d = DaemonProcess(tmp_path, []).start()
    feed = subprocess.Popen([sys.executable, "-m", "streamrnn", "feed", "--endpoint",
                             d.endpoint, "--stream", "live", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with Producer(d.endpoint, retry_seconds=30) as control:
            for sent, line in enumerate([b"first line\n", b"second\n"]):
                feed.stdin.write(line)
                feed.stdin.flush()  # the pipe stays open: a live `journalctl -f`
                expected = len(b"first line\n") + (len(line) if sent else 0)
                deadline = time.monotonic() + 30
                while control.position("live") < expected:
                    assert feed.poll() is None, feed.stderr.read()
                    assert time.monotonic() < deadline, "feed held the bytes back"
                    time.sleep(0.1)
                assert control.position("live") == expected
        feed.stdin.close()
        assert feed.wait(timeout=60) == 0, feed.stderr.read()
    finally:
        if feed.poll() is None:
            feed.kill()
        for pipe in (feed.stdin, feed.stdout, feed.stderr):
            pipe.close()  # else a ResourceWarning, which the suite makes an error
        feed.wait()
        assert d.stop() == 0


def test_feed_reads_files_in_full_chunks(tmp_path):
    from streamrnn.feed import _chunks
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * 100)
    with open(path, "rb") as f:
        sizes = [len(c) for c in _chunks(f, 5000)]
    assert sizes == [5000] * 5 + [600]


@pytest.mark.parametrize("args,message", [
    (["feed", "--chunk", "0", "x"], "argument --chunk: must be >= 1, got 0"),
    (["feed", "--endpoint", "foo", "x"], "argument --endpoint: 'foo' (from --endpoint or "
     "$STREAMRNN_ENDPOINT): expected tcp://HOST:PORT or ipc:///PATH"),
    (["status", "--endpoint", "tcp://127.0.0.1:99999"], "port '99999' must be in 1 .. 65535"),
    (["bench", "--rounds", "0"], "argument --rounds: must be >= 1"),
    (["config", "--set", "train.k1"], "streamrnn: config error: override 'train.k1': "
     "expected SECTION.KEY=VALUE, for example train.k1=16"),
])
def test_bad_arguments_are_one_clear_error(args, message):
    out = streamrnn(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_help_shows_defaults_and_what_serve_answers():
    from streamrnn.wire import REQUEST_TYPES
    assert "seconds to wait for an answer (5)" in streamrnn("status", "--help").stdout
    bench = " ".join(streamrnn("bench", "engine", "--help").stdout.split())
    for default in ("time per strategy and config (12)", "the median counts (3)",
                    "where to write results (streamrnn-bench.json)"):
        assert default in bench
    assert "DESIGN.md" not in bench  # not in this repository
    assert "feeding time (12)" in " ".join(streamrnn("bench", "e2e", "--help").stdout.split())
    assert "length of the run (600)" in " ".join(
        streamrnn("bench", "soak", "--help").stdout.split())
    assert "wait for the daemon to write it (300)" in " ".join(
        streamrnn("checkpoint", "save", "--help").stdout.split())
    serve = streamrnn("serve", "--help").stdout
    assert all(kind in serve for kind in REQUEST_TYPES)


@pytest.mark.parametrize("argv,mode,seconds", [
    (["bench"], "engine", 12), (["bench", "--seconds", "5"], "engine", 5),
    (["bench", "engine"], "engine", 12), (["bench", "e2e"], "e2e", 12),
    (["bench", "soak"], "soak", 600), (["bench", "soak", "--seconds", "5"], "soak", 5)])
def test_bench_seconds_default_by_mode(argv, mode, seconds):
    from streamrnn.cli import build_parser, with_bench_mode
    args = build_parser().parse_args(with_bench_mode(argv))
    assert (args.mode, args.seconds) == (mode, seconds)


# each subcommand's own options, and none of its siblings'
HELP_OPTIONS = {
    ("checkpoint", "save"): ({"--endpoint", "--server-key", "--client-key", "--json",
                              "--timeout"}, {"--config", "PATH"}),
    ("checkpoint", "list"): ({"PATH", "--config", "--json"}, {"--endpoint", "--timeout"}),
    ("checkpoint", "inspect"): ({"PATH", "--json"}, {"--endpoint", "--timeout", "--config"}),
    ("bench", "engine"): ({"--configs", "--strategies", "--seconds", "--rounds", "--json",
                           "--config", "--set", "--print-config"},
                          {"--streams", "--producers", "--wal-modes", "--e2e", "--soak"}),
    ("bench", "e2e"): ({"--streams", "--producers", "--seconds", "--wal-modes", "--json",
                        "--config", "--set"}, {"--configs", "--rounds", "--e2e", "--soak"}),
    ("bench", "soak"): ({"--streams", "--producers", "--seconds", "--json", "--config",
                         "--set"}, {"--configs", "--rounds", "--wal-modes", "--e2e",
                                    "--soak"}),
    ("keys", "generate"): ({"DIR", "--name", "--force"}, {"--json", "--endpoint"}),
}


@pytest.mark.parametrize("command", list(HELP_OPTIONS), ids=" ".join)
def test_each_subcommand_has_its_own_help(command):
    out = streamrnn(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: streamrnn {' '.join(command)} ")
    words = set(re.findall(r"--[a-z][-a-z0-9]*|\b[A-Z]{3,}\b", out.stdout))
    own, others = HELP_OPTIONS[command]
    assert own <= words and not others & words, (own - words, others & words)


@pytest.mark.parametrize("command,modes", [("bench", ("engine", "e2e", "soak", "quality",
                                                      "anomaly")),
                                           ("checkpoint", ("save", "list", "inspect")),
                                           ("keys", ("generate",))])
def test_help_lists_the_modes(command, modes):
    out = streamrnn(command, "--help")
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^    (\w+) ", out.stdout, flags=re.M)
    assert tuple(listed) == modes, out.stdout


@pytest.mark.parametrize("argv,mode", [(["bench", "--e2e"], "e2e"),
                                       (["bench", "--seconds", "2", "--soak"], "soak"),
                                       (["bench", "e2e", "--soak"], "soak")])
def test_old_bench_spellings_are_refused_with_the_new_one(argv, mode):
    out = streamrnn(*argv)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"streamrnn bench: --{mode} is now a mode of its own: streamrnn bench {mode} ... "
        f"(see streamrnn bench {mode} --help)"]


# ---- checkpoints and status --------------------------------------------------------------
def test_checkpoint_list_says_which_folder_is_missing_and_why(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    run = lambda *args, **more: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "streamrnn", "checkpoint", "list", *args], cwd=tmp_path,
        capture_output=True, text=True, timeout=120, env={**env, **more})
    out = run()
    assert out.returncode == 1
    assert f"{tmp_path}/streamrnn-state does not exist" in out.stderr
    assert "the default, ./streamrnn-state (checkpoint.dir is empty, $STATE_DIRECTORY " \
        "not set)" in out.stderr
    assert "streamrnn checkpoint list /var/lib/streamrnn` for the systemd service" \
        in out.stderr
    out = run(STATE_DIRECTORY=str(tmp_path / "state"))
    assert out.returncode == 1 and "it is $STATE_DIRECTORY (checkpoint.dir is empty)" \
        in out.stderr
    config = tmp_path / "c.toml"
    config.write_text(f'[checkpoint]\ndir = "{tmp_path}/elsewhere"\n')
    out = run("--config", str(config))
    assert out.returncode == 1 and f"it is checkpoint.dir in {config}" in out.stderr
    (tmp_path / "empty").mkdir()
    out = run(str(tmp_path / "empty"))
    assert (out.returncode, out.stdout.strip()) == (0, f"no checkpoints in {tmp_path}/empty")


@pytest.fixture
def checkpoints(make_daemon):
    """A state folder with two real checkpoints of a small learner (hidden size 8), the
    newest first: the first holds 3 tokens (log position 3: the start's resume and
    config records, the tokens), the second 6 and the update they made (5)."""
    from inprocess import ask, ask_until_answered
    d, clock, c = make_daemon("model.hidden_size=8")
    paths = []
    for offset in (0, 3):
        ask(d, c, {"type": "tokens", "stream": "s", "offset": offset, "tokens": [1, 2, 3]})
        paths.insert(0, ask_until_answered(d, c, {"type": "checkpoint"})["path"])
    return d.statedir.root, paths


@pytest.mark.parametrize("order", ["json first", "json last"])
def test_checkpoint_inspect_takes_options_in_any_order(checkpoints, order):
    path = checkpoints[1][0]
    out = streamrnn("checkpoint", "inspect", *(
        ["--json", path] if order == "json first" else [path, "--json"]))
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert (row["path"], row["log_positions"], row["updates"], row["version"],
            row["streams"], row["ranks"]) == (path, [5], 1, __version__, 1, 1)
    assert row["config"]["model"]["hidden_size"] == 8 and "error" not in row
    out = streamrnn("checkpoint", "inspect", path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{path}: ") and "log position 5" in out.stdout
    assert re.search(r"^  model: lstm \d+x8, vocab 256", out.stdout, flags=re.M), out.stdout
    assert out.stdout.splitlines()[-1] == f"  version {__version__}"


@pytest.mark.parametrize("order", ["json first", "json last"])
def test_checkpoint_list_takes_options_in_any_order(checkpoints, order):
    folder, paths = str(checkpoints[0]), checkpoints[1]
    out = streamrnn("checkpoint", "list", *(
        ["--json", folder] if order == "json first" else [folder, "--json"]))
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [row["path"] for row in rows] == paths
    assert [row["log_positions"] for row in rows] == [[5], [3]]
    assert [row.get("next_start") for row in rows] == [True, None]
    out = streamrnn("checkpoint", "list", folder + "/checkpoints")  # its folder: the same
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2 and "model:" not in out.stdout
    assert out.stdout.splitlines()[0].endswith("<- the next start loads this one")


def test_status_shows_the_last_checkpoint_readably(tmp_path):
    d = DaemonProcess(tmp_path, []).start()
    try:
        out = streamrnn("status", "--endpoint", d.endpoint)
        assert out.returncode == 0, out.stderr
        assert "last checkpoint none yet" in out.stdout
        out = streamrnn("checkpoint", "save", "--endpoint", d.endpoint, "--timeout", "60")
        assert out.returncode == 0, out.stderr
        # from the daemon's folder, as on its host: the checkpoint's path resolves there
        out = subprocess.run([sys.executable, "-m", "streamrnn", "status", "--endpoint",
                              d.endpoint], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
        line = next(l for l in out.stdout.splitlines() if l.startswith("last checkpoint"))
        assert re.fullmatch(r"last checkpoint \S+/checkpoint-\d+\.json \(log position "
                            r"[\d,]+, written \d+ s ago\)", line), line
    finally:
        assert d.stop() == 0


def test_a_checkpoint_elsewhere_has_no_age_but_says_why():
    from streamrnn.report import format_saved
    text = format_saved({"path": "/nowhere/checkpoint-1.pt", "wal_seq": 1234, "seconds": 0.1})
    assert text == ("/nowhere/checkpoint-1.pt (log position 1,234, age unknown: the file is "
                    "not readable from here)")
    assert "written 3 min ago" in format_saved({"path": "/nowhere/c.pt", "wal_seq": 1,
                                                "created": time.time() - 200})

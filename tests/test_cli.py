"""The command line as a user meets it: real subprocesses, real output."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
    out = streamrnn("bench", "--e2e", "--seconds", "2", "--streams", "4", "--producers", "2",
                    "--set", "model.hidden_size=32", "--json", str(path), timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(path.read_text())
    assert result["engine_tokens_per_s"] > 0 and result["daemon"]["tokens_per_s"] > 0
    assert result["daemon"]["ack_latency_s"]["count"] > 0
    assert "x the engine" in out.stdout and "wal fsync" in out.stdout


@pytest.mark.slow
def test_bench_soak_checks_the_books(tmp_path):
    path = tmp_path / "soak.json"
    out = streamrnn("bench", "--soak", "--seconds", "4", "--streams", "4", "--producers", "2",
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

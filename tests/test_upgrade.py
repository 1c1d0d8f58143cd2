"""A checkpoint written by streamrnn 0.1.0 (tests/data/checkpoint-0.1.0.pt: hidden 8,
embedding 4, that release's defaults otherwise, 8 updates, 512 of 2,998 targets trained)
meets this version: a changed default must not silently change the running model.

Refused with the settings to continue it, named as --set arguments; started with them,
it continues where it stopped, and the learning settings that differ from what it ran
with (keys that did not exist then read as what the code did then) are logged."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from harness import DaemonProcess, RawClient, serve
from streamrnn.client import Producer
from streamrnn.config import config_from_dict, load_config
from streamrnn.core.learner import changed_settings, settings_to_continue

pytestmark = pytest.mark.slow  # every test starts real daemons on old state folders

OLD = Path(__file__).parent / "data" / "checkpoint-0.1.0.pt"
SETTINGS = ["train.flush_after_seconds=0", "checkpoint.interval_seconds=0"]


def test_a_checkpoint_of_the_previous_release_is_refused_with_its_settings_then_continues(
        tmp_path):
    folder = tmp_path / "streamrnn-state" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(OLD, folder / "checkpoint-0000000000000011-000001.pt")
    saved = config_from_dict(torch.load(OLD, weights_only=True)["learner"]["config"])

    today = DaemonProcess(tmp_path, SETTINGS)
    today.start(wait=False)
    assert today.proc.wait(timeout=60) == 2
    current = load_config(overrides=today.overrides)
    hint = settings_to_continue(current, saved)
    assert "--set model.hidden_size=8" in hint and "--set model.embed_dim=4" in hint
    assert f"To continue it, use its settings (`{hint}`" in today.log()

    pinned = [item.removeprefix("--set ") for item in hint.split(" --set ")]
    resumed = DaemonProcess(tmp_path, [*SETTINGS, *pinned], port=today.port).start()
    loaded = next(e for e in resumed.events() if e["event"] == "checkpoint loaded")
    assert (loaded["updates"], loaded["streams"]) == (8, 2)
    changed = changed_settings(saved.train, load_config(overrides=resumed.overrides).train)
    if changed:  # the defaults of the learning settings moved since 0.1.0
        assert "learning settings differ from the saved state's" in resumed.log()
        assert ", ".join(changed) in resumed.log()
    more = b" and so it goes on learning." * 4
    with RawClient(resumed.endpoint) as client:
        assert client.ask({"type": "position", "stream": "prose"})["next_offset"] == 2000
        reply = client.ask({"type": "tokens", "stream": "prose", "offset": 2000,
                            "tokens": list(more)})
        assert reply["type"] == "ack", reply
        assert client.ask({"type": "flush"}, timeout=60)["type"] != "nack"
        deadline = time.monotonic() + 120
        while (status := client.ask({"type": "status"}))["queued_tokens"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
    # every target of both streams trained once: what 0.1.0 left pending, and the new
    assert status["tokens_trained"] == (2000 + len(more) - 1) + (1000 - 1)
    assert resumed.stop() == 0


# ---- state folders that 0.2.0 left ---------------------------------------------------------
STATES = Path(__file__).parent / "data" / "states-0.2.0.tar.gz"  # make_states_0_2_0.py


@pytest.mark.parametrize("name,nproc", [
    ("single-clean", 1), ("single-crashed", 1), ("single-crashed", 2),
    ("single-no-checkpoint", 1), ("cluster-crashed", 2), ("cluster-crashed", 1),
    ("cluster-no-checkpoint", 2)])
def test_a_state_folder_of_0_2_0_is_taken_over_once_and_loses_nothing(tmp_path, name, nproc):
    """Each kind of folder 0.2.0 left (one process or two ranks; stopped cleanly,
    crashed after a checkpoint, crashed before the first) is read once, by one process
    or two ranks: every acknowledged token is there and is trained exactly once; the old
    files are set aside, not deleted; the next start recovers as usual."""
    import tarfile
    with tarfile.open(STATES) as tar:
        tar.extractall(tmp_path, filter="data")
    state = tmp_path / name
    expected = json.loads((state / "expected.json").read_text())
    d = serve(tmp_path, [f"checkpoint.dir={state}", "checkpoint.interval_seconds=0",
                         "train.cpu_threads=1"], nproc).start()
    took_over = [e for e in d.events() if e.get("event") == "took over the state of "
                 "another layout"]
    assert took_over and all(e["legacy"] for e in took_over)
    with Producer(d.endpoint) as producer:
        for stream, acked in expected["acked"].items():
            position = producer.position(stream)
            assert position == acked or (stream in expected["ended"] and position == 0)
        for stream in expected["acked"]:  # every rank flushes its own
            producer.request({"type": "flush", "stream": stream})
        deadline = time.monotonic() + 120
        while (totals := _totals(producer))["queued_tokens"]:
            assert time.monotonic() < deadline, totals
            time.sleep(0.1)
        for stream in expected["ended"]:  # ended streams are forgotten once trained
            assert producer.position(stream) == 0
    assert totals["tokens_trained"] == expected["tokens_trained_when_done"]
    assert not [p for p in ("cluster", "wal", "rank-0-of-2") if (state / p).exists()]
    assert not list(state.glob("checkpoints/checkpoint-*.pt"))
    assert list(state.glob("previous-*/wal")) or list(state.glob("previous-*/rank-0-of-2"))
    assert d.stop() == 0
    again = serve(tmp_path, [f"checkpoint.dir={state}"], nproc).start()
    with Producer(again.endpoint) as producer:
        assert _totals(producer)["tokens_trained"] == expected["tokens_trained_when_done"]
    assert not [e for e in again.events() if e.get("event") == "took over the state of "
                "another layout"][len(took_over):]
    assert again.stop() == 0


def _totals(producer) -> dict:
    if producer.topology().world_size == 1:
        return producer.status()
    return producer.cluster_status()["totals"]

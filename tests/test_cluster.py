"""`streamrnn serve --nproc 2`: two real ranks (gloo, loopback), real sockets and files.

Each test starts torchrun's launcher in a subprocess, as the systemd unit does; the
ranks' own endpoints are the base port and the one after it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import TINY, ClusterProcess, RawClient
from streamrnn.keygroups import owner

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed")

TEXT = (Path(__file__).parent.parent / "README.md").read_bytes()


def streams_on_both(count: int) -> list[str]:
    """Stream ids, half of them owned by each of two ranks."""
    ids = [f"stream-{i}" for i in range(200)]
    by_rank = [[s for s in ids if owner(s, 2) == r][:count // 2] for r in (0, 1)]
    return by_rank[0] + by_rank[1]


def send(cluster: ClusterProcess, stream: str, offset: int, data: bytes) -> dict:
    return cluster.ask(owner(stream, 2), {"type": "tokens", "stream": stream,
                                          "offset": offset, "tokens": data, "width": 1})


def statuses(cluster: ClusterProcess) -> list[dict]:
    return [cluster.ask(r, {"type": "status"}) for r in range(cluster.nproc)]


def wait_trained(cluster: ClusterProcess, timeout: float = 60) -> list[dict]:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = statuses(cluster)
        if all(r["queued_tokens"] == 0 for r in s):
            return s
        for r in range(cluster.nproc):
            cluster.ask(r, {"type": "flush"})
        time.sleep(0.3)
    raise TimeoutError(f"not trained: {statuses(cluster)}")


def committed_totals(state: Path) -> dict:
    """Lifetime totals of the newest committed checkpoint, summed over its parts."""
    manifests = sorted((state / "cluster").glob("manifest-*.json"))
    manifest = json.loads(manifests[-1].read_text())
    parts = [torch.load(state / p["path"], weights_only=True) for p in manifest["parts"]]
    replicated = torch.load(state / manifest["replicated"], weights_only=True)
    return {"step": manifest["step"], "updates": replicated["learner"]["totals"]["updates"],
            "tokens_trained": sum(p["totals"]["tokens_trained"] for p in parts),
            "streams": sum(len(p["streams"]["ids"]) for p in parts),
            "model": replicated["learner"]["model"]}


def test_two_ranks_share_streams_route_checkpoint_and_recover(tmp_path):
    cluster = ClusterProcess(tmp_path, [f"checkpoint.dir={tmp_path / 'state'}"]).start()
    topologies = [cluster.topology(r) for r in (0, 1)]
    assert [t["rank"] for t in topologies] == [0, 1]
    assert all(t["world_size"] == 2 and t["num_groups"] == 256 and
               t["endpoints"] == cluster.endpoints for t in topologies)
    streams = streams_on_both(6)
    sizes = {s: 600 + 100 * i for i, s in enumerate(streams)}
    for stream in streams:
        wrong = 1 - owner(stream, 2)
        moved = cluster.ask(wrong, {"type": "tokens", "stream": stream, "offset": 0,
                                    "tokens": TEXT[:50], "width": 1})
        assert moved["type"] == "nack" and moved["reason"] == "moved"
        assert moved["rank"] == owner(stream, 2)
        assert moved["endpoint"] == cluster.endpoints[owner(stream, 2)]
        assert moved["generation"] == topologies[0]["generation"]
        for offset in range(0, sizes[stream], 100):
            reply = send(cluster, stream, offset, TEXT[offset:offset + 100])
            assert reply["type"] == "ack", reply
    for stream in streams:  # the moved nack acknowledged nothing on the wrong rank
        assert cluster.ask(1 - owner(stream, 2), {"type": "position", "stream": stream}
                           )["reason"] == "moved"
    ranks = wait_trained(cluster)
    assert ranks[0]["updates"] == ranks[1]["updates"] > 0  # every update is global
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]  # one model
    assert [r["streams"] for r in ranks] == [3, 3]
    trained = sum(r["tokens_trained"] for r in ranks)
    assert trained == sum(sizes.values()) - len(streams)  # every target, exactly once
    saved = cluster.ask(1, {"type": "checkpoint"})  # asked of any rank: the cluster's
    assert saved["ok"] and saved["path"].endswith(".json")
    assert cluster.stop() == 0
    stopped = [e for e in cluster.events() if e.get("event") == "stopped"]
    assert sorted(e["rank"] for e in stopped) == [0, 1]
    totals = committed_totals(tmp_path / "state")
    assert totals["tokens_trained"] == trained and totals["streams"] == 6
    assert totals["updates"] == ranks[0]["updates"]

    again = ClusterProcess(tmp_path, [f"checkpoint.dir={tmp_path / 'state'}"]).start()
    ranks_after = statuses(again)
    assert [r["tokens_trained"] for r in ranks_after] == [r["tokens_trained"] for r in ranks]
    assert ranks_after[0]["weights_checksum"] == ranks[0]["weights_checksum"]
    assert ranks_after[0]["generation"] != ranks[0]["generation"]
    for stream in streams:
        position = again.ask(owner(stream, 2), {"type": "position", "stream": stream})
        assert position["next_offset"] == sizes[stream]
    assert again.stop() == 0

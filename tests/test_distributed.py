"""Two ranks under torch.distributed (gloo, real processes) train one model: each rank
its own streams, split by the key-group hash, and every update the one a single process
makes over the union of their windows. Idle ranks, streams at different offsets and
flushes included."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import streamrnn
from distributed_worker import config, play, streams_by_rank
from harness import free_port
from streamrnn.keygroups import DEFAULT_NUM_GROUPS, group_owner, key_group, owner

WORKER = Path(__file__).parent / "distributed_worker.py"


def run_ranks(tmp_path: Path, precision: str, world_size: int = 2) -> list[dict]:
    env = {**os.environ, "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), precision],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(world_size)]
    outputs = []
    try:
        for process in ranks:
            outputs.append(process.communicate(timeout=240)[0])
    finally:
        for process in ranks:  # one rank failed or hung: the others end too
            if process.poll() is None:
                process.kill()
                process.communicate()
    for r, process in enumerate(ranks):
        assert process.returncode == 0, "\n".join(
            f"rank {i} (exit {p.returncode}):\n{out[-2000:]}"
            for i, (p, out) in enumerate(zip(ranks, outputs)))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
            for r in range(world_size)]


def one_process(precision: str):
    learner = streamrnn.Learner(config(precision))
    play(learner, rank=None)
    return learner


@pytest.mark.parametrize("precision,tolerance", [("fp64", 1e-12), ("fp32", 2e-6)])
def test_two_ranks_learn_what_one_process_learns_from_the_union(tmp_path, precision,
                                                                tolerance):
    ranks = run_ranks(tmp_path, precision)
    single = one_process(precision)
    # each rank trained only its own streams, and both made every global update
    assert [r["streams"] for r in ranks] == [sorted(s) for s in streams_by_rank(2)]
    assert ranks[0]["updates"] == ranks[1]["updates"] == single.updates >= 20
    assert sum(r["tokens_trained"] for r in ranks) == single.tokens_trained
    assert sum(r["bits"] for r in ranks) == pytest.approx(single.bits, rel=tolerance)
    for name, p in single.model.state_dict().items():
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name]), name
        diff = (ranks[0]["model"][name].double() - p.double()).abs().max().item()
        assert diff <= tolerance * max(1.0, p.abs().max().item()), (name, diff)


def test_the_comparison_can_fail():
    """A single process that trains one stream less is far from the union model."""
    single = one_process("fp64")
    other = streamrnn.Learner(config("fp64"))
    dropped = streams_by_rank(2)[1][0]
    from distributed_worker import script
    for action, chunk in script():
        if action == "flush":
            other.flush()
        else:
            other.learn_many({s: t for s, t in chunk.items() if s != dropped})
    worst = max((p - other.model.state_dict()[n]).abs().max().item()
                for n, p in single.model.state_dict().items())
    assert worst > 1e-6


def test_key_groups_are_stable_and_contiguous():
    """CRC-32 of the UTF-8 id, not Python's salted hash: the same in every process and
    version; each rank owns one contiguous range of groups."""
    assert key_group("") == 0
    assert key_group("stream-1") == 0xFA837B15 % DEFAULT_NUM_GROUPS  # CRC-32: fixed forever
    for world_size in (1, 2, 3, 7, 256):
        owners = [group_owner(g, world_size) for g in range(DEFAULT_NUM_GROUPS)]
        assert owners == sorted(owners) and set(owners) == set(range(world_size))
    assert {owner(f"s{i}", 4) for i in range(200)} == {0, 1, 2, 3}

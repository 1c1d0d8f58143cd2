"""Two ranks under torch.distributed (gloo, real processes) train one model: each rank
its own streams, split by the key-group hash, and every update the one a single process
makes over the union of their windows (within 1e-12 in float64), and bit for bit the one
two threads make that sum their gradients as gloo does. Idle ranks, streams at
different offsets and flushes included."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import streamrnn
from distributed_worker import config, play, streams_by_rank
from streamrnn.keygroups import DEFAULT_NUM_GROUPS, group_owner, key_group, owner

WORKER = Path(__file__).parent / "distributed_worker.py"


def run_ranks(tmp_path: Path, precision: str, world_size: int = 2) -> list[dict]:
    """torchrun's launcher (--standalone: its own rendezvous on a free port) starting
    `world_size` worker processes, as a cluster is launched."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world_size}", str(WORKER), str(tmp_path), precision]
    launcher = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=240)
    assert launcher.returncode == 0, f"torchrun (exit {launcher.returncode}):\n" \
        f"{launcher.stdout[-3000:]}"
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


class SummingThreads:
    """Two ranks as two threads of this process, summing as gloo's two-rank all-reduce
    does: one addition per element, rank 0's value plus rank 1's. The one-process
    reference for the bitwise comparison (the interface of core/collective.Ranks)."""

    def __init__(self):
        self.barrier = threading.Barrier(2)
        self.slots: list = [None, None]

    def exchange(self, rank: int, value) -> list:
        """Both ranks' values, once both have given theirs."""
        self.slots[rank] = value
        self.barrier.wait()
        both = list(self.slots)
        self.barrier.wait()  # both have read before either writes again
        return both

    def rank(self, rank: int):
        pair = self

        class ThreadRank:
            distributed, world_size = True, 2

            def agree(self, values):
                first, second = pair.exchange(rank, list(values))
                return [a + b for a, b in zip(first, second)]

            def zero_gradients(self, params):
                for p in params:  # fresh gradients from backward: this sum copies them
                    p.grad = None

            def sum_gradients(self, params, loss):
                grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                         for p in params]
                flat = torch.cat([g.reshape(-1) for g in grads] + [
                    loss.reshape(1).to(grads[0].dtype)])
                first, second = pair.exchange(rank, flat)
                total = first + second
                offset = 0
                for p, g in zip(params, grads):
                    p.grad = total[offset:offset + g.numel()].view_as(p)
                    offset += g.numel()
                return total[-1]

        return ThreadRank()


def test_two_gloo_ranks_equal_two_summing_threads_bitwise(tmp_path):
    """Gloo's two-rank sum is exact and repeatable: the ranks' model is, bit for bit, the
    one two threads make that add their gradients the same way."""
    ranks = run_ranks(tmp_path, "fp64")
    pair = SummingThreads()
    learners = [streamrnn.Learner(config("fp64"), pair.rank(r)) for r in range(2)]
    threads = [threading.Thread(target=play, args=(learners[r], r)) for r in range(2)]
    # the ranks compute with one thread each (OMP_NUM_THREADS=1): a kernel's sums may
    # split differently over more threads, and the comparison is bit for bit
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        torch.set_num_threads(num_threads)
    assert learners[0].updates == ranks[0]["updates"]
    for name, p in learners[0].model.state_dict().items():
        assert torch.equal(p, ranks[0]["model"][name]), name


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

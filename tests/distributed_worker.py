"""One rank of a small gloo cluster, for tests/test_distributed.py: trains its share of a
scripted run of streams and saves what it learned.

    torchrun --standalone --nproc-per-node 2 distributed_worker.py OUT PRECISION
"""
from __future__ import annotations

import sys

import numpy as np
import torch

import streamrnn
from streamrnn.keygroups import owner

VOCAB = 11


def config(precision: str):
    return streamrnn.load_config(overrides=[
        f"model.vocab_size={VOCAB}", "model.embed_dim=5", "model.hidden_size=6",
        "model.num_layers=2", "model.skip=true", "train.k1=3", "train.k2=7",
        "train.optimizer=adam", "train.lr=0.02", "train.grad_clip=0.5",
        "train.lr_decay_updates=10", f"train.precision={precision}", "train.device=cpu",
        "train.max_batch_streams=64"])


def streams_by_rank(world_size: int) -> list[list[str]]:
    """Two stream ids owned by each rank, by the key-group hash."""
    mine: list[list[str]] = [[] for _ in range(world_size)]
    for i in range(1000):
        sid = f"stream-{i}"
        if len(mine[owner(sid, world_size)]) < 2:
            mine[owner(sid, world_size)].append(sid)
    return mine


def script(world_size: int = 2):
    """The run, step by step: ("feed", {stream: tokens}) or ("flush", None). Rank 1 is
    idle at first (it has no stream yet), rank 0 later; streams start at different
    times, so windows of unequal length share updates; flushes in between."""
    (a, b), (c, d) = streams_by_rank(world_size)[:2]
    rng = np.random.default_rng(11)
    tokens = lambda n: rng.integers(0, VOCAB, n)
    return [("feed", {a: tokens(17)}),
            ("feed", {a: tokens(6), c: tokens(11)}),
            ("feed", {c: tokens(9), d: tokens(4), a: tokens(2)}),
            ("flush", None),
            ("feed", {d: tokens(12), a: tokens(8), b: tokens(7)}),
            ("feed", {c: tokens(20)}),
            ("feed", {b: tokens(5), d: tokens(9)}),
            ("flush", None)]


def play(learner, rank: int | None, world_size: int = 2) -> None:
    """The script on one rank (its own streams only), or on one process (rank None)."""
    for action, chunk in script(world_size):
        if action == "flush":
            learner.flush()
            continue
        learner.learn_many({sid: t for sid, t in chunk.items()
                            if rank is None or owner(sid, world_size) == rank})


def main(out: str, precision: str) -> None:
    import os
    import torch.distributed as dist
    from streamrnn.core.collective import Ranks
    settings = config(precision)
    ranks = Ranks.from_environment(os.environ, settings.cluster, torch.device("cpu"))
    assert ranks.distributed and ranks.world_size == 2, "started without torchrun?"
    learner = streamrnn.Learner(settings, ranks)
    play(learner, dist.get_rank(), dist.get_world_size())
    torch.save({"model": learner.model.state_dict(), "updates": learner.updates,
                "tokens_trained": learner.tokens_trained, "bits": learner.bits,
                "streams": sorted(learner.streams.ids)},
               f"{out}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""The update rule and its learning-rate schedule, from [train] settings.

The schedule is a pure function of the lifetime update count, which checkpoints keep,
so a replayed update gets the rate it had the first time:

    lr(u) = lr * min(1, (u + 1) / warmup_updates) * max(lr_floor, 1 / sqrt(1 + u / lr_decay_updates))

A stream that never ends cannot be annealed to zero: the decay is 1/sqrt (cmix's, for
one pass over a stream) and stops at lr_floor (a fraction of lr), so after months of
traffic the model still follows the text as it drifts.
"""
from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """The fused implementations: one kernel per step, and they take `found_inf`, so the
    engine can skip a step on the device (engine.py)."""
    if train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=train.lr, fused=True,
                                betas=(train.adam_beta1, train.adam_beta2),
                                eps=train.adam_eps)
    return torch.optim.SGD(model.parameters(), lr=train.lr, fused=True)


def learning_rate(train: TrainConfig, update: int) -> float:
    """The rate of the update with this lifetime index (0 for the first)."""
    warmup = min(1.0, (update + 1) / train.warmup_updates) if train.warmup_updates else 1.0
    decay = 1.0 / math.sqrt(1.0 + update / train.lr_decay_updates) \
        if train.lr_decay_updates else 1.0
    return train.lr * warmup * max(train.lr_floor, decay)


def apply_settings(optimizer: torch.optim.Optimizer, train: TrainConfig) -> None:
    """The optimizer's settings from `train` (a loaded optimizer state brings the ones it
    was saved with; the running config's win)."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (train.adam_beta1, train.adam_beta2)
            group["eps"] = train.adam_eps

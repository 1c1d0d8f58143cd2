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


# torch.optim's group settings, in its state_dict layout (a checkpoint written by a
# torch.optim optimizer loads here, and one written here loads there)
_ADAM_GROUP = {"weight_decay": 0, "amsgrad": False, "maximize": False, "foreach": None,
               "capturable": False, "differentiable": False, "fused": True,
               "decoupled_weight_decay": False}
_SGD_GROUP = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False,
              "maximize": False, "foreach": None, "differentiable": False, "fused": True}


class FusedOptimizer:
    """Adam or plain SGD, each one fused kernel per step that skips itself on the device
    where `found_inf` is 1 (so the engine needs no host sync to drop a poisoned step).

    These are the kernels torch.optim.Adam(fused=True) and SGD(fused=True) call, called
    the same way, so the weights and state are bit for bit theirs (tests/test_optim.py).
    Not torch.optim itself: its Optimizer wraps every method in torch._disable_dynamo,
    whose first call imports torch._dynamo, 1.4 s of a daemon's 2.6 s start on a 2-core
    CPU, and again in every command and test that starts one."""

    def __init__(self, params, kind: str, **settings):
        self.params = list(params)
        if len({(p.device, p.dtype) for p in self.params}) > 1:
            raise ValueError("the fused optimizer needs every parameter on one device "
                             "with one dtype")
        self.kind = kind
        defaults = _ADAM_GROUP if kind == "adam" else _SGD_GROUP
        # one group, as torch.optim's: the engine sets its "lr" before every step
        self.param_groups = [{**settings, **defaults}]
        self.state: dict[int, dict[str, torch.Tensor]] = {}  # by parameter index

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, found_inf: torch.Tensor) -> None:
        """Update the parameters that have a gradient, unless `found_inf` (a float
        scalar on their device) is 1."""
        group = self.param_groups[0]
        indices = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not indices:
            return
        params = [self.params[i] for i in indices]
        grads = [p.grad for p in params]
        if self.kind == "sgd":
            torch._fused_sgd_(params, grads, [], weight_decay=0.0, momentum=0.0,
                              lr=group["lr"], dampening=0.0, nesterov=False,
                              maximize=False, is_first_step=False, grad_scale=None,
                              found_inf=found_inf)
            return
        states = [self.state.get(i) or self._new_adam_state(i) for i in indices]
        steps = [s["step"] for s in states]
        beta1, beta2 = group["betas"]
        # the step count goes up first and back down where the step was skipped, as in
        # torch.optim: the kernel's bias correction sees the count of this step
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(params, grads, [s["exp_avg"] for s in states],
                           [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False,
                           lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=0.0,
                           eps=group["eps"], maximize=False, grad_scale=None,
                           found_inf=found_inf)
        torch._foreach_sub_(steps, [found_inf] * len(steps))

    def _new_adam_state(self, index: int) -> dict[str, torch.Tensor]:
        p = self.params[index]
        state = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        self.state[index] = state
        return state

    def state_dict(self) -> dict:
        """torch.optim's layout; the tensors are the live ones (a saver copies them)."""
        group = {**self.param_groups[0], "params": list(range(len(self.params)))}
        return {"state": {i: dict(s) for i, s in self.state.items()},
                "param_groups": [group]}

    def load_state_dict(self, saved: dict) -> None:
        """Refuses a state saved for other parameters or another update rule, before
        changing anything."""
        groups = saved["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"the optimizer state is for {sum(len(g['params']) for g in groups)}"
                             f" parameters in {len(groups)} group(s), this model has "
                             f"{len(self.params)} in one")
        if ("betas" in groups[0]) != (self.kind == "adam"):
            raise ValueError(f"the optimizer state is not {self.kind}'s")
        state = {}
        for index, saved_state in saved["state"].items():
            p = self.params[int(index)]
            for name, value in saved_state.items():
                if name != "step" and value.shape != p.shape:
                    raise ValueError(f"the optimizer state's {name} for parameter {index} "
                                     f"has shape {tuple(value.shape)}, the parameter "
                                     f"{tuple(p.shape)}")
            state[int(index)] = {
                name: value.to(dtype=torch.float32 if name == "step" else p.dtype,
                               device=p.device)
                for name, value in saved_state.items()}
        self.state = state
        self.param_groups = [{k: v for k, v in groups[0].items() if k != "params"}]


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> FusedOptimizer:
    if train.optimizer == "adam":
        return FusedOptimizer(model.parameters(), "adam", lr=train.lr,
                              betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)
    return FusedOptimizer(model.parameters(), "sgd", lr=train.lr)


def learning_rate(train: TrainConfig, update: int) -> float:
    """The rate of the update with this lifetime index (0 for the first)."""
    warmup = min(1.0, (update + 1) / train.warmup_updates) if train.warmup_updates else 1.0
    decay = 1.0 / math.sqrt(1.0 + update / train.lr_decay_updates) \
        if train.lr_decay_updates else 1.0
    return train.lr * warmup * max(train.lr_floor, decay)


def apply_settings(optimizer: FusedOptimizer, train: TrainConfig) -> None:
    """The optimizer's settings from `train` (a loaded optimizer state brings the ones it
    was saved with; the running config's win)."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (train.adam_beta1, train.adam_beta2)
            group["eps"] = train.adam_eps

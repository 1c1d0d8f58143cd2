"""Several ranks, one model: the collectives behind a global update.

A global update is the update one process would make over the union of every rank's
ready windows. Each rank runs its own windows forward and backward (an idle rank adds
zeros), its loss divided by the GLOBAL number of targets; one SUM all-reduce of a flat
buffer holding every gradient and the rank's summed loss then gives each rank the union
batch's gradient and loss; the same clipping and optimizer step follow everywhere. Not
DDP: it averages over ranks and hangs when a rank has nothing to train.

    agreed = ranks.agree([plan is not None, plan.num_targets if plan else 0])
    if agreed[0]:                        # some rank has a window: every rank steps
        learner.step(plan, global_targets=agreed[1])

On one process (`Ranks()`) both are identities, so the same loop runs unchanged.
"""
from __future__ import annotations

import datetime
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from ..config import ClusterConfig, StartupError


class Ranks:
    def __init__(self, group: dist.ProcessGroup | None = None,
                 control: dist.ProcessGroup | None = None):
        """`group` carries the gradients (NCCL on GPUs, gloo on CPUs); `control` the
        small agreements (gloo: CPU tensors, no device sync), `group` if not given.
        No group: one process. `Ranks(dist.group.WORLD)`: every rank of the default
        process group."""
        self.distributed = group is not None
        self.group, self.control = group, control if control is not None else group
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        # the daemon's metrics: `timer` (its clock, seconds) times each collective, and
        # `observe(kind, seconds)` hears of it, kind "agree" or "gradients". On NCCL the
        # gradient sum is launched, not waited for: that is host time
        self.timer: Callable[[], float] | None = None
        self.observe: Callable[[str, float], None] = lambda kind, seconds: None
        # every gradient, then the loss, in one buffer that the all-reduce sums in place
        self._flat: torch.Tensor | None = None
        self._flat_params: list[torch.Tensor] = []
        self._flat_views: list[int] = []  # where each gradient must be (data_ptr)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], cluster: ClusterConfig,
                         device: torch.device) -> "Ranks":
        """The ranks torchrun started (its RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in
        `environ`), or this process alone when there is no WORLD_SIZE above 1. Gradients
        go over NCCL on a GPU and gloo on a CPU; the agreements always over gloo (CPU
        tensors). A collective that waits cluster.timeout_seconds fails. `device`: this
        rank's own (cuda:LOCAL_RANK on a node of several GPUs)."""
        if int(environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        timeout = datetime.timedelta(seconds=cluster.timeout_seconds)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        if environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = dist.PrefixStore(_attempt_prefix(environ), store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" \
            else dist.group.WORLD
        return cls(dist.group.WORLD, control)

    def agree(self, values: list[int], op: str = "sum") -> list[int]:
        """Each value summed (or its "min" or "max") over the ranks: one small
        all-reduce of int64s."""
        if not self.distributed:
            return list(values)
        started = self._now()
        totals = torch.tensor(values, dtype=torch.int64)
        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                     "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(totals, op=reduce_op, group=self.control)
        self._took("agree", started)
        return totals.tolist()

    def _now(self) -> float:
        return self.timer() if self.timer is not None else 0.0

    def _took(self, kind: str, started: float) -> None:
        if self.timer is not None:
            self.observe(kind, self.timer() - started)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order: for what is exchanged once
        at start (configs, endpoints), not per update."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.control)
        return values

    def zero_gradients(self, params: list[torch.Tensor]) -> None:
        """Before a backward pass of several ranks: every parameter's gradient becomes
        zeros, a view into one flat buffer, which backward adds into in place, so the
        all-reduce of sum_gradients needs no copy (of every gradient, every update)."""
        if self._flat is None or len(params) != len(self._flat_params) or any(
                p is not q for p, q in zip(params, self._flat_params)):
            self._flat = torch.zeros(sum(p.numel() for p in params) + 1,
                                     dtype=params[0].dtype, device=params[0].device)
            self._flat_params, offset = list(params), 0
            for p in params:
                p.grad = self._flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            self._flat_views = [p.grad.data_ptr() for p in params]
            return
        self._flat.zero_()

    def sum_gradients(self, params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Replace every parameter's gradient by its sum over the ranks, in one flat
        all-reduce that also sums `loss` (a scalar); returns the summed loss. The
        gradients are the views zero_gradients made (a rank with nothing to train
        adds its zeros)."""
        if not self.distributed:
            return loss
        started = self._now()
        # backward adds into a gradient that is there, in place; a gradient that is
        # anywhere else would be left out of the sum, silently: refuse (host-side check)
        if [p.grad.data_ptr() if p.grad is not None else 0 for p in params] != \
                self._flat_views:
            raise RuntimeError("the gradients are not the views zero_gradients made")
        flat = self._flat
        flat[-1] = loss.detach()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        self._took("gradients", started)
        return flat[-1]


def weights_checksum(params: list[torch.Tensor]) -> int:
    """A checksum of the parameters' bits (not their values: -0.0 and 0.0 differ), as
    an int64 (sums wrap around): ranks that hold bitwise equal weights get equal ones.
    Note: a device sync and a copy of the weights as int64."""
    total = torch.zeros((), dtype=torch.int64, device=params[0].device)
    for index, p in enumerate(params, 1):
        bits = p.detach().reshape(-1)
        bits = bits.view(torch.int64 if bits.element_size() == 8 else torch.int32)
        bits = bits.to(torch.int64)
        total += index * ((bits * bits).sum() * 31 + bits.sum())
    return int(total)


def _attempt_prefix(environ: Mapping[str, str]) -> str:
    """Where the ranks of this attempt meet in torchrun's agent store, which outlives
    restarts: restarted ranks must not read the addresses of the ranks they replace
    (their first connect fails, and that costs a restart). On one machine the agent's
    restart count names the attempt. On several, an agent that restarts its ranks for
    another machine's failure does not count it, so the counts differ and the ranks
    would never meet: there torchrun must give each attempt a store of its own."""
    if int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])) < int(environ["WORLD_SIZE"]):
        raise StartupError(
            "ranks on several machines need a store of their own for each attempt: use "
            "`streamrnn serve --nnodes`, or start torchrun with --rdzv-backend c10d and "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment on every machine")
    return f"streamrnn/attempt-{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"

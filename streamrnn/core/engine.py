"""One exact TBPTT(k1, k2) update for a batch of windows from many streams.

    start states  h(s) gathered from the pools            (layers, B, hidden)
    segment A     [s, p) from h(s)     -> h(p), kept as the next start state
    segment B     [p, e) from h(p)     (gradient flows back through h(p) into A)
    loss          mean cross-entropy of the newest n targets of every window
    backward      (several ranks: the loss over the global target count, then the
                  gradients summed over the ranks: core/collective.py)
    clip, optimizer step (skipped on the device if the loss or gradient is not
                  finite); then h(p), detached, scattered into the pools

Each segment is one fused sequence call (cuDNN on a GPU) for all streams in it; windows
of unequal length (young streams, flushes) go through as a packed sequence, which gives
every stream its state at its own length. The head runs only on the rows that carry a
loss: k1 of the k2 window positions.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .model import RecurrentLM, State
from .collective import Ranks
from .geometry import Batch, Geometry
from .optim import FusedOptimizer


class Engine:
    def __init__(self, model: RecurrentLM, optimizer: FusedOptimizer,
                 grad_clip: float, precision: str, device: torch.device,
                 ranks: Ranks | None = None):
        self.model, self.optimizer = model, optimizer
        self.ranks = ranks if ranks is not None else Ranks()  # who else takes this step
        self.grad_clip = grad_clip
        self.device = device
        self.bf16 = precision == "bf16"
        self.last_grad_norm: torch.Tensor | None = None  # device scalar; read it lazily

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step(self, batch: Batch | None, pools: State, num_targets: int | None = None,
             score: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Train one batch; returns the summed cross-entropy (nats) of its targets,
        computed before the weights changed, and 1.0 if the step was skipped (the loss
        or the gradient was not finite) else 0.0: device scalars, no host sync. With
        `score`, also each target's scores from the same logits (see `target_scores`),
        else None.
        With several ranks, the loss is divided by `num_targets`, the targets of every
        rank's batch, and the gradients are summed over the ranks before the step; a
        rank with nothing to train passes batch None and adds zeros."""
        params = list(self.model.parameters())
        if self.ranks.distributed:
            self.ranks.zero_gradients(params)  # views into the all-reduce's buffer
        else:
            self.optimizer.zero_grad()
        scores = None
        if batch is None:
            total_ce, at_p, slots = torch.zeros((), device=self.device), None, None
        else:
            total_ce, at_p, slots, scores = self._forward(batch, pools, score)
            (total_ce / (num_targets or batch.num_targets)).backward()
        if self.ranks.distributed:
            summed_ce = self.ranks.sum_gradients(params, total_ce.detach())
        else:
            params, summed_ce = [p for p in params if p.grad is not None], total_ce
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.last_grad_norm = norm
        # a NaN or infinite loss or gradient must reach neither the weights nor the
        # optimizer state; the fused step skips itself where found_inf is 1, on the
        # device, as under GradScaler: no host sync to decide
        skipped = (~torch.isfinite(summed_ce) | ~torch.isfinite(norm)).float()
        self.optimizer.step(found_inf=skipped)
        if at_p is not None:
            with torch.no_grad():
                for pool, state in zip(pools, at_p):
                    # scatter the next start states; a non-finite one (from a poisoned
                    # forward) would stay in its stream for good: it starts from zeros
                    pool[:, slots] = torch.nan_to_num(state, nan=0.0, posinf=0.0,
                                                      neginf=0.0).to(pool.dtype)
        return total_ce.detach(), skipped, scores

    def _forward(self, batch: Batch, pools: State, score: bool = False):
        """The summed cross-entropy of the batch's targets, the next start states, the
        batch's pool slots on the device, and the targets' scores if asked for."""
        g = batch.geometry
        rows_a, rows_b, loss_rows, token_index = self._geometry_on_device(g)
        slots, windows = self._upload(batch.slots, batch.windows)
        tokens = windows.take(token_index)  # inputs A, inputs B, targets: a device gather
        size_a, size_b = g.shape_a[0] * g.shape_a[1], g.shape_b[0] * g.shape_b[1]
        tokens_a = tokens[:size_a].view(g.shape_a)
        tokens_b = tokens[size_a:size_a + size_b].view(g.shape_b)
        targets = tokens[size_a + size_b:]
        start = tuple(pool[:, slots] for pool in pools)  # gather (layers, B, hidden)
        num_streams = batch.num_streams

        with self.autocast():
            outputs = []
            at_p = start
            if len(g.rows_a):
                y_a, at_a = self._segment(tokens_a, g.lengths_a,
                                          _rows(start, rows_a, num_streams))
                at_p = at_a if len(g.rows_a) == num_streams else tuple(
                    s.index_copy(1, rows_a, a.to(s.dtype)) for s, a in zip(start, at_a))
                outputs.append(y_a.flatten(0, 1))
            if len(g.rows_b):
                y_b, _ = self._segment(tokens_b, g.lengths_b,
                                       _rows(at_p, rows_b, num_streams))
                outputs.append(y_b.flatten(0, 1))
            logits = self.model.head(_loss_rows(outputs, g, loss_rows))  # (targets, vocab)
        if logits.dtype == torch.bfloat16:
            logits = logits.float()  # the loss in float32 even under bf16 autocast
        scores = target_scores(logits.detach(), targets) if score else None
        return F.cross_entropy(logits, targets, reduction="sum"), at_p, slots, scores

    def _segment(self, tokens: torch.Tensor, lengths: np.ndarray, state: State):
        """Run the recurrent layers over (T, n) tokens from `state`; returns the top
        layer's outputs (T, n, hidden) and each stream's state after its own length."""
        x = self.model.embed(tokens)
        rnn_state = self.model.from_tuple(state)
        if lengths.min() == lengths.max():  # the common case: one dense fused call
            y, rnn_state = self.model.recur(x, rnn_state)
        else:
            packed = pack_padded_sequence(x, torch.from_numpy(lengths), enforce_sorted=False)
            y, rnn_state = self.model.recur(packed, rnn_state)
            y, _ = pad_packed_sequence(y, total_length=tokens.shape[0])
        return y, self.model.to_tuple(rnn_state)

    def _geometry_on_device(self, g: Geometry) -> list[torch.Tensor]:
        """rows_a, rows_b, loss_rows, token_index on the device, uploaded once per
        geometry."""
        if self.device not in g.device:
            g.device[self.device] = self._upload(g.rows_a, g.rows_b, g.loss_rows,
                                                 g.token_index)
        return g.device[self.device]

    def _upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Integer arrays to the device in one copy."""
        flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.int64)
        host = torch.from_numpy(flat)
        if self.device.type == "cuda":
            host = host.pin_memory()
        on_device = host.to(self.device, non_blocking=True)
        return list(on_device.split([a.size for a in arrays]))


def _loss_rows(outputs: list[torch.Tensor], g: Geometry, loss_rows: torch.Tensor):
    """The output rows that predict the targets, (targets, hidden). In steady state they
    are the tail of one segment's output: a view, no copy."""
    if g.loss_span is not None:
        begin, end = g.loss_span
        for y in outputs:
            if end <= len(y):
                return y[begin:end]
            begin, end = begin - len(y), end - len(y)
            if begin < 0:
                break
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return y.index_select(0, loss_rows)


def target_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(3, targets) float32: each target's bits (-log2 of its probability), the most
    likely token there, and that token's probability. From the logits the loss came
    from, apart from it: the loss and its gradient stay exactly what they are without
    scores, so a watched stream trains (and replays) bit for bit as an unwatched one.
    Costs one more pass over the (targets, vocab) logits, only when asked."""
    log_norm = logits.logsumexp(-1)
    top, expected = logits.max(-1)
    nats = log_norm - logits.gather(1, targets[:, None])[:, 0]
    return torch.stack([nats / math.log(2), expected.float(),
                        (top - log_norm).exp()]).float()


def _rows(state: State, rows: torch.Tensor, num_streams: int) -> State:
    if len(rows) == num_streams:  # every stream: no gather needed
        return state
    return tuple(s.index_select(1, rows) for s in state)


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)

"""An explicitly unrolled float64 TBPTT(k1, k2), written from the semantics alone
(README, "The exact semantics").

It shares nothing with the engine but the initial weights: its own gate equations, its
own token bookkeeping, one cell step at a time, its own SGD and Adam, its own gradient
clipping. Slow and obvious on purpose.
"""
from __future__ import annotations

import math

import torch


def lstm_cell(x, state, w_ih, w_hh, b_ih, b_hh):
    h, c = state
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, (h, c)


def gru_cell(x, state, w_ih, w_hh, b_ih, b_hh):
    (h,) = state
    xr, xz, xn = (x @ w_ih.T + b_ih).chunk(3, dim=-1)
    hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    h = (1 - z) * n + z * h
    return h, (h,)


class ReferenceTBPTT:
    def __init__(self, initial_params: dict[str, torch.Tensor], kind: str, num_layers: int,
                 hidden: int, k1: int, k2: int, optimizer: str, lr: float, grad_clip: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr_at=None, skip: bool = False):
        self.params = {name: p.detach().double().clone().requires_grad_()
                       for name, p in initial_params.items()}
        self.cell = lstm_cell if kind == "lstm" else gru_cell
        self.num_state = 2 if kind == "lstm" else 1
        self.num_layers, self.hidden = num_layers, hidden
        self.k1, self.k2 = k1, k2
        self.optimizer, self.lr, self.grad_clip = optimizer, lr, grad_clip
        self.betas, self.eps = betas, eps
        self.skip = skip
        # lr_at(u): the rate of update u (0 first), written out by the test from the
        # formula in the README; None: constant lr
        self.lr_at = lr_at or (lambda update: lr)
        self.num_updates = 0
        self.adam_m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.adam_v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.adam_t = 0
        self.tokens: dict[str, list[int]] = {}
        self.trained: dict[str, int] = {}     # e: targets x_1..x_e done
        self.start: dict[str, int] = {}       # s: position of the stored state
        self.start_state: dict[str, list] = {}  # per layer: tuple of (hidden,) tensors
        self.step_bits: list[float] = []
        # (stream, offset) -> (bits, most likely token, its probability) of each target,
        # under the weights before the update that trained it
        self.target_scores: dict[tuple[str, int], tuple[float, int, float]] = {}

    def zero_state(self):
        return [tuple(torch.zeros(self.hidden, dtype=torch.float64)
                      for _ in range(self.num_state)) for _ in range(self.num_layers)]

    def feed(self, tokens_by_stream: dict[str, list[int]]) -> None:
        for sid, tokens in tokens_by_stream.items():
            if sid not in self.tokens:
                self.tokens[sid], self.trained[sid], self.start[sid] = [], 0, 0
                self.start_state[sid] = self.zero_state()
            self.tokens[sid].extend(int(t) for t in tokens)
        while True:  # every update that became possible: each ready stream's oldest window
            ready = {sid: self.k1 for sid in self.tokens
                     if len(self.tokens[sid]) - 1 - self.trained[sid] >= self.k1}
            if not ready:
                return
            self.update(ready)

    def flush(self) -> None:
        self.feed({})
        rest = {sid: len(t) - 1 - self.trained[sid] for sid, t in self.tokens.items()}
        rest = {sid: r for sid, r in rest.items() if r > 0}
        if rest:
            self.update(rest)

    def step_layers(self, token: int, state: list):
        """One position through the layers; returns the head's input and the state.
        With skip, layer l > 0 reads [embedding, output of l - 1] and the head reads
        [embedding, output of every layer]."""
        embedded = self.params["embed.weight"][token]
        x, outputs, new_state = embedded, [], []
        for layer in range(self.num_layers):
            name = (f"layers.{layer}.{{}}_l0" if self.skip else f"rnn.{{}}_l{layer}").format
            out, layer_state = self.cell(x, state[layer], self.params[name("weight_ih")],
                                         self.params[name("weight_hh")],
                                         self.params[name("bias_ih")],
                                         self.params[name("bias_hh")])
            outputs.append(out)
            new_state.append(layer_state)
            x = torch.cat([embedded, out]) if self.skip else out
        return (torch.cat([embedded, *outputs]) if self.skip else out), new_state

    def update(self, n_by_stream: dict[str, int]) -> None:
        total_loss = torch.zeros((), dtype=torch.float64)
        num_targets = 0
        next_states = {}
        for sid, n in n_by_stream.items():
            x = self.tokens[sid]
            s, e = self.start[sid], self.trained[sid] + n
            next_start = max(0, e + self.k1 - self.k2)
            state = self.start_state[sid]  # detached: gradients stop at the window start
            if next_start == s:
                next_states[sid] = state
            for t in range(s, e):
                out, state = self.step_layers(x[t], state)
                if t + 1 == next_start:
                    next_states[sid] = [tuple(v.detach() for v in ls) for ls in state]
                if t >= e - n:  # the newest n targets carry the loss
                    logits = out @ self.params["head.weight"].T + self.params["head.bias"]
                    log_p = torch.log_softmax(logits, -1)
                    total_loss = total_loss - log_p[x[t + 1]]
                    self.target_scores[(sid, t + 1)] = (
                        -log_p[x[t + 1]].item() / math.log(2), int(log_p.argmax()),
                        log_p.max().exp().item())
                    num_targets += 1
            self.trained[sid], self.start[sid] = e, next_start
        self.step_bits.append(total_loss.item() / math.log(2))
        grads = torch.autograd.grad(total_loss / num_targets, list(self.params.values()))
        self.apply(dict(zip(self.params, grads)), self.lr_at(self.num_updates))
        self.num_updates += 1
        self.start_state.update(next_states)

    @torch.no_grad()
    def apply(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        if self.grad_clip > 0:
            norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
            scale = min(1.0, self.grad_clip / (norm.item() + 1e-6))
            grads = {n: g * scale for n, g in grads.items()}
        if self.optimizer == "sgd":
            for name, p in self.params.items():
                p -= lr * grads[name]
            return
        (b1, b2), eps = self.betas, self.eps
        self.adam_t += 1
        for name, p in self.params.items():
            g = grads[name]
            self.adam_m[name] = b1 * self.adam_m[name] + (1 - b1) * g
            self.adam_v[name] = b2 * self.adam_v[name] + (1 - b2) * g * g
            m_hat = self.adam_m[name] / (1 - b1 ** self.adam_t)
            v_hat = self.adam_v[name] / (1 - b2 ** self.adam_t)
            p -= lr * m_hat / (v_hat.sqrt() + eps)

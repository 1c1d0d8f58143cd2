"""Sampling a continuation of a stream, a slice at a time.

The daemon cannot hold its loop for a whole generate request (4,096 tokens take
seconds on a CPU; acks, training and the watchdog's pings would wait), so a generation
advances in slices between turns of the loop. It samples from a copy of the weights and
of the stream's state taken when it was asked for, so its tokens are those of one model
whatever trains meanwhile: the ones an in-one-go generate would have given at that
moment. The copy costs one model's memory per generation in progress (the daemon
bounds how many run at once).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch

from .model import RecurrentLM, State


class Generation:
    def __init__(self, model: RecurrentLM, history: torch.Tensor | None, state: State | None,
                 num_tokens: int, temperature: float, seed: int,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        """`history`: the stream's tokens since `state` (None for a stream with none:
        the first token is drawn uniformly). Both are copied by the caller."""
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.device = next(self.model.parameters()).device
        self.history, self.state = history, state
        self.num_tokens, self.temperature = num_tokens, temperature
        self.autocast = autocast
        self.generator = torch.Generator().manual_seed(seed)
        self.logits: torch.Tensor | None = None
        self.tokens: list[int] = []

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.num_tokens

    @torch.no_grad()
    def advance(self, pause: Callable[[], bool] = lambda: False) -> bool:
        """Sample until every token is there (True) or `pause()` says so (the daemon's
        time budget; asked after each token, so a slice makes one at least; the first
        also runs the model over the history)."""
        if self.logits is None:
            self._start()
        while not self.done:
            probs = torch.softmax(self.logits[-1, 0].float().cpu() / self.temperature, dim=-1)
            self.tokens.append(int(torch.multinomial(probs, 1, generator=self.generator)))
            if self.done:
                break
            self._feed(torch.tensor([[self.tokens[-1]]], device=self.device))
            if pause():
                break
        return self.done

    def _start(self) -> None:
        if self.history is None:
            vocab = self.model.config.vocab_size
            self.logits = torch.zeros(1, 1, vocab)
        else:
            self._feed(self.history.to(self.device)[:, None])
            self.history = None

    def _feed(self, tokens: torch.Tensor) -> None:
        with self.autocast():
            self.logits, self.state = self.model(tokens, self.state)

"""The language model: token embedding -> LSTM or GRU -> linear head over the vocabulary.

`forward(x, state)` follows torch.nn conventions: x is a LongTensor (T, B), logits come
back as (T, B, vocab), and the state is what nn.LSTM / nn.GRU take and return ((h, c) for
an LSTM, h for a GRU, each (num_layers, B, hidden)); None means zeros.

Inside streamrnn the state is handled as a tuple of tensors, `(h, c)` or `(h,)`, so that
code which gathers, scatters and stores states works for both cells alike.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig

State = tuple[torch.Tensor, ...]


class RecurrentLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        cell = {"lstm": nn.LSTM, "gru": nn.GRU}[config.kind]
        # sequence-first layout: cuDNN's native one, and a window is (T, B)
        self.rnn = cell(config.embed_dim, config.hidden_size, config.num_layers)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    @property
    def num_state_tensors(self) -> int:
        return 2 if isinstance(self.rnn, nn.LSTM) else 1

    def forward(self, x: torch.Tensor, state=None):
        y, state = self.recur(self.embed(x), state)
        return self.head(y), state

    def recur(self, x, state):
        """The recurrent layers on embedded inputs (a tensor or a PackedSequence), always
        in the parameters' own precision, even inside autocast: under CUDA autocast the
        cuDNN RNN runs in float16 whatever dtype was asked for (PyTorch's wrapper
        hard-codes half), and float16 without loss scaling flushes the small gradients
        of a loss averaged over thousands of targets to zero. So precision bf16 covers
        the embedding and the head; the recurrence stays float32 (TF32 on cuDNN)."""
        with torch.autocast(self.head.weight.device.type, enabled=False):
            return self.rnn(x, state)

    def to_tuple(self, state) -> State:
        """nn.LSTM/nn.GRU state -> (h, c) or (h,)."""
        return tuple(state) if isinstance(state, (tuple, list)) else (state,)

    def from_tuple(self, state: State):
        """(h, c) or (h,) -> what nn.LSTM/nn.GRU take."""
        return state if len(state) == 2 else state[0]

    def zero_state(self, batch: int, device=None, dtype=None) -> State:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return tuple(torch.zeros(shape, device=device, dtype=dtype)
                     for _ in range(self.num_state_tensors))

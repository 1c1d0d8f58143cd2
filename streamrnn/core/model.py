"""The language model: token embedding -> LSTM or GRU -> linear head over the vocabulary.

With model.skip, every layer above the first also sees the embedding, and the head sees
the embedding and every layer's output (as the online compressors do): the head learns
byte-pair statistics from the embedding directly while the recurrence learns context,
and deeper layers train without their gradient going through the layers below. The
layers are then separate modules, each still one fused (cuDNN) call.

`forward(x, state)` follows torch.nn conventions: x is a LongTensor (T, B), logits come
back as (T, B, vocab), and the state is what nn.LSTM / nn.GRU take and return ((h, c) for
an LSTM, h for a GRU, each (num_layers, B, hidden)); None means zeros.

Inside streamrnn the state is handled as a tuple of tensors, `(h, c)` or `(h,)`, so that
code which gathers, scatters and stores states works for both cells alike.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from torch.nn.utils.rnn import PackedSequence

from ..config import ModelConfig

State = tuple[torch.Tensor, ...]


class RecurrentLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        cell = {"lstm": nn.LSTM, "gru": nn.GRU}[config.kind]
        embed, hidden, layers = config.embed_dim, config.hidden_size, config.num_layers
        # sequence-first layout: cuDNN's native one, and a window is (T, B)
        if config.skip:
            self.layers = nn.ModuleList(cell(embed + (hidden if i else 0), hidden, 1)
                                        for i in range(layers))
            self.head = nn.Linear(embed + layers * hidden, config.vocab_size)
        else:
            self.rnn = cell(embed, hidden, layers)
            self.head = nn.Linear(hidden, config.vocab_size)

    @property
    def num_state_tensors(self) -> int:
        return 2 if self.config.kind == "lstm" else 1

    def forward(self, x: torch.Tensor, state=None):
        y, state = self.recur(self.embed(x), state)
        return self.head(y), state

    def recur(self, x, state):
        """The recurrent layers on embedded inputs (a tensor or a PackedSequence), always
        in the parameters' own precision, even inside autocast: under CUDA autocast the
        cuDNN RNN runs in float16 whatever dtype was asked for (PyTorch's wrapper
        hard-codes half), and float16 without loss scaling flushes the small gradients
        of a loss averaged over thousands of targets to zero. So precision bf16 covers
        the embedding and the head; the recurrence stays float32 (TF32 on cuDNN).
        Returns what the head reads (the top layer's output; with skip, the embedding
        and every layer's output side by side) and the new state."""
        with torch.autocast(self.head.weight.device.type, enabled=False):
            if not self.config.skip:
                return self.rnn(x, state)
            return self._recur_with_skips(x, state)

    def _recur_with_skips(self, x, state):
        states = [None] * len(self.layers) if state is None else list(zip(*(
            s.split(1) for s in self.to_tuple(state))))
        features, layer_in, new_states = [x], x, []
        for layer, layer_state in zip(self.layers, states):
            y, layer_state = layer(layer_in, None if layer_state is None
                                   else self.from_tuple(layer_state))
            new_states.append(self.to_tuple(layer_state))
            features.append(y)
            layer_in = _cat([x, y])
        new_state = tuple(torch.cat(parts) for parts in zip(*new_states))
        return _cat(features), self.from_tuple(new_state)

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


def _cat(parts: list):
    """Tensors, or PackedSequences of one packing, side by side in the feature dim."""
    if not isinstance(parts[0], PackedSequence):
        return torch.cat(parts, dim=-1)
    first = parts[0]
    return PackedSequence(torch.cat([p.data for p in parts], dim=-1), first.batch_sizes,
                          first.sorted_indices, first.unsorted_indices)

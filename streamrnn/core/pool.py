"""Where the streams' window-start states live: on the device for the streams in use, up
to `max_resident`; the others in host memory until they speak again.

The device side is one tensor (num_layers, capacity, hidden) per state tensor (h, and c
for an LSTM); an update gathers its streams' states by slot and scatters the new ones
back (engine.py). When a stream that is not resident needs a slot and all are taken,
the least recently used resident stream (by a logical clock that advances with the
table's events, so a replay of the log makes the same choices) moves to host memory.
A stream never resident has the zero state.
"""
from __future__ import annotations

import numpy as np
import torch


class StatePool:
    def __init__(self, shape: tuple[int, int], num_tensors: int, device: torch.device,
                 dtype: torch.dtype, max_resident: int):
        self.shape, self.num_tensors = shape, num_tensors
        self.device, self.dtype = device, dtype
        self.max_resident = max_resident
        layers, hidden = shape
        self.tensors: tuple[torch.Tensor, ...] = tuple(
            torch.zeros((layers, 0, hidden), device=device, dtype=dtype)
            for _ in range(num_tensors))
        self.slot_of_row = np.zeros(0, np.int64)   # -1: not resident
        self.row_of_slot = np.zeros(0, np.int64)   # -1: free
        self.last_used = np.zeros(0, np.int64)     # logical clock, per row
        self.host: dict[int, tuple[torch.Tensor, ...]] = {}  # spilled states (layers, hidden)
        self.clock = 0

    @property
    def num_resident(self) -> int:
        return int((self.row_of_slot >= 0).sum())

    @property
    def num_spilled(self) -> int:
        return len(self.host)

    def add_rows(self, count: int) -> None:
        self.slot_of_row = np.concatenate([self.slot_of_row, np.full(count, -1)])
        self.last_used = np.concatenate([self.last_used, np.zeros(count, np.int64)])

    def touch(self, rows) -> None:
        self.clock += 1
        self.last_used[rows] = self.clock

    def slots(self, rows: np.ndarray) -> np.ndarray:
        """Device slots of `rows` (at most max_resident of them), bringing back the ones
        that are not resident and moving least recently used others out to make room."""
        missing = rows[self.slot_of_row[rows] < 0]
        if len(missing):
            free = np.flatnonzero(self.row_of_slot < 0)
            if len(free) < len(missing):
                self._grow(min(self.max_resident, max(16, 2 * len(self.row_of_slot),
                                                      len(self.row_of_slot) + len(missing))))
                free = np.flatnonzero(self.row_of_slot < 0)
            if len(free) < len(missing):
                free = np.concatenate([free, self._evict(len(missing) - len(free), rows)])
            self._bring_in(missing, free[:len(missing)])
        return self.slot_of_row[rows]

    def drop(self, row: int) -> None:
        """Forget the row's state (its slot, if any, is free for another stream)."""
        slot = self.slot_of_row[row]
        if slot >= 0:
            self.row_of_slot[slot] = -1
        self.slot_of_row[row], self.last_used[row] = -1, 0
        self.host.pop(row, None)

    def move(self, source: int, target: int) -> None:
        """The state of row `source` becomes row `target`'s (target was dropped)."""
        slot = self.slot_of_row[source]
        self.slot_of_row[target], self.last_used[target] = slot, self.last_used[source]
        if slot >= 0:
            self.row_of_slot[slot] = target
        if source in self.host:
            self.host[target] = self.host.pop(source)
        self.slot_of_row[source], self.last_used[source] = -1, 0

    def state(self, row: int) -> tuple[torch.Tensor, ...]:
        """The row's state, (layers, 1, hidden) each, on the device, without moving it."""
        slot = self.slot_of_row[row]
        if slot >= 0:
            # contiguous: with several layers the slice is strided, and cuDNN refuses a
            # strided initial state ("hx is not contiguous"); the CPU kernels accept it
            return tuple(t[:, slot:slot + 1].contiguous() for t in self.tensors)
        saved = self.host.get(row)
        if saved is None:
            return tuple(torch.zeros((self.shape[0], 1, self.shape[1]), device=self.device,
                                     dtype=self.dtype) for _ in range(self.num_tensors))
        return tuple(s[:, None].to(self.device) for s in saved)

    def _evict(self, count: int, keep: np.ndarray) -> np.ndarray:
        resident = np.flatnonzero(self.slot_of_row >= 0)
        resident = resident[~np.isin(resident, keep)]
        if len(resident) < count:
            raise RuntimeError("more streams in one update than max_resident_streams")
        order = np.lexsort((resident, self.last_used[resident]))
        out_rows = resident[order[:count]]
        out_slots = self.slot_of_row[out_rows]
        index = torch.from_numpy(out_slots).to(self.device)
        saved = [t.index_select(1, index).cpu() for t in self.tensors]  # one copy per tensor
        for i, row in enumerate(out_rows.tolist()):
            self.host[row] = tuple(s[:, i].clone() for s in saved)
        self.slot_of_row[out_rows] = -1
        self.row_of_slot[out_slots] = -1
        return out_slots

    def _bring_in(self, rows: np.ndarray, slots: np.ndarray) -> None:
        layers, hidden = self.shape
        values = [torch.zeros((layers, len(rows), hidden), dtype=self.dtype)
                  for _ in range(self.num_tensors)]
        for i, row in enumerate(rows.tolist()):
            saved = self.host.pop(row, None)
            if saved is not None:
                for value, s in zip(values, saved):
                    value[:, i] = s
        index = torch.from_numpy(slots).to(self.device)
        for tensor, value in zip(self.tensors, values):
            tensor.index_copy_(1, index, value.to(self.device))
        self.slot_of_row[rows] = slots
        self.row_of_slot[slots] = rows

    def _grow(self, capacity: int) -> None:
        extra = capacity - len(self.row_of_slot)
        if extra <= 0:
            return
        layers, hidden = self.shape
        self.tensors = tuple(torch.cat([t, torch.zeros((layers, extra, hidden),
                                                       device=self.device, dtype=self.dtype)],
                                       dim=1) for t in self.tensors)
        self.row_of_slot = np.concatenate([self.row_of_slot, np.full(extra, -1)])

    # ---- persistence -------------------------------------------------------------------
    def state_dict(self, num_rows: int) -> dict:
        host_rows = sorted(self.host)
        return {
            "tensors": [t.cpu() for t in self.tensors],
            "slot_of_row": torch.from_numpy(self.slot_of_row[:num_rows].copy()),
            "last_used": torch.from_numpy(self.last_used[:num_rows].copy()),
            "host_rows": torch.tensor(host_rows, dtype=torch.int64),
            "host": [torch.stack([self.host[r][k] for r in host_rows], dim=1) if host_rows
                     else torch.zeros((self.shape[0], 0, self.shape[1]), dtype=self.dtype)
                     for k in range(self.num_tensors)],
            "clock": self.clock,
        }

    def load_state_dict(self, state: dict, num_rows: int) -> None:
        capacity = state["tensors"][0].shape[1]
        self.__init__(self.shape, self.num_tensors, self.device, self.dtype, self.max_resident)
        self.add_rows(num_rows)
        self._grow(capacity)
        self.tensors = tuple(t.to(self.device, self.dtype).contiguous()
                             for t in state["tensors"])
        self.slot_of_row[:] = state["slot_of_row"].numpy()
        self.last_used[:] = state["last_used"].numpy()
        resident = np.flatnonzero(self.slot_of_row >= 0)
        self.row_of_slot[self.slot_of_row[resident]] = resident
        for i, row in enumerate(state["host_rows"].tolist()):
            self.host[row] = tuple(h[:, i].clone().to(self.dtype) for h in state["host"])
        self.clock = int(state["clock"])

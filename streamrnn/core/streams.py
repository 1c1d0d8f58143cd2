"""StreamTable: where every stream stands, and which windows train next. Never calls the model.

A stream's tokens x_0, x_1, ... get positions 0, 1, ... Per stream (per *row*) it keeps
  num_tokens   N: tokens x_0 .. x_{N-1} are in the ring
  trained_end  e: targets x_1 .. x_e are trained (input x_t predicts target x_{t+1})
  start_pos    s: position of the stored window-start state h(s); always s <= e
and the tokens x_s .. x_{N-1} in a host ring buffer, one line per row. Tokens that do not
fit yet wait in an overflow queue and move into the ring when a stream's ring runs short
of a window (every few windows, not every update: this loop is per stream, in Python).
Each ring line ends with a copy of its first k2 + 1 columns, so that every window is one
contiguous slice of its line: a batch's tokens are B slices, gathered in one numpy call.

The window-start states live in a StatePool (pool.py): device tensors indexed by slot
for the streams in use, host memory for idle ones beyond train.max_resident_streams.
Forming a batch is a gather by slot, committing it a scatter (engine.py).

`ready` plans one update of exact TBPTT(k1, k2) (README, "The exact semantics"): for each
chosen stream a window of inputs [s, e) with e = trained_end + n (n = k1, or the r < k1
left of a stream whose flush was asked for), loss on the newest n targets, and the next
start state taken at
p = max(0, e + k1 - k2). The window is split at p into segment A = [s, p) and segment
B = [p, e), so the forward pass hands over h(p) between two fused sequence calls.
Everything here is numpy on the host: tokens are small, the per-step planning is
vectorized over streams, and one upload per step moves it all to the device.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Hashable

import numpy as np
import torch

from .geometry import Batch, Geometry, plan_geometry
from .pool import StatePool

StreamId = Hashable


@dataclass(frozen=True)
class Plan:
    """One update to run: which streams, and how many targets each trains."""
    rows: np.ndarray  # (B,) rows in the table, ascending
    n: np.ndarray     # (B,) k1, or the r < k1 left on a flush

    @property
    def num_targets(self) -> int:
        return int(self.n.sum())


class StreamTable:
    def __init__(self, k1: int, k2: int, state_shape: tuple[int, int], num_state_tensors: int,
                 device: torch.device, dtype: torch.dtype, max_resident: int = 1 << 30,
                 capacity: int = 16, line_token: int = -1):
        self.k1, self.k2 = k1, k2
        # lines: `lines` counts the line_token among each stream's trained tokens (its
        # first token included), so a score record can say which line of its stream a
        # line is, after a restart too (-1: no lines)
        self.line_token = line_token
        self.lines = np.zeros(0, np.int64)
        # the ring holds a window's k2 + 1 tokens plus room for the next few windows;
        # `ring` has ring_width columns and then the copy of the first k2 + 1
        self.ring_width = k2 + 1 + 4 * k1
        self.mirrored = k2 + 1
        self.state_shape = state_shape  # (num_layers, hidden)
        self.device, self.dtype = device, dtype
        self.num_state_tensors = num_state_tensors
        self.max_resident = max_resident
        self.row_of: dict[StreamId, int] = {}
        self.ids: list[StreamId] = []
        self.num_tokens = np.zeros(0, np.int64)
        self.trained_end = np.zeros(0, np.int64)
        self.start_pos = np.zeros(0, np.int64)
        self.last_served = np.zeros(0, np.int64)  # turn of the stream's latest update
        # a flush was asked for (idle, ended, a request): its last r < k1 targets train
        # in the next updates, like full windows; cleared once nothing is left
        self.flushing = np.zeros(0, bool)
        # a number no other stream of this table had: rows move when streams are
        # forgotten, so results count distinct streams by it (not saved)
        self.serial = np.zeros(0, np.int64)
        self.num_created = 0
        self.ring = np.zeros((0, self.ring_width + self.mirrored), np.int32)
        self.states = StatePool(state_shape, num_state_tensors, device, dtype, max_resident)
        self.overflow: dict[int, deque[np.ndarray]] = {}
        self.waiting: dict[int, int] = {}  # tokens in each row's overflow queue
        self.turn = 0  # batches planned so far; orders streams fairly
        self._geometries: dict[tuple, Geometry] = {}
        self.num_received = 0      # tokens received, over the table's life
        self.num_untrained = 0   # targets received but not trained, all streams
        self.ended: set[StreamId] = set()  # streams that get no more tokens (see end)
        self.num_flushed = 0     # streams whose asked-for flush trained their last target
        self.num_forgotten = 0   # ended streams forgotten (over the table's life)
        self._grow(capacity)

    # ---- intake ------------------------------------------------------------------
    def row(self, stream_id: StreamId) -> int:
        """The stream's row, creating the stream (zero state, no tokens) if new."""
        row = self.row_of.get(stream_id)
        if row is None:
            row = len(self.ids)
            if row == len(self.num_tokens):
                self._grow(2 * row)
            self.row_of[stream_id] = row
            self.ids.append(stream_id)
            self.num_created += 1
            self.serial[row] = self.num_created
        return row

    def append(self, stream_id: StreamId, tokens: np.ndarray) -> None:
        """Queue validated tokens (int32, each < vocab) at the end of the stream."""
        if len(tokens) == 0:
            return
        if stream_id in self.ended:
            raise ValueError(f"stream {stream_id!r} has ended: it takes no more tokens")
        row = self.row(stream_id)
        first = self.next_offset(stream_id) == 0  # the first token is no target
        self.num_received += len(tokens)
        self.num_untrained += len(tokens) - first
        self.states.touch(row)
        if row in self.overflow:
            self.overflow[row].append(tokens)
            self.waiting[row] += len(tokens)
            return
        rest = self._write(row, tokens)
        if len(rest):
            self.overflow[row] = deque([rest])
            self.waiting[row] = len(rest)

    def next_offset(self, stream_id: StreamId) -> int:
        """Tokens received so far from this stream (= the next token's position)."""
        row = self.row_of.get(stream_id)
        if row is None:
            return 0
        return int(self.num_tokens[row]) + self.waiting.get(row, 0)

    def untrained(self, stream_id: StreamId) -> int:
        """Targets received but not trained yet."""
        row = self.row_of.get(stream_id)
        return 0 if row is None else max(0, self.next_offset(stream_id) - 1 -
                                          int(self.trained_end[row]))

    def tokens_from_start(self, row: int) -> np.ndarray:
        """x_s .. x_{N-1} including the overflow: what brings h(s) to the newest position."""
        start, end = self.start_pos[row], self.num_tokens[row]
        ring_part = self.ring[row, np.arange(start, end) % self.ring_width]
        return np.concatenate([ring_part, *self.overflow.get(row, ())])

    def _write(self, row: int, tokens: np.ndarray) -> np.ndarray:
        """Write what fits into the row's ring (as slices: this runs per message);
        returns the rest."""
        width, end = self.ring_width, int(self.num_tokens[row])
        take = min(width - (end - int(self.start_pos[row])), len(tokens))
        line, at = self.ring[row], end % width
        first = min(take, width - at)
        line[at:at + first] = tokens[:first]
        line[:take - first] = tokens[first:take]  # wrapped around
        if at < self.mirrored or take > first:
            line[width:] = line[:self.mirrored]
        self.num_tokens[row] = end + take
        return tokens[take:]

    def _refill(self, rows: np.ndarray) -> None:
        """Move waiting tokens into the rings of those rows that have fewer than k1
        untrained targets left there, filling each ring to the brim."""
        waiting = [row for row in rows.tolist() if row in self.overflow]
        if not waiting:
            return
        waiting = np.array(waiting, np.int64)
        short = waiting[self.num_tokens[waiting] - 1 - self.trained_end[waiting] < self.k1]
        for row in short.tolist():
            queue, before = self.overflow[row], self.num_tokens[row]
            while queue:
                rest = self._write(row, queue[0])
                if len(rest):
                    queue[0] = rest
                    break
                queue.popleft()
            self.waiting[row] -= int(self.num_tokens[row] - before)
            if not queue:
                del self.overflow[row], self.waiting[row]

    # ---- planning: ready (pure) -> batch (layout) -> the engine's step -> commit ------
    def ready(self, max_streams: int, group=None) -> Plan | None:
        """The next update, or None if nothing is ready. Changes nothing: the same table
        gives the same plan, so the daemon can log it before it runs.

        Ready are the streams with k1 untrained targets, and those asked to flush with
        1 <= r < k1 (see `flush`). Each contributes its oldest ready window; when more
        than `max_streams` are ready, those served least recently go first. `group`
        (ready rows -> a number for each): at most `max_streams` of each group (a
        replay of several ranks' logs in one process: each rank planned its own)."""
        used = len(self.ids)
        untrained = self.num_tokens[:used] - 1 - self.trained_end[:used]
        if self.waiting:
            rows = np.fromiter(self.waiting, np.int64, len(self.waiting))
            untrained[rows] += np.fromiter(self.waiting.values(), np.int64, len(rows))
        ready = (untrained >= self.k1) | (self.flushing[:used] & (untrained >= 1))
        candidates = np.flatnonzero(ready)
        if len(candidates) == 0:
            return None
        if group is None:
            candidates = self._least_served(candidates, max_streams)
        elif len(candidates) > max_streams:
            groups = group(candidates)
            candidates = np.sort(np.concatenate([
                self._least_served(candidates[groups == g], max_streams)
                for g in np.unique(groups)]))
        return Plan(candidates, np.minimum(untrained[candidates], self.k1))

    def _least_served(self, candidates: np.ndarray, max_streams: int) -> np.ndarray:
        if len(candidates) <= max_streams:
            return candidates
        order = np.lexsort((candidates, self.last_served[candidates]))
        return np.sort(candidates[order[:max_streams]])

    def batch(self, plan: Plan) -> Batch:
        """The plan's windows and start-state slots. Moves waiting tokens into the rings
        and states onto the device as needed: where things live, not where streams stand."""
        rows, n = plan.rows, plan.n
        self._refill(rows)
        s = self.start_pos[rows]
        e = self.trained_end[rows] + n
        p = np.maximum(0, e + self.k1 - self.k2)
        key = (n.tobytes(), (p - s).tobytes(), (e - p).tobytes())
        geometry = self._geometries.get(key)
        if geometry is None:
            if len(self._geometries) >= 256:  # young streams make many; keep it bounded
                self._geometries.clear()
            geometry = self._geometries[key] = plan_geometry(p - s, e - p, n)
        # every window is a slice of its ring line (the mirrored columns hold the wrap)
        lines = np.lib.stride_tricks.sliding_window_view(self.ring, geometry.window_length,
                                                         axis=1)
        windows = lines[rows, s % self.ring_width]
        self.states.touch(rows)
        return Batch(rows, self.states.slots(rows), windows, geometry)

    def commit(self, plan: Plan, batch: Batch | None = None) -> None:
        """The plan's update ran: its targets are trained, its streams' start states are
        at p = max(0, e + k1 - k2). A flush asked for is done once nothing is left, and
        an ended stream is then forgotten. Called after the step, so a step that raises
        leaves the table where the model is. `batch`: the plan's, to count lines by
        (see line_token)."""
        rows, n = plan.rows, plan.n
        if self.line_token >= 0 and batch is not None:
            self.lines[rows] += self.lines_in(plan, batch)
        e = self.trained_end[rows] + n
        self.trained_end[rows] = e
        self.start_pos[rows] = np.maximum(0, e + self.k1 - self.k2)
        self.num_untrained -= int(n.sum())
        self.turn += 1
        self.last_served[rows] = self.turn
        done = rows[self.flushing[rows] & (self.num_tokens[rows] - 1 == e)]
        done = [row for row in done.tolist() if row not in self.waiting]
        if done:
            self.flushing[done] = False
            self.num_flushed += len(done)
            self._forget([self.ids[row] for row in done if self.ids[row] in self.ended])

    def lines_in(self, plan: Plan, batch: Batch) -> np.ndarray:
        """(B,) how many line tokens the plan's targets hold, stream by stream (a
        stream's first update counts its first token too: no target, but a token)."""
        ends = batch.targets() == self.line_token
        counts = np.bincount(batch.geometry.target_stream[ends], minlength=len(plan.rows))
        first = self.trained_end[plan.rows] == 0  # its window starts at offset 0
        counts[first] += batch.windows[first, 0] == self.line_token
        return counts

    # ---- flushes and streams that end ----------------------------------------------
    def flush(self, stream_ids) -> int:
        """Train the last r < k1 targets of these streams in the next updates (a stream
        may go on afterwards); an ended one with nothing left is forgotten at once.
        Returns how many have targets to train."""
        asked = 0
        for stream_id in dict.fromkeys(stream_ids):  # each once, in order
            if stream_id not in self.row_of:
                continue
            if self.untrained(stream_id) > 0:
                self.flushing[self.row_of[stream_id]] = True
                asked += 1
            elif stream_id in self.ended:
                self._forget([stream_id])
        return asked

    def end(self, stream_id: StreamId) -> bool:
        """The stream gets no more tokens: it is flushed, and forgotten (tokens, state and
        id: the id may start again from offset 0) once its last target is trained.
        False if the stream is unknown."""
        if stream_id not in self.row_of:
            return False
        self.ended.add(stream_id)
        self.flush([stream_id])
        return True

    def _forget(self, stream_ids: list[StreamId]) -> None:
        """Remove these streams: the last row moves into each hole, so rows stay dense;
        the same calls in the same order (a replay) move the same."""
        for sid in sorted(stream_ids, key=self.row_of.__getitem__, reverse=True):
            self._remove(self.row_of.pop(sid))
            self.ended.discard(sid)
            self.num_forgotten += 1

    def _remove(self, row: int) -> None:
        self.overflow.pop(row, None)
        self.waiting.pop(row, None)
        self.states.drop(row)
        last = len(self.ids) - 1
        if row != last:
            moved = self.ids[last]
            for array in (self.num_tokens, self.trained_end, self.start_pos,
                          self.last_served, self.flushing, self.serial, self.ring,
                          self.lines):
                array[row] = array[last]
            if last in self.overflow:
                self.overflow[row], self.waiting[row] = (self.overflow.pop(last),
                                                         self.waiting.pop(last))
            self.states.move(last, row)
            self.ids[row] = moved
            self.row_of[moved] = row
        self.ids.pop()
        for array in (self.num_tokens, self.trained_end, self.start_pos, self.last_served,
                      self.flushing, self.lines):
            array[last] = 0  # a new stream takes this row next: it must start clean

    # ---- moving a stream to another table (another rank) ------------------------------
    def export(self, stream_id: StreamId) -> dict:
        """What another table needs to continue this stream exactly (see adopt): its
        tokens from the window start on, positions, window-start state, ended or not."""
        row = self.row_of[stream_id]
        return {"tokens": self.tokens_from_start(row), "start_pos": int(self.start_pos[row]),
                "trained_end": int(self.trained_end[row]),
                "state": tuple(t[:, 0].cpu() for t in self.states.state(row)),
                "ended": stream_id in self.ended, "flushing": bool(self.flushing[row]),
                "lines": int(self.lines[row])}

    def adopt(self, stream_id: StreamId, exported: dict) -> None:
        """Take over a stream another table exported; it continues as it would have
        there (its state waits in host memory until its next update)."""
        if stream_id in self.row_of:
            raise ValueError(f"stream {stream_id!r} is already in this table")
        row = self.row(stream_id)
        start, tokens = exported["start_pos"], exported["tokens"]
        self.start_pos[row] = self.num_tokens[row] = start
        self.trained_end[row] = exported["trained_end"]
        rest = self._write(row, tokens)
        if len(rest):
            self.overflow[row] = deque([rest])
            self.waiting[row] = len(rest)
        self.states.host[row] = tuple(t.to(self.dtype) for t in exported["state"])
        received = start + len(tokens)
        self.num_received += received
        self.num_untrained += max(0, received - 1 - exported["trained_end"])
        if exported["ended"]:
            self.ended.add(stream_id)
        self.flushing[row] = exported["flushing"]
        self.lines[row] = exported.get("lines", 0)

    # ---- capacity and persistence ---------------------------------------------------
    def _grow(self, capacity: int) -> None:
        extra = capacity - len(self.num_tokens)
        zeros = np.zeros(extra, np.int64)
        self.num_tokens = np.concatenate([self.num_tokens, zeros])
        self.trained_end = np.concatenate([self.trained_end, zeros])
        self.start_pos = np.concatenate([self.start_pos, zeros])
        self.last_served = np.concatenate([self.last_served, zeros])
        self.flushing = np.concatenate([self.flushing, np.zeros(extra, bool)])
        self.serial = np.concatenate([self.serial, zeros])
        self.lines = np.concatenate([self.lines, zeros])
        self.ring = np.concatenate(
            [self.ring, np.zeros((extra, self.ring_width + self.mirrored), np.int32)])
        self.states.add_rows(extra)

    def state_dict(self) -> dict:
        used = len(self.ids)
        return {
            "ids": list(self.ids),
            "num_tokens": torch.from_numpy(self.num_tokens[:used].copy()),
            "trained_end": torch.from_numpy(self.trained_end[:used].copy()),
            "start_pos": torch.from_numpy(self.start_pos[:used].copy()),
            "last_served": torch.from_numpy(self.last_served[:used].copy()),
            "ring": torch.from_numpy(self.ring[:used, :self.ring_width].copy()),
            "overflow": {row: torch.from_numpy(np.concatenate(list(q)))
                         for row, q in self.overflow.items()},
            "states": self.states.state_dict(len(self.num_tokens)),
            "turn": self.turn,
            "ended": sorted(self.ended, key=self.row_of.__getitem__),
            "flushing": [self.ids[row] for row in np.flatnonzero(self.flushing[:used])],
            "total_tokens": self.num_received,
            "lines": torch.from_numpy(self.lines[:used].copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        used = len(state["ids"])
        if state["ring"].shape[1:] != (self.ring_width,):
            raise ValueError("saved stream table has a different ring width (k1/k2 changed)")
        self.__init__(self.k1, self.k2, self.state_shape, self.num_state_tensors,
                      self.device, self.dtype, self.max_resident,
                      capacity=len(state["states"]["slot_of_row"]),
                      line_token=self.line_token)
        self.ids = list(state["ids"])
        self.row_of = {sid: row for row, sid in enumerate(self.ids)}
        self.num_created = used
        self.serial[:used] = np.arange(1, used + 1)
        for name in ("num_tokens", "trained_end", "start_pos", "last_served"):
            getattr(self, name)[:used] = state[name].numpy()
        self.ring[:used, :self.ring_width] = state["ring"].numpy()
        self.ring[:used, self.ring_width:] = self.ring[:used, :self.mirrored]
        self.overflow = {int(row): deque([t.numpy().copy()])
                         for row, t in state["overflow"].items()}
        self.waiting = {row: len(queue[0]) for row, queue in self.overflow.items()}
        self.states.load_state_dict(state["states"], len(self.num_tokens))
        self.turn = int(state["turn"])
        self.ended = set(state.get("ended", ()))
        for sid in state.get("flushing", ()):  # (absent before 0.3)
            self.flushing[self.row_of[sid]] = True
        self.num_received = int(state.get("total_tokens",
                                          sum(self.next_offset(sid) for sid in self.ids)))
        self.num_untrained = sum(self.untrained(sid) for sid in self.ids)
        if "lines" in state:  # (absent from older checkpoints: count from here)
            self.lines[:used] = state["lines"].numpy()

"""The layout of one update's windows: which token feeds which row of which fused call.

A batch of B windows is split at each stream's p into segment A = [s, p) and segment
B = [p, e) (streams.py says why); `plan_geometry` lays out both segments' inputs, the
targets and the rows of the output that predict them, as flat indices the engine
gathers on the device. It depends only on the windows' lengths, so in steady state every
update has the same geometry: it is computed once and its device copies are reused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Geometry:
    """The shape of a batch of windows: everything that depends only on each stream's
    (segment A length, segment B length, targets), not on where the streams stand.
    In steady state every update has the same geometry, so it is computed once and
    its device copies are reused (engine.py). B streams, shapes in comments."""
    shape_a: tuple[int, int]  # (Ta, nA): inputs of segment A = [s, p), left-aligned
    lengths_a: np.ndarray     # (nA,) p - s of the streams that have one (> 0)
    rows_a: np.ndarray        # (nA,) which of the B streams they are
    shape_b: tuple[int, int]  # (Tb, nB): inputs of segment B = [p, e)
    lengths_b: np.ndarray     # (nB,) e - p (> 0)
    rows_b: np.ndarray        # (nB,)
    loss_rows: np.ndarray     # (targets,) row of cat(yA.flatten(0,1), yB.flatten(0,1))
                              #   whose output predicts each target
    loss_span: tuple[int, int] | None  # loss_rows as a range, when they are one
    num_targets: int          # the loss is the mean over these
    window_length: int        # L: the longest window's inputs and targets, e - s + 1
    token_index: np.ndarray   # (Ta*nA + Tb*nB + targets,) segment A inputs, B inputs and
                              #   targets as flat indices into the (B, L) window block
    target_stream: np.ndarray  # (targets,) which of the B streams each target is of
    device: dict = field(default_factory=dict)  # engine's cache of device copies


@dataclass
class Batch:
    """One update: B streams, their tokens, and the geometry that lays them out."""
    rows: np.ndarray     # (B,) the streams' rows in the table
    slots: np.ndarray    # (B,) their slots in the device state pool
    windows: np.ndarray  # (B, L) int32: each stream's tokens x_s .. x_{s+L-1}; past a
                         #   shorter window's end, stale ring entries no index points to
    geometry: Geometry

    @property
    def num_streams(self) -> int:
        return len(self.slots)

    @property
    def num_targets(self) -> int:
        return self.geometry.num_targets

    def targets(self) -> np.ndarray:
        """(targets,) the target tokens, in the geometry's order (time-major), on the
        host."""
        g = self.geometry
        return np.take(self.windows, g.token_index[len(g.token_index) - g.num_targets:])

    def previous(self) -> np.ndarray:
        """(targets,) the token before each target (the input that predicts it)."""
        g = self.geometry
        return np.take(self.windows, g.token_index[len(g.token_index) - g.num_targets:] - 1)


def plan_geometry(a: np.ndarray, b: np.ndarray, n: np.ndarray) -> Geometry:
    """Lay out windows with segment lengths a (A), b (B) and n newest targets each."""
    num = len(a)
    w = a + b
    rows_a, rows_b = np.flatnonzero(a > 0), np.flatnonzero(b > 0)
    ta, tb = int(a.max()), int(b.max())
    # segment A inputs: window positions 0 .. a-1 (padding repeats the last one)
    off_a = np.minimum(np.arange(ta)[:, None], a[rows_a][None, :] - 1)
    # segment B inputs: window positions a .. a+b-1
    off_b = a[rows_b][None, :] + np.minimum(np.arange(tb)[:, None], b[rows_b][None, :] - 1)
    # targets: window positions i + 1 for the inputs i in [w - n, w), time-major (the
    # k-th newest target of every stream, then the next), so that in steady state they
    # are the last rows of segment B's output: a slice, not a gather
    stream = np.repeat(np.arange(num), n)
    first = np.cumsum(n) - n
    k = np.arange(n.sum()) - np.repeat(first, n)
    order = np.lexsort((stream, k))
    stream, k = stream[order], k[order]
    i = np.repeat(w - n, n)[order] + k
    index_a = np.full(num, -1)
    index_a[rows_a] = np.arange(len(rows_a))
    index_b = np.full(num, -1)
    index_b[rows_b] = np.arange(len(rows_b))
    loss_rows = np.where(i < a[stream], i * len(rows_a) + index_a[stream],
                         ta * len(rows_a) + (i - a[stream]) * len(rows_b) + index_b[stream])
    gather_stream = np.concatenate([np.broadcast_to(rows_a, off_a.shape).ravel(),
                                    np.broadcast_to(rows_b, off_b.shape).ravel(), stream])
    gather_offset = np.concatenate([off_a.ravel(), off_b.ravel(), i + 1])
    length = int(w.max()) + 1
    span = None
    if len(loss_rows) and np.array_equal(loss_rows, loss_rows[0] + np.arange(len(loss_rows))):
        span = (int(loss_rows[0]), int(loss_rows[0]) + len(loss_rows))
    return Geometry((ta, len(rows_a)), a[rows_a], rows_a, (tb, len(rows_b)), b[rows_b],
                    rows_b, loss_rows, span, int(n.sum()), length,
                    gather_stream * length + gather_offset, stream)

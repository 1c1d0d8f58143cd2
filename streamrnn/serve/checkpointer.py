"""Checkpoints, for one process and for N ranks alike: agreed at ticks, written in parts
on a thread, committed by a manifest (statedir.py names the files).

    agree      at a tick, ranks that want one (due, asked for, the final one) say so,
               and whether they changed anything since the last; one starts when some
               rank wants one and some rank has changes, numbered C = the newest
               committed + 1 (else the last one answers the requests)
    write      each rank snapshots its part (rank 0 also the replicated part: weights,
               optimizer) and writes it on a thread, while the loop goes on
    manifest   once every rank's part is durable, each tells rank 0 its log position;
               rank 0 writes checkpoint-C.json: C is committed
    committed  at the next tick every rank counts it: requests are answered, old
               checkpoints pruned (rank 0), log segments they no longer need removed
    failed     a part or the manifest failed somewhere: every rank abandons C; it is
               tried again after 5, 10, 20 ... s (at most checkpoint.interval_seconds)

One process goes through the same steps: its ticks are its own values.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..config import Config
from ..core.learner import Learner
from .cluster import Cluster
from .journal import Journal
from .statedir import MANIFEST_FORMAT, PART_FORMAT, REPLICATED_FORMAT, StateDir, \
    write_atomically, write_json

RETRY_FIRST_SECONDS = 5.0  # a failed checkpoint is tried again after 5, 10, 20 ... s
FIELDS = ("checkpoint_wanted", "checkpoint_changed", "checkpoint_writing",
          "checkpoint_written", "checkpoint_failed", "checkpoint_committed")


@dataclass(frozen=True)
class Saved:
    """A committed checkpoint, as replies and `status` show it."""
    path: Path       # its manifest
    number: int
    wal_seq: int     # this rank's log position it holds
    seconds: float


@dataclass
class _Writing:
    """Checkpoint `number` being written: this rank's part, and its progress."""
    ticket: int
    number: int
    step: int                     # the global steps it holds
    wal_seq: int
    changes: int
    updates: int
    started: float
    info: dict                    # what the manifest lists for this rank's part
    outcome: bool | None = None   # None while writing; then durable or not
    error: str = ""
    manifest_asked: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)


class Checkpointer:
    def __init__(self, config: Config, learner: Learner, cluster: Cluster,
                 statedir: StateDir, journal: Journal, metrics, log,
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.learner, self.cluster = config, learner, cluster
        self.statedir, self.journal, self.metrics, self.log = statedir, journal, metrics, log
        self.clock = clock
        self.interval = config.checkpoint.interval_seconds or float("inf")
        self.next_due = clock() + self.interval
        self.last: Saved | None = None
        self.number = 0                 # the newest committed checkpoint's
        self.changes_at_last = 0        # journal.num_changes that the last one holds
        self.updates_at_last = 0
        self.adopted: list[str] = []    # logs the next manifest says it holds (recovery)
        self.num_failed_in_row = 0
        self.writing: _Writing | None = None
        self.commit_to_report = 0       # rank 0: the number just committed, for the tick
        # requests: ticket n is the n-th checkpoint started (or found needless)
        self.num_started = 0
        self.num_finished = 0
        self.results: dict[int, Saved | None] = {}
        self.wanted = False

    def recovered(self, saved: Saved | None, number: int, replayed_changes: bool) -> None:
        """Recovery loaded `saved` (the newest committed is `number`); with changes
        replayed after it, the next due checkpoint has something new to hold."""
        self.last, self.number = saved, number
        self.changes_at_last = -1 if replayed_changes else self.journal.num_changes
        self.updates_at_last = self.learner.updates

    # ---- the tick ---------------------------------------------------------------------
    def tick_fields(self, force: bool = False) -> dict[str, int]:
        """This rank's part of the tick. `force`: want one now (the final one)."""
        w = self._join_writer()
        changed = self.last is None or self.journal.num_changes != self.changes_at_last
        wants = force or self.wanted or self._due(changed)
        return {"checkpoint_wanted": int(wants and w is None),
                "checkpoint_changed": int(changed),
                "checkpoint_writing": int(w is not None and w.outcome is None),
                "checkpoint_written": int(w is not None and w.outcome is True),
                "checkpoint_failed": int(w is not None and w.outcome is False),
                "checkpoint_committed": self.commit_to_report}

    def after_tick(self, t: dict[str, int]) -> None:
        """The same tally on every rank, so every rank moves the same way."""
        w, world = self.writing, self.cluster.world_size
        if w is not None and t["checkpoint_committed"]:
            self._committed(t["checkpoint_committed"])
        elif w is not None and t["checkpoint_written"] + t["checkpoint_failed"] == world:
            if t["checkpoint_failed"]:
                self._failed(f"checkpoint {w.number} failed on "
                             f"{t['checkpoint_failed']} rank(s)" +
                             (f" (this one: {w.error})" if w.error else "") +
                             "; the previous one stays, the logs keep everything since")
            elif not w.manifest_asked:  # every rank is here, at the same tick
                w.manifest_asked = True
                parts = self.cluster.ranks.gather(w.info)
                if self.cluster.rank == 0:
                    self._write_manifest(parts)
        elif t["checkpoint_wanted"] and not (t["checkpoint_writing"] +
                                             t["checkpoint_written"] + t["checkpoint_failed"]):
            if t["checkpoint_changed"]:
                self._start()
            else:  # no rank has anything new: the last one holds it all
                self.num_started += 1
                self.wanted = False
                self.next_due = self.clock() + self.interval
                self._finish(self.last)

    def request(self) -> int:
        """A checkpoint of the state as it is now: the ticket of the one that will hold
        it (its outcome is results[ticket] once num_finished reaches it). One being
        written holds an older state: the one after it answers."""
        self.wanted = True
        return self.num_started + 1

    def checkpoint_now(self, ping: Callable[[], None] = lambda: None) -> Saved | None:
        """Every rank at once (after an agreed stop, or in recovery): the write in
        progress finishes, then one that holds everything is committed (or found
        needless); ticks until then. None if it failed."""
        target = self.num_started + 1
        while self.num_finished < target:
            ping()
            t = self.cluster.tick(self.tick_fields(force=self.num_started < target))
            self.after_tick(t)
            if t["checkpoint_writing"]:
                time.sleep(0.01)
        return self.results.get(target)

    # ---- the steps --------------------------------------------------------------------
    def _due(self, changed: bool) -> bool:
        every = self.config.checkpoint.interval_updates
        due = self.clock() >= self.next_due or bool(
            every and self.learner.updates - self.updates_at_last >= every)
        if due and not changed:
            self.next_due = self.clock() + self.interval  # nothing new here
            return False
        return due

    def _start(self) -> None:
        """Snapshot this rank's part and write it on a thread."""
        self.num_started += 1
        self.wanted = False
        self.next_due = self.clock() + self.interval
        rank, world = self.cluster.rank, self.cluster.world_size
        number = self.number + 1
        self.journal.commit()
        self.journal.sync()  # the part says the log holds up to wal_seq
        part_path = self.statedir.part_path(number, rank, world)
        w = self.writing = _Writing(self.num_started, number, self.journal.step,
                                    self.journal.wal_seq,
                                    self.journal.num_changes, self.learner.updates,
                                    time.monotonic(), {})
        if not weights_finite(self.learner):
            w.outcome, w.error = False, "the model's weights are not finite: nothing is " \
                "written from them (the older checkpoints and the logs stay)"
            return
        step, created = w.step, time.time()
        part = {"format": PART_FORMAT, "number": number, "step": step, "rank": rank,
                "world_size": world, "wal_seq": w.wal_seq, "created": created,
                "version": __version__, **snapshot(self.learner.rank_state())}
        totals = part["totals"]
        w.info = {"rank": rank, "path": str(part_path.relative_to(self.statedir.root)),
                  "wal_seq": w.wal_seq, "streams": len(part["streams"]["ids"]),
                  "tokens_trained": totals["tokens_trained"], "bits": totals["bits"]}
        replicated = None
        if rank == 0:
            replicated = {"format": REPLICATED_FORMAT, "number": number, "step": step,
                          "learner": snapshot(self.learner.replicated_state()),
                          "batch_streams": self.learner.max_batch_streams,
                          "num_groups": self.cluster.num_groups, "version": __version__,
                          "created": created}

        def write():
            try:
                self.statedir.checkpoints.mkdir(parents=True, exist_ok=True)
                if replicated is not None:
                    write_atomically(self.statedir.replicated_path(number), replicated)
                write_atomically(part_path, part)
                w.outcome = True
            except Exception as e:  # reported at the next tick, by every rank's tally
                w.outcome, w.error = False, f"{type(e).__name__}: {e}"
        w.thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        w.thread.start()

    def _write_manifest(self, parts: list[dict]) -> None:
        """Rank 0, once every part of C is durable: the manifest, written last, makes C
        the checkpoint a restart loads."""
        w = self.writing
        manifest = {
            "format": MANIFEST_FORMAT, "version": __version__, "created": time.time(),
            "number": w.number, "step": w.step,
            "updates": w.updates, "world_size": self.cluster.world_size,
            "num_groups": self.cluster.num_groups,
            "replicated": str(self.statedir.replicated_path(w.number)
                              .relative_to(self.statedir.root)),
            "parts": parts, "adopted": self.adopted,
            "totals": {"streams": sum(p["streams"] for p in parts),
                       "tokens_trained": sum(p["tokens_trained"] for p in parts),
                       "bits": sum(p["bits"] for p in parts)}}
        try:
            write_json(self.statedir.manifest_path(w.number), manifest)
            self.commit_to_report = w.number
        except Exception as e:  # the others hear it at the next tick: failed
            w.outcome, w.error = False, f"the manifest: {type(e).__name__}: {e}"

    def _committed(self, number: int) -> None:
        w, self.writing = self.writing, None
        self.commit_to_report = 0
        saved = Saved(self.statedir.manifest_path(number), number, w.wal_seq,
                      time.monotonic() - w.started)
        self.last, self.number, self.adopted = saved, number, []
        self.changes_at_last, self.updates_at_last = w.changes, w.updates
        self.num_failed_in_row = 0
        self._finish(saved)
        self.metrics.checkpoint_seconds.observe(saved.seconds)
        self.metrics.checkpoint_last_success.set(time.time())
        kept = self.statedir.prune(self.config.checkpoint.keep) if self.cluster.rank == 0 \
            else self.statedir.committed()[:self.config.checkpoint.keep]
        ours = [c for c in kept if not c.error and not c.legacy and
                c.world_size == self.cluster.world_size]
        removed = self.journal.remove_covered(
            int(ours[-1].parts[self.cluster.rank]["wal_seq"])) if ours else 0
        self.log.info("checkpoint saved", number=number, path=str(saved.path),
                      wal_seq=saved.wal_seq, seconds=round(saved.seconds, 3),
                      log_segments_removed=removed)

    def _failed(self, message: str) -> None:
        """Counted, logged, tried again soon, sooner than the interval (5, 10, 20 ...
        s, at most the interval). What this rank wrote of it goes: nothing refers to it."""
        w, self.writing = self.writing, None
        if w is not None:
            self._join_writer_of(w)
            self.statedir.part_path(w.number, self.cluster.rank,
                                    self.cluster.world_size).unlink(missing_ok=True)
            if self.cluster.rank == 0:
                self.statedir.replicated_path(w.number).unlink(missing_ok=True)
        self.commit_to_report = 0
        self.metrics.checkpoint_failures.inc()
        self.num_failed_in_row += 1
        retry = min(self.interval, RETRY_FIRST_SECONDS * 2 ** (self.num_failed_in_row - 1))
        self.next_due = self.clock() + retry
        self.log.error(message, retry_in_seconds=retry if retry < float("inf") else None)
        self._finish(None)

    def _finish(self, saved: Saved | None) -> None:
        self.num_finished = self.num_started
        self.results[self.num_finished] = saved
        for old in [t for t in self.results if t < self.num_finished - 16]:
            del self.results[old]

    def _join_writer(self) -> _Writing | None:
        w = self.writing
        if w is not None and w.thread is not None and not w.thread.is_alive():
            self._join_writer_of(w)
        return w

    @staticmethod
    def _join_writer_of(w: _Writing) -> None:
        if w.thread is not None:
            w.thread.join()
            w.thread = None

    def close(self) -> None:
        """Waits for a write in progress (its outcome is not reported any more)."""
        if self.writing is not None and self.writing.thread is not None:
            self.writing.thread.join()

    @property
    def busy(self) -> bool:
        return self.writing is not None and self.writing.outcome is None


def weights_finite(learner: Learner) -> bool:
    """Whether every weight is finite: none are written otherwise. Note: a device
    sync, once per checkpoint."""
    return bool(torch.stack([p.isfinite().all() for p in learner.model.parameters()]).all())


def snapshot(tree):
    """A deep copy of a state dict on the CPU: the training loop may go on meanwhile."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: snapshot(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [snapshot(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(snapshot(v) for v in tree)
    return tree

"""Durability for one rank of several: its own log, checkpoints committed together.

    log        each rank logs its own records (tokens, ends) and, before its collective,
               every global step: {"t": "train", "g": G, "n": targets of all ranks}
               or {"t": "flush", "g": G, "s": [its streams]}; every rank logs every G
    checkpoint the ranks agree at a tick to write one at their common step S (each its
               part, on a thread), tell each other at later ticks when theirs is
               durable, rank 0 then writes the manifest, and at the tick after that
               every rank counts it committed (prunes its parts and log)
    recovery   the newest step every rank can load; then the MIN over ranks of the last
               step each logged: a rank killed before its collective may have logged
               one step more than the others. Steps up to it replay in lockstep (the
               same collectives as the first time); a step logged beyond it is void
               (a "resume" record says so) and its windows are trained again later

The state folder: STATE/cluster (manifests, replicated parts) and STATE/rank-R-of-W
(this rank's log and parts; locked while in use). Rank 0 also holds STATE/lock, which
keeps a single-process daemon off the same folder.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from . import lockstep_recovery
from .checkpoint import Saved
from .cluster import Cluster, ClusterFault, Decision
from .durability import Durability, lock, snapshot
from .manifest import Manifests, rank_folder


@dataclass
class _Pending:
    """The checkpoint being written at global step `step`."""
    step: int
    wal_seq: int
    changes: int
    updates: int
    started: float
    outcome: bool | None = None   # None while writing; then durable or not
    error: str = ""
    thread: threading.Thread | None = field(default=None, repr=False)


class ClusterDurability(Durability):
    def __init__(self, config, learner, metrics, log, cluster: Cluster,
                 clock: Callable[[], float] = time.monotonic):
        self.cluster = cluster
        self.state_root = Path(config.checkpoint.resolved_dir())
        super().__init__(config, learner, metrics, log, clock,
                         root=rank_folder(self.state_root, cluster.rank, cluster.world_size))
        self.root_lock = lock(self.state_root) if cluster.rank == 0 else None
        self.manifests = Manifests(self.state_root, cluster.rank, cluster.world_size,
                                   config.checkpoint.keep)
        self.step = 0                        # global steps logged
        self.pending: _Pending | None = None
        self.commit_to_report = 0            # rank 0: committed step + 1, for the next tick

    # ---- global steps ----------------------------------------------------------------
    def log_train(self, num_targets: int | None = None) -> None:
        self._log({"t": "train", "g": self.step + 1, "n": int(num_targets or 0)})
        self.step += 1

    def log_flush(self, streams: list[str]) -> None:
        self._log({"t": "flush", "g": self.step + 1, "s": streams})
        self.step += 1

    def cancel_step(self) -> None:
        """Another rank could not log the step this one just logged: it does not run.
        A resume record voids it (recovery skips it), and the step's number is free
        for the next one. If even that cannot be written, this rank ends: the restart
        voids the step anyway (the other rank never logged it)."""
        self.step -= 1
        if not self.append({"t": "resume", "g": self.step}):
            raise ClusterFault("the write-ahead log could not record that a step was "
                               "cancelled (the disk is full here too)")

    # ---- checkpoints, agreed at ticks --------------------------------------------------
    def tick_fields(self, force: bool = False) -> dict:
        """This rank's part of the tick: does it want a checkpoint, how its write goes.
        `force`: want one if anything changed since the last (the final one)."""
        self._collect_part()
        p = self.pending
        if force:
            wants = self.last_checkpoint is None or self.num_changes != self.changes_at_checkpoint
        else:
            wants = self.wanted or self._due()
        return {"checkpoint": int(wants and p is None),
                "writing": int(p is not None and p.outcome is None),
                "part_written": int(p is not None and p.outcome is True),
                "part_failed": int(p is not None and p.outcome is False),
                "committed": self.commit_to_report}

    def after_tick(self, d: Decision) -> None:
        """The same decision on every rank, so every rank moves the same way."""
        world = self.cluster.world_size
        if d.committed and self.pending is not None:
            self._committed(d.committed - 1)
        elif self.pending is not None and d.part_written + d.part_failed == world:
            if d.part_failed:
                self._abandon()
            elif not self.commit_to_report:
                # every rank is here (the same decision): each tells rank 0 its wal_seq
                wal_seqs = self.cluster.ranks.gather(self.pending.wal_seq)
                if self.cluster.rank == 0:
                    self._write_manifest(wal_seqs)
        elif d.checkpoint and d.writing + d.part_written + d.part_failed == 0:
            self._start_part()

    def _due(self) -> bool:
        every = self.config.checkpoint.interval_updates
        due = self.clock() >= self.next_due or bool(
            every and self.learner.updates - self.updates_at_checkpoint >= every)
        if due and self.num_changes == self.changes_at_checkpoint:
            self.next_due = self.clock() + self.interval  # nothing new here
            return False
        return due

    def poll(self) -> None:
        """(The tick drives checkpoints: see tick_fields and after_tick.)"""

    def request_checkpoint(self) -> int | None:
        if self.last_checkpoint is not None and self.num_changes == self.changes_at_checkpoint:
            return None
        self.wanted = True  # the next checkpoint the ranks start answers it
        return self.num_started + 1

    def checkpoint_now(self, ping: Callable[[], None] = lambda: None) -> Saved | None:
        """Every rank at once (after an agreed stop): finish the write in progress,
        then one that holds everything; ticks until it is committed or failed."""
        target = None
        while True:
            ping()
            fields = self.tick_fields(force=target is None)
            d = self.cluster.tick(**fields)
            if target is None and not d.checkpoint and \
                    d.writing + d.part_written + d.part_failed == 0:
                return self.last_checkpoint  # no rank has anything new
            started = self.num_started
            self.after_tick(d)
            if target is None and self.num_started > started:
                target = self.num_started
            if target is not None and self.num_finished >= target:
                return self.results.get(target)
            if d.writing:
                time.sleep(0.01)

    def _start_part(self) -> None:
        self.num_started += 1
        self.wanted = False
        self.next_due = self.clock() + self.interval
        self.commit()
        if self.wal is not None:
            self.wal.sync()  # the part says the log holds up to wal_seq
        p = self.pending = _Pending(self.step, self.wal_seq, self.num_changes,
                                    self.learner.updates, time.monotonic())
        if not self.weights_finite():
            p.outcome, p.error = False, "the model's weights are not finite"
            return
        state = snapshot(self.learner.state_dict())
        streams, totals = state.pop("streams"), state["totals"]
        part = {"world_size": self.cluster.world_size, "wal_seq": p.wal_seq,
                "created": time.time(), "version": __version__, "streams": streams,
                "totals": {"tokens_trained": totals.pop("tokens_trained"),
                           "bits": totals.pop("bits")}}
        replicated = None
        if self.cluster.rank == 0:
            replicated = {"learner": state, "batch_streams": self.learner.max_batch_streams,
                          "num_groups": self.cluster.num_groups, "version": __version__}

        def write():
            try:
                self.manifests.write_part(p.step, part, replicated)
                p.outcome = True
            except Exception as e:  # reported at the next tick, by every rank's decision
                p.outcome, p.error = False, f"{type(e).__name__}: {e}"
        p.thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        p.thread.start()

    def _collect_part(self) -> None:
        p = self.pending
        if p is not None and p.thread is not None and not p.thread.is_alive():
            p.thread.join()
            p.thread = None

    def _write_manifest(self, wal_seqs: list[int]) -> None:
        p = self.pending
        try:
            self.manifests.commit(p.step, p.updates, self.cluster.num_groups, wal_seqs)
            self.commit_to_report = p.step + 1
        except Exception as e:  # the others hear it at the next tick: part_failed
            p.outcome, p.error = False, f"the manifest: {type(e).__name__}: {e}"

    def _committed(self, step: int) -> None:
        p, self.pending = self.pending, None
        self.commit_to_report = 0
        saved = Saved(self.manifests.manifest_path(step), p.wal_seq,
                      time.monotonic() - p.started)
        self.num_failed_in_row = 0
        self.last_checkpoint = saved
        self.changes_at_checkpoint, self.updates_at_checkpoint = p.changes, p.updates
        self._finish(saved)
        self.metrics.checkpoint_seconds.observe(saved.seconds)
        self.metrics.checkpoint_last_success.set(time.time())
        removed = 0
        self.manifests.prune()
        ours = [m for m in self.manifests.readable()
                if m["world_size"] == self.cluster.world_size]  # older ones: other logs
        if self.wal is not None and ours:
            removed = self.wal.remove_covered(int(ours[-1]["parts"][self.cluster.rank]
                                                  ["wal_seq"]))
        self.log.info("checkpoint saved", step=step, path=str(saved.path),
                      wal_seq=saved.wal_seq, seconds=round(saved.seconds, 3),
                      log_segments_removed=removed)

    def _abandon(self) -> None:
        p, self.pending = self.pending, None
        self.commit_to_report = 0
        mine = f" (this rank: {p.error})" if p.error else ""
        self._failed(f"checkpoint of step {p.step} failed on a rank{mine}; the previous "
                     "one stays, the logs keep everything since")

    def recover(self, fresh: bool = False, should_stop: Callable[[], bool] = lambda: False,
                progress: Callable[[str], None] = lambda line: None) -> None:
        lockstep_recovery.recover(self, fresh, progress)

    def close(self) -> None:
        if self.pending is not None and self.pending.thread is not None:
            self.pending.thread.join()
        if self.wal is not None:
            self.wal.close()
        self.lock_file.close()
        if self.root_lock is not None:
            self.root_lock.close()

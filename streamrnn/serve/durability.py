"""The daemon's memory across crashes: write-ahead log and checkpoints (recovery.py reads
them back at start).

    every change      logged (tokens appended, an update about to run, streams flushed,
                      a stream ended) before it is applied; acks go out after the
                      group's fsync (wal.mode = fsync)
    every few minutes a checkpoint of the whole state, written on a thread from a
                      snapshot; log segments it makes unneeded are deleted

The state folder is locked (flock) while a daemon uses it: a second `streamrnn serve`
on the same folder would replay and append to the same log.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..config import Config, StartupError
from ..core.learner import Learner
from . import recovery
from .checkpoint import CheckpointError, Checkpoints, Saved
from .wal import WalFull, WriteAheadLog

FLUSH_RECORD_STREAMS = 4096  # streams per flush record: keeps records far below MAX_RECORD
RETRY_FIRST_SECONDS = 5.0    # a failed checkpoint is tried again after 5, 10, 20 ... s
PROBE_SECONDS = 1.0          # a full log is probed for room this often


class LogFull(Exception):
    """The log cannot take a record (no space, no inode for its next file): training
    pauses, input is answered busy, until a probe finds room."""


class Durability:
    def __init__(self, config: Config, learner: Learner, metrics, log,
                 clock: Callable[[], float] = time.monotonic, root: Path | None = None):
        """`root`: the state folder (checkpoint.dir; one rank of several: its own)."""
        self.config, self.learner, self.metrics, self.log = config, learner, metrics, log
        self.clock = clock
        self.root = Path(root or config.checkpoint.resolved_dir())
        self.lock_file = lock(self.root)  # before anything in the folder is touched
        self.checkpoints = Checkpoints(self.root / "checkpoints", config.checkpoint.keep)
        self.wal: WriteAheadLog | None = None
        self.wal_seq = 0                     # the newest record applied
        self.num_changes = 0                 # changes logged (counted with wal.mode = off too)
        self.last_checkpoint: Saved | None = None
        self.changes_at_checkpoint = -1      # none written by this process yet
        self.last_fsync = clock()
        self.interval = config.checkpoint.interval_seconds or float("inf")
        self.next_due = clock() + self.interval
        self.updates_at_checkpoint = 0
        self.num_failed_in_row = 0           # checkpoint writes failed since the last good one
        self.full_since: float | None = None  # the log's disk is full since then
        self.last_probe = 0.0
        # checkpoint requests: write n is ticket n; `results` holds the latest outcomes
        self.num_started = 0
        self.num_finished = 0
        self.results: dict[int, Saved | None] = {}
        self.wanted = False                  # a request came while a write was busy

    def recover(self, fresh: bool = False, should_stop: Callable[[], bool] = lambda: False,
                progress: Callable[[str], None] = lambda line: None) -> None:
        recovery.recover(self, fresh, should_stop, progress)
        self.updates_at_checkpoint = self.learner.updates
        if self.last_checkpoint is not None and self.wal_seq == self.last_checkpoint.wal_seq:
            self.changes_at_checkpoint = self.num_changes  # the loaded one holds it all

    def unreadable(self, path: Path, error: CheckpointError) -> None:
        self.metrics.checkpoint_load_failures.inc()
        self.log.error("checkpoint unreadable, using the one before it and more of the log",
                       path=str(path), error=str(error))

    # ---- logging changes ---------------------------------------------------------------
    def log_tokens(self, stream: str, tokens: np.ndarray) -> None:
        self._log({"t": "tokens", "s": stream, "k": tokens.astype("<u4").tobytes()})

    def log_train(self, num_targets: int | None = None) -> None:
        """Before the update runs: it is a pure function of what the log holds before.
        (`num_targets`, every rank's: see ClusterDurability.)"""
        self._log({"t": "train"})

    def log_end(self, stream: str) -> None:
        self._log({"t": "end", "s": stream})

    def log_flush(self, streams: list[str]) -> None:
        """(At most FLUSH_RECORD_STREAMS streams: the daemon flushes in groups.)"""
        self._log({"t": "flush", "s": streams})

    def _log(self, record: dict) -> None:
        if not self.has_room() or not self.append(record):
            raise LogFull()

    def has_room(self) -> bool:
        """False while the log's disk is full. Probes for room once a second with a
        record that replays as nothing."""
        if self.full_since is None:
            return True
        if self.clock() - self.last_probe >= PROBE_SECONDS:
            self.last_probe = self.clock()
            if self.append({"t": "noop"}):
                self.log.info("write-ahead log has room again: training and intake resume",
                              paused_seconds=round(self.clock() - self.full_since, 1))
                self.full_since = None
        return self.full_since is None

    def append(self, record: dict) -> bool:
        """Write a record (not durable until commit); False if the log cannot take it."""
        if self.wal is None:
            self.num_changes += 1
            return True
        try:
            self.wal_seq = self.wal.append(record)
        except WalFull as e:
            self.metrics.wal_failures.inc()
            if self.full_since is None:
                self.full_since = self.last_probe = self.clock()
                self.log.error("write-ahead log full: training paused, input answered busy "
                               "until it has room", error=str(e))
            return False
        self.num_changes += 1
        return True

    def commit(self) -> None:
        """Before replies go out: make the logged group durable (per wal.mode)."""
        if self.wal is None:
            return
        now = self.clock()
        if self.config.wal.mode == "fsync" or now - self.last_fsync >= \
                self.config.wal.sync_ms / 1000:
            self.wal.sync()  # an fsync error here ends the process: nothing is acked
            self.last_fsync = now

    def sync_if_due(self) -> None:
        """wal.mode = async: records acked since the last fsync are synced within
        wal.sync_ms even when no further replies come to trigger it."""
        if self.wal is not None and self.wal.dirty:
            self.commit()

    # ---- checkpoints --------------------------------------------------------------------
    def tick_fields(self) -> dict:
        """What this process adds to the loop's tick (ClusterDurability: its checkpoint's
        progress, which the ranks agree on); one process decides alone, in poll."""
        return {}

    def after_tick(self, decision) -> None:
        self.poll()

    def poll(self) -> None:
        """Every turn: account for a finished write; start a requested or due one."""
        self._collect()
        if self.checkpoints.busy:
            return
        every = self.config.checkpoint.interval_updates
        due = self.clock() >= self.next_due or (
            every and self.learner.updates - self.updates_at_checkpoint >= every)
        if self.wanted or (due and self.num_changes != self.changes_at_checkpoint):
            self.wanted = False
            self._start()
        elif due:
            self.next_due = self.clock() + self.interval  # nothing new to write

    def request_checkpoint(self) -> int | None:
        """A checkpoint of the state as it is now: the ticket of the write that will hold
        it (its outcome is results[ticket] once num_finished reaches it), or None when
        the last checkpoint already holds everything."""
        if self.last_checkpoint is not None and self.num_changes == self.changes_at_checkpoint:
            return None
        if self.checkpoints.busy:  # that one holds an older state: one more after it
            self.wanted = True
            return self.num_started + 1
        self._start()
        return self.num_started

    def checkpoint_now(self, ping: Callable[[], None] = lambda: None) -> Saved | None:
        """Write a checkpoint and wait for it (at the end, or at start); `ping` is called
        while waiting (the watchdog). None if it failed."""
        self.checkpoints.wait(ping)
        self._collect()
        ticket = self.request_checkpoint()
        if ticket is None:
            return self.last_checkpoint
        self.checkpoints.wait(ping)
        self._collect()
        return self.results.get(ticket)

    def _start(self) -> None:
        """Snapshot the state and write it on a thread (the loop goes on meanwhile)."""
        self.num_started += 1
        self.next_due = self.clock() + self.interval
        self.commit()
        if self.wal is not None:
            self.wal.sync()
        if not self.weights_finite():
            self._failed("the model's weights are not finite: nothing is written from them "
                         "(the older checkpoints and the log stay)")
            return
        state = {"learner": snapshot(self.learner.state_dict()), "version": __version__,
                 "batch_streams": self.learner.max_batch_streams}
        self.pending_changes = self.num_changes
        self.pending_updates = self.learner.updates
        self.checkpoints.save_in_background(state, self.wal_seq)

    def weights_finite(self) -> bool:
        """Whether every weight is finite: none are written otherwise. Note: a device
        sync, once per checkpoint."""
        params = self.learner.model.parameters()
        return bool(torch.stack([p.isfinite().all() for p in params]).all())

    def _collect(self) -> None:
        """Account for the background write that finished, if any."""
        if self.checkpoints.busy or self.checkpoints.result is None:
            return
        result, self.checkpoints.result = self.checkpoints.result, None
        if isinstance(result, Exception):
            self._failed(f"checkpoint failed; the previous one stays, the log keeps "
                         f"everything since: {result}")
            return
        self.num_failed_in_row = 0
        self.last_checkpoint = result
        self.changes_at_checkpoint = self.pending_changes
        self.updates_at_checkpoint = self.pending_updates
        self._finish(result)
        self.metrics.checkpoint_seconds.observe(result.seconds)
        self.metrics.checkpoint_last_success.set(time.time())
        removed = 0
        oldest = self.checkpoints.oldest_kept_seq()
        if self.wal is not None and oldest is not None:
            removed = self.wal.remove_covered(oldest)
        self.log.info("checkpoint saved", path=str(result.path), wal_seq=result.wal_seq,
                      seconds=round(result.seconds, 3), log_segments_removed=removed)

    def _failed(self, message: str) -> None:
        """A write that failed: counted, logged, and tried again soon, sooner than the
        interval (5, 10, 20 ... s, at most the interval)."""
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

    def close(self) -> None:
        self.checkpoints.wait()
        self._collect()
        if self.wal is not None:
            self.wal.close()
        self.lock_file.close()  # releases the folder's lock

    @property
    def wal_bytes(self) -> int:
        return self.wal.total_bytes if self.wal is not None else 0


def lock(folder: Path):
    """One daemon per state folder: an flock on folder/lock, released by the kernel when
    the process ends. Returns the open lock file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock_file = open(folder / "lock", "a+")
    except OSError as e:
        raise StartupError(f"cannot use the state folder {folder} "
                           f"(checkpoint.dir): {e.strerror or e}") from e
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        raise StartupError(f"the state folder {folder} is in use by {holder}: one "
                           "daemon per folder (set checkpoint.dir for another)") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"streamrnn serve, pid {os.getpid()}\n")
    lock_file.flush()
    return lock_file


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

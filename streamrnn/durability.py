"""The daemon's memory across crashes: write-ahead log, checkpoints, and recovery.

    every change      logged (tokens appended, an update run, streams flushed) before it
                      is applied; acks go out after the group's fsync (wal.mode = fsync)
    every few minutes a checkpoint of the whole state, written on a thread from a
                      snapshot; log segments it makes unneeded are deleted
    at start          newest checkpoint that loads, then the log after it, record by
                      record: the recovered daemon is the one that never crashed
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, Checkpoints, Saved
from .config import Config, config_from_dict
from .learner import Learner, incompatible_keys
from .wal import WalFull, WriteAheadLog


class LogFull(Exception):
    """The log cannot take a record: training pauses, input is answered busy."""


class IncompatibleState(Exception):
    """The saved state was learned with another model; a fresh start must be asked for."""


class Durability:
    def __init__(self, config: Config, learner: Learner, metrics, log):
        self.config, self.learner, self.metrics, self.log = config, learner, metrics, log
        self.root = Path(config.checkpoint.resolved_dir())
        self.checkpoints = Checkpoints(self.root / "checkpoints", config.checkpoint.keep)
        self.wal: WriteAheadLog | None = None
        self.wal_seq = 0                     # the newest record applied
        self.last_checkpoint: Saved | None = None
        self.last_fsync = time.monotonic()
        self.next_due = time.monotonic() + (config.checkpoint.interval_seconds or float("inf"))
        self.updates_at_checkpoint = 0
        self.full_since: float | None = None  # the log's disk is full since then
        self.last_probe = 0.0

    # ---- start -----------------------------------------------------------------------------
    def recover(self, fresh: bool = False) -> None:
        """Load the newest good checkpoint and replay the log after it."""
        if fresh:
            self._set_aside()
        loaded = self.checkpoints.load_newest(self._unreadable)
        if loaded is not None:
            state, path = loaded
            differing = incompatible_keys(self.config, config_from_dict(
                state["learner"]["config"]))
            if differing:
                raise IncompatibleState(
                    f"the state in {self.root} was learned with a different config: "
                    f"{', '.join(differing)}. Use that config, or start afresh with "
                    "`streamrnn serve --fresh` (the old state is moved aside, not deleted)")
            self.learner.load_state_dict(state["learner"])
            torch.set_rng_state(state["rng"])
            self.wal_seq = int(state["wal_seq"])
            self.last_checkpoint = Saved(path, self.wal_seq, 0.0)
            self.metrics.checkpoint_last_success.set(state["created"])
            self.updates_at_checkpoint = self.learner.updates
            self.log.info("checkpoint loaded", path=str(path), updates=self.learner.updates,
                          streams=len(self.learner.streams.ids), wal_seq=self.wal_seq)
        if self.config.wal.mode == "off":
            return
        self.wal = WriteAheadLog(self.root / "wal", self.config.wal.segment_bytes,
                                 fsync=True, start_after=self.wal_seq)
        if self.wal.torn_bytes:
            self.log.warning("cut a torn record off the log's tail (a crash mid-write; it "
                             "was never acknowledged)", bytes=self.wal.torn_bytes)
        replayed_tokens = replayed = 0
        started = time.monotonic()
        for record in self.wal.records_after(self.wal_seq):
            replayed_tokens += self._apply(record)
            replayed += 1
            self.wal_seq = record["q"]
        self.metrics.recovery_replayed_tokens.inc(replayed_tokens)
        if replayed:
            self.log.info("replayed the log", records=replayed, tokens=replayed_tokens,
                          seconds=round(time.monotonic() - started, 3),
                          updates=self.learner.updates)

    def _apply(self, record: dict) -> int:
        kind = record["t"]
        if kind == "tokens":
            tokens = np.frombuffer(record["k"], "<u4").astype(np.int32)
            self.learner.streams.append(record["s"], tokens)
            return len(tokens)
        if kind == "train":
            done = self.learner.train(1)
            assert done.updates == 1, f"log record {record['q']}: no update was ready"
        elif kind == "flush":
            self.learner.flush(record["s"])
        return 0  # "noop": a probe written while the disk was full

    def _unreadable(self, path: Path, error: CheckpointError) -> None:
        self.metrics.checkpoint_load_failures.inc()
        self.log.error("checkpoint unreadable, using the one before it and more of the log",
                       path=str(path), error=str(error))

    def _set_aside(self) -> None:
        if not any(self.root.iterdir()):
            return
        aside = self.root.parent / f"{self.root.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
        self.root.rename(aside)
        self.root.mkdir(parents=True)
        self.checkpoints = Checkpoints(self.root / "checkpoints", self.config.checkpoint.keep)
        self.log.warning("fresh start: the previous state was moved aside", to=str(aside))

    # ---- logging changes ---------------------------------------------------------------------
    def log_tokens(self, stream: str, tokens: np.ndarray) -> bool:
        """Log appended tokens; False if the log cannot take them (disk full)."""
        if not self.healthy:
            return False
        return self._append({"t": "tokens", "s": stream,
                             "k": tokens.astype("<u4").tobytes()})

    def log_train(self) -> None:
        if not self._append({"t": "train"}):
            raise LogFull()

    def log_flush(self, streams: list[str]) -> None:
        if not self._append({"t": "flush", "s": streams}):
            raise LogFull()

    @property
    def healthy(self) -> bool:
        """False while the log's disk is full. Probes for room once a second with a
        record that replays as nothing."""
        if self.full_since is None:
            return True
        if time.monotonic() - self.last_probe >= 1.0:
            self.last_probe = time.monotonic()
            if self._append({"t": "noop"}):
                self.log.info("write-ahead log has room again: training and intake resume",
                              paused_seconds=round(time.monotonic() - self.full_since, 1))
                self.full_since = None
        return self.full_since is None

    def _append(self, record: dict) -> bool:
        if self.wal is None:
            return True
        try:
            self.wal_seq = self.wal.append(record)
            return True
        except WalFull as e:
            self.metrics.wal_failures.inc()
            if self.full_since is None:
                self.full_since = self.last_probe = time.monotonic()
                self.log.error("write-ahead log full: training paused, input answered busy "
                               "until it has room", error=str(e))
            return False

    def commit(self) -> None:
        """Before replies go out: make the logged group durable (per wal.mode)."""
        if self.wal is None:
            return
        now = time.monotonic()
        if self.config.wal.mode == "fsync" or now - self.last_fsync >= \
                self.config.wal.sync_ms / 1000:
            self.wal.sync()  # an fsync error here ends the process: nothing is acked
            self.last_fsync = now

    # ---- checkpoints --------------------------------------------------------------------------
    def maybe_checkpoint(self, now: float) -> None:
        """Called from housekeeping: report a finished write, start one when due."""
        self._collect()
        every = self.config.checkpoint.interval_updates
        due = now >= self.next_due or (
            every and self.learner.updates - self.updates_at_checkpoint >= every)
        if due and not self.checkpoints.busy:
            self.checkpoint(wait=False)

    def checkpoint(self, wait: bool = True) -> Saved | None:
        self.commit()
        if self.wal is not None:
            self.wal.sync()
        state = {"learner": _snapshot(self.learner.state_dict()),
                 "rng": torch.get_rng_state(), "version": _version()}
        self.next_due = time.monotonic() + (
            self.config.checkpoint.interval_seconds or float("inf"))
        self.updates_at_checkpoint = self.learner.updates
        self.checkpoints.save_in_background(state, self.wal_seq)
        if wait:
            self.checkpoints.wait()
            return self._collect()
        return None

    def _collect(self) -> Saved | None:
        """Account for the background write that finished, if any."""
        if self.checkpoints.busy or self.checkpoints.result is None:
            return None
        result, self.checkpoints.result = self.checkpoints.result, None
        if isinstance(result, Exception):
            self.metrics.checkpoint_failures.inc()
            self.log.error("checkpoint failed; the previous one stays, the log keeps "
                           "everything since", error=str(result))
            return None
        self.last_checkpoint = result
        self.metrics.checkpoint_seconds.observe(result.seconds)
        self.metrics.checkpoint_last_success.set(time.time())
        removed = 0
        oldest = self.checkpoints.oldest_kept_seq()
        if self.wal is not None and oldest is not None:
            removed = self.wal.remove_covered(oldest)
        self.log.info("checkpoint saved", path=str(result.path), wal_seq=result.wal_seq,
                      seconds=round(result.seconds, 3), log_segments_removed=removed)
        return result

    def close(self) -> None:
        self.checkpoints.wait()
        self._collect()
        if self.wal is not None:
            self.wal.close()

    @property
    def wal_bytes(self) -> int:
        return self.wal.total_bytes if self.wal is not None else 0


def _snapshot(tree):
    """A deep copy of a state dict on the CPU: the training loop may go on meanwhile."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _snapshot(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_snapshot(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_snapshot(v) for v in tree)
    return tree


def _version() -> str:
    from . import __version__
    return __version__


"""The daemon's memory across crashes: write-ahead log, checkpoints, and recovery.

    every change      logged (tokens appended, an update run, streams flushed) before it
                      is applied; acks go out after the group's fsync (wal.mode = fsync)
    every few minutes a checkpoint of the whole state, written on a thread from a
                      snapshot; log segments it makes unneeded are deleted
    at start          newest checkpoint that loads, then the log after it, record by
                      record: the recovered daemon is the one that never crashed

The state folder is locked (flock) while a daemon uses it: a second `streamrnn serve`
on the same folder would replay and append to the same log.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import CheckpointError, Checkpoints, Saved
from ..config import Config, StartupError, config_from_dict
from ..core.learner import Learner, incompatible_keys
from .wal import WalDamaged, WalFull, WriteAheadLog

FLUSH_RECORD_STREAMS = 4096  # streams per flush record: keeps records far below MAX_RECORD
REPLAY_STATUS_SECONDS = 5.0


class LogFull(Exception):
    """The log cannot take a record: training pauses, input is answered busy."""


class IncompatibleState(Exception):
    """The saved state cannot be continued as it is (learned with another model, or a
    damaged or incomplete log): a person must choose, so the daemon refuses to start."""


class Durability:
    def __init__(self, config: Config, learner: Learner, metrics, log):
        self.config, self.learner, self.metrics, self.log = config, learner, metrics, log
        self.root = Path(config.checkpoint.resolved_dir())
        self.lock_file = None
        self._lock()  # before anything in the folder is touched
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
    def recover(self, fresh: bool = False, should_stop: Callable[[], bool] = lambda: False,
                progress: Callable[[str], None] = lambda line: None) -> None:
        """Load the newest good checkpoint and replay the log after it. `should_stop` is
        asked between records (a stop request during a long replay); `progress` gets a
        status line every few seconds of replay."""
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
            # the batch width of the updates logged after it (see _apply's "config")
            self.learner.max_batch_streams = int(state.get(
                "batch_streams", self.config.train.max_batch_streams))
            torch.set_rng_state(state["rng"])
            self.wal_seq = int(state["wal_seq"])
            self.last_checkpoint = Saved(path, self.wal_seq, 0.0)
            self.metrics.checkpoint_last_success.set(state["created"])
            self.updates_at_checkpoint = self.learner.updates
            self.log.info("checkpoint loaded", path=str(path), updates=self.learner.updates,
                          streams=len(self.learner.streams.ids), wal_seq=self.wal_seq)
        log_dir = self.root / "wal"
        if self.config.wal.mode == "off" and not any(log_dir.glob("wal-*.log")):
            return
        try:
            self.wal = WriteAheadLog(log_dir, self.config.wal.segment_bytes,
                                     fsync=True, start_after=self.wal_seq)
        except WalDamaged as e:
            raise IncompatibleState(str(e)) from e
        if self.wal.torn_bytes:
            self.log.warning("cut a torn record off the log's tail (a crash mid-write; it "
                             "was never acknowledged)", bytes=self.wal.torn_bytes)
        replayed = self._replay(should_stop, progress, loaded is not None)
        if should_stop():
            return  # the rest of the log stays for the next start
        # replayed to the end: from here on, updates run as this config says
        self.learner.max_batch_streams = self.config.train.max_batch_streams
        if self.config.wal.mode == "off":
            self._retire_log()
        else:
            self._append({"t": "config", "c": self.config.to_dict()})  # see _apply

    def _replay(self, should_stop, progress, from_checkpoint: bool) -> int:
        replayed_tokens = replayed = 0
        started = next_status = time.monotonic()
        for record in self.wal.records_after(self.wal_seq):
            if record["q"] != self.wal_seq + 1:
                where = (f"the checkpoint covers records up to {self.wal_seq}"
                         if from_checkpoint else "no checkpoint could be loaded")
                raise IncompatibleState(
                    f"the log in {self.root / 'wal'} continues at record {record['q']} "
                    f"but {where}: acknowledged input in between would be lost. "
                    "Restore the missing checkpoint or log files, or start afresh "
                    "with `streamrnn serve --fresh`")
            replayed_tokens += self._apply(record)
            replayed += 1
            self.wal_seq = record["q"]
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + REPLAY_STATUS_SECONDS
                progress(f"replaying the log: record {self.wal_seq}, "
                         f"{self.learner.updates:,} updates")
                if should_stop():
                    self.log.warning("stop requested during replay; the rest of the "
                                     "log stays for the next start", at=self.wal_seq)
                    break
        self.metrics.recovery_replayed_tokens.inc(replayed_tokens)
        seconds = time.monotonic() - started
        if replayed:
            self.log.info("replayed the log", records=replayed, tokens=replayed_tokens,
                          seconds=round(seconds, 3), updates=self.learner.updates)
        if seconds > 60:  # a crash now would replay all of it again: checkpoint soon
            self.next_due = time.monotonic()
        return replayed

    def _apply(self, record: dict) -> int:
        kind = record["t"]
        if kind == "tokens":
            tokens = np.frombuffer(record["k"], "<u4").astype(np.int32)
            self.learner.streams.append(record["s"], tokens)
            return len(tokens)
        if kind == "train":
            if self.learner.train(1).updates != 1:
                raise IncompatibleState(
                    f"log record {record['q']} says an update ran there, but replaying "
                    "the log before it leaves none ready: the log does not belong to the "
                    f"state it follows in {self.root}")
        elif kind == "flush":
            self.learner.flush(record["s"])
        elif kind == "end":
            self.learner.end(record["s"])
        elif kind == "config":
            # the config the following records were made with: same model, and their
            # updates replayed with the batch width they ran with
            logged = config_from_dict(record["c"])
            differing = incompatible_keys(self.config, logged)
            if differing:
                raise IncompatibleState(
                    f"the log in {self.root / 'wal'} was written with a different config: "
                    f"{', '.join(differing)}. Use that config, or start afresh with "
                    "`streamrnn serve --fresh` (the old state is moved aside, not deleted)")
            self.learner.max_batch_streams = logged.train.max_batch_streams
        return 0  # "noop": a probe written while the disk was full

    def _retire_log(self) -> None:
        """wal.mode = off with a log from an earlier run: the log was replayed above;
        a checkpoint now holds it, then it goes (stale records must never replay onto
        a newer state later)."""
        if self.checkpoint(wait=True) is None:
            raise StartupError("wal.mode = off, and the log left by an earlier run could "
                               "not be folded into a checkpoint (see the error above)")
        self.wal.close()
        for path in (self.root / "wal").glob("wal-*.log"):
            path.unlink()
        self.wal = None
        self.log.info("wal.mode = off: the earlier log was replayed, checkpointed and "
                      "removed")

    def _lock(self) -> None:
        """One daemon per state folder (released by the kernel when the process ends)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.lock_file = open(self.root / "lock", "a+")
        except OSError as e:
            raise StartupError(f"cannot use the state folder {self.root} "
                               f"(checkpoint.dir): {e.strerror or e}") from e
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock_file.seek(0)
            holder = self.lock_file.read().strip() or "another process"
            raise StartupError(f"the state folder {self.root} is in use by {holder}: one "
                               "daemon per folder (set checkpoint.dir for another)") from None
        self.lock_file.seek(0)
        self.lock_file.truncate()
        self.lock_file.write(f"streamrnn serve, pid {os.getpid()}\n")
        self.lock_file.flush()

    def _unreadable(self, path: Path, error: CheckpointError) -> None:
        self.metrics.checkpoint_load_failures.inc()
        self.log.error("checkpoint unreadable, using the one before it and more of the log",
                       path=str(path), error=str(error))

    def _set_aside(self) -> None:
        """--fresh: move checkpoints and log into a dated folder inside the state folder
        (the folder itself may be a mount point, as systemd's StateDirectory is)."""
        parts = [self.root / name for name in ("checkpoints", "wal")
                 if (self.root / name).is_dir() and any((self.root / name).iterdir())]
        if not parts:
            return
        aside = Path(tempfile.mkdtemp(prefix=f"previous-{time.strftime('%Y%m%d-%H%M%S')}-",
                                      dir=self.root))
        for part in parts:
            part.rename(aside / part.name)
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

    def log_end(self, stream: str) -> bool:
        """Log that a stream ended; False if the log cannot take it (disk full)."""
        return self.healthy and self._append({"t": "end", "s": stream})

    def log_flush(self, streams: list[str]) -> None:
        """(At most FLUSH_RECORD_STREAMS streams: the daemon flushes in groups.)"""
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

    def sync_if_due(self) -> None:
        """wal.mode = async: records acked since the last fsync are synced within
        wal.sync_ms even when no further replies come to trigger it."""
        if self.wal is not None and self.wal.dirty:
            self.commit()

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
        self.checkpoints.wait()
        self._collect()  # a finished write's outcome must be counted before the next
        self.commit()
        if self.wal is not None:
            self.wal.sync()
        state = {"learner": _snapshot(self.learner.state_dict()),
                 "rng": torch.get_rng_state(), "version": _version(),
                 "batch_streams": self.learner.max_batch_streams}
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
    from .. import __version__
    return __version__


"""Checkpoints: the whole learned state in one file, written so a crash never leaves half.

A checkpoint holds the learner's state (weights, optimizer, per-stream start states,
token rings and offsets, lifetime totals, config) and `wal_seq`: the last
write-ahead-log record it includes. Nothing else: no RNG state or anything a recovered
daemon could not reproduce, so a crashed and an uninterrupted run write equal files.
Files are named `checkpoint-<wal_seq, 16 digits>-<number, 6 digits>.pt`: the number
counts up with each one, so they stay apart without a log (wal.mode = off), where
wal_seq does not move (older files, named by wal_seq alone, count as number 0). Writing: a temp file in the same folder,
fsync, os.replace, fsync of the folder. Reading: torch.load(weights_only=True), never
arbitrary pickles. The newest `keep` are kept; a corrupt newest one is skipped for the
one before it (the log still holds everything after that one).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import faults
from .wal import fsync_dir

FORMAT = "streamrnn.checkpoint/1"


@dataclass(frozen=True)
class Saved:
    path: Path
    wal_seq: int
    seconds: float


class CheckpointError(Exception):
    pass


class Checkpoints:
    def __init__(self, directory: Path, keep: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        for leftover in self.dir.glob("*.tmp"):  # a write a crash interrupted
            leftover.unlink()
        self._writer: threading.Thread | None = None
        self.result: Saved | Exception | None = None  # of the latest background write

    def paths(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        ours = [path for path in self.dir.glob("checkpoint-*.pt") if _order(path) >= (0, 0)]
        return sorted(ours, key=_order, reverse=True)

    # ---- writing ---------------------------------------------------------------------------
    def save(self, state: dict, wal_seq: int) -> Saved:
        """Write a checkpoint now (the caller waits)."""
        started = time.monotonic()
        paths = self.paths()
        number = _order(paths[0])[1] + 1 if paths else 1
        path = self.dir / f"checkpoint-{wal_seq:016d}-{number:06d}.pt"
        write_atomically(path, {"format": FORMAT, "created": time.time(), "wal_seq": wal_seq,
                                **state})
        for old in self.paths()[self.keep:]:
            old.unlink()
        return Saved(path, wal_seq, time.monotonic() - started)

    def save_in_background(self, state: dict, wal_seq: int) -> None:
        """Write on a thread (the state must be a snapshot: nothing may change it)."""
        self.wait()

        def write():
            try:
                self.result = self.save(state, wal_seq)
            except Exception as e:  # reported by the daemon's loop
                self.result = e
        self.result = None
        self._writer = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self._writer.start()

    @property
    def busy(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    def wait(self, ping=lambda: None) -> None:
        """Until the write in progress is done; `ping` every second meanwhile (the
        watchdog: a big model's checkpoint takes longer than WatchdogSec)."""
        if self._writer is not None:
            while self._writer.is_alive():
                ping()
                self._writer.join(timeout=1.0)
            self._writer = None

    def oldest_kept_seq(self) -> int | None:
        paths = self.paths()
        return _order(paths[-1])[0] if paths else None

    # ---- reading ---------------------------------------------------------------------------
    def load_newest(self, on_error) -> tuple[dict, Path] | None:
        """The newest checkpoint that loads; `on_error(path, error)` hears of each one
        that does not. None if there is none."""
        for path in self.paths():
            try:
                return load(path), path
            except CheckpointError as e:
                on_error(path, e)
        return None


def write_atomically(path: Path, state, save=torch.save) -> None:
    """save(state, file) to a temp file beside `path` (torch.save unless told), fsync,
    rename over it, fsync the folder: a crash leaves the old file or the new one, never
    half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            save(state, f)
            faults.maybe_fail("checkpoint_write")
            faults.maybe_crash("checkpoint_write")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load(path: Path, map_location="cpu", format: str = FORMAT) -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        raise CheckpointError(f"{path} cannot be read: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}"[:300]) from e
    if not isinstance(state, dict) or state.get("format") != format:
        raise CheckpointError(f"{path} is not a streamrnn checkpoint "
                              f"(format {state.get('format') if isinstance(state, dict) else None!r})")
    return state


def summary(state: dict) -> dict:
    """What `streamrnn checkpoint inspect/list` shows."""
    learner = state["learner"]
    totals = learner["totals"]
    config = learner["config"]
    return {"created": state["created"], "wal_seq": state["wal_seq"],
            "updates": totals["updates"], "tokens_trained": totals["tokens_trained"],
            "bits": totals["bits"],
            "bits_per_token": totals["bits"] / totals["tokens_trained"]
            if totals["tokens_trained"] else None,
            "streams": len(learner["streams"]["ids"]), "version": state.get("version"),
            "config": config}


def _order(path: Path) -> tuple[int, int]:
    """(wal_seq, number) from the name; names of older versions have no number."""
    parts = path.stem.split("-")
    try:
        return int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        return -1, -1  # not a name of ours: left alone

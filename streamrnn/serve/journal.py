"""What the write-ahead log records, and what each record does: `apply` is the one
function that both the live path and the replay call, so a replay makes what the live
path made.

    tokens  {"t": "tokens", "s": stream, "k": <uint32 LE>}  appended to the stream
    flush   {"t": "flush", "s": [streams]}  their last r < k1 targets train in the next
                                            updates (idle streams, a flush request)
    end     {"t": "end", "s": stream}       no more tokens: flushed, then forgotten
    train   {"t": "train", "g": G, "n": N}  global step G: one update, N targets over
                                            every rank; which windows follows from the
                                            streams the records before built
    resume  {"t": "resume", "g": G}         the steps logged after G did not run (a rank
                                            died before taking them): void
    config  {"t": "config", "c": {...}}     the config the records after it ran with
    noop    {"t": "noop"}                   a probe for disk room; changes nothing

Every process (rank) logs its own records, and every global step before its
collectives; replies go out once the group is durable (wal.mode). streamrnn 0.2.0's
logs differ in two records (`legacy`): a flush trained at once (and, of one process, a
train record had no step number).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import Config, config_from_dict
from ..core.learner import Learner, incompatible_keys, settings_to_continue
from ..core.streams import Plan
from .wal import WalFull, WriteAheadLog

FLUSH_RECORD_STREAMS = 4096  # streams per flush record: keeps records far below MAX_RECORD
PROBE_SECONDS = 1.0          # a full log is probed for room this often
CHANGES = ("tokens", "flush", "end", "train")  # the records that change the learned state
FRESH_HINT = "start afresh with `streamrnn serve --fresh` (the old state is moved aside, " \
             "not deleted)"


class LogFull(Exception):
    """The log cannot take a record (no space, no inode for its next file): training
    pauses, input is answered busy, until a probe finds room."""


class IncompatibleState(Exception):
    """The saved state cannot be continued as it is (learned with another model, a
    damaged or incomplete log, a layout it cannot take over): a person must choose, so
    the daemon refuses to start (exit 2)."""


def tokens_record(stream: str, tokens: np.ndarray) -> dict:
    return {"t": "tokens", "s": stream, "k": tokens.astype("<u4").tobytes()}


def apply(learner: Learner, record: dict, plan: Plan | None = None,
          legacy: bool = False) -> int:
    """Do what `record` says to `learner`; returns the tokens it appended. A train
    record runs `plan` (the union of several ranks' plans in a replay of them) or, by
    default, the learner's next update."""
    kind = record["t"]
    if kind == "tokens":
        tokens = np.frombuffer(record["k"], "<u4").astype(np.int32)
        learner.streams.append(record["s"], tokens)
        return len(tokens)
    if kind == "train":
        plan = plan if plan is not None else learner.next_update()
        if plan is None and not learner.ranks.distributed:
            raise IncompatibleState(
                f"log record {record['q']} says an update ran there, but the records "
                "before it leave none ready: the log does not belong to the state it "
                "follows")
        distributed = learner.ranks.distributed
        learner.step(plan, int(record["n"]) if distributed else None)
    elif kind == "flush" and legacy:  # 0.2.0: every window of these, then and there
        learner.flush_many(record["s"])
    elif kind == "flush":
        learner.streams.flush(record["s"])
    elif kind == "end":
        learner.end(record["s"])
    elif kind == "config":
        # the config the records after it were made with: the same model, and their
        # updates run with the batch width and learning settings they ran with
        follow(learner, config_from_dict(record["c"]), what="log")
    return 0  # resume (read by the replay), noop


def follow(learner: Learner, logged: Config, what: str) -> None:
    """Run the next updates as `logged` says (a config record, a checkpoint's config),
    refusing one of another model."""
    differing = incompatible_keys(learner.config, logged)
    if differing:
        raise IncompatibleState(
            f"the {what} was written with a different config: {', '.join(differing)}. To "
            f"continue it, use its settings (`{settings_to_continue(learner.config, logged)}"
            "`, or the same keys in the config file: a newer version's defaults do not "
            "change a running model), or " + FRESH_HINT)
    learner.max_batch_streams = logged.train.max_batch_streams
    learner.tune(logged.train)


def steps_of(records: list[dict], after: int, legacy: bool) -> tuple[list[int], set[int]]:
    """The global steps logged after step `after`, in order, that count, and the
    sequence numbers of the step records that do not (void: a resume record after them
    names an earlier step). 0.2.0's one-process records carry no step: numbered on."""
    steps, resumes = [], []
    for record in records:
        if record["t"] == "resume":
            resumes.append((record["q"], record["g"]))
        elif record["t"] in ("train", "flush") and ("g" in record or legacy):
            steps.append((record["q"], record.get("g", after + len(steps) + 1)))
    void = {q for q, g in steps if any(qr > q and gr < g for qr, gr in resumes)}
    return [g for q, g in steps if q not in void], void


class Journal:
    """This process's write-ahead log, as wal.mode says: `fsync` (acks once on disk),
    `async` (fsynced within wal.sync_ms), `off` (none: changes are only counted)."""

    def __init__(self, config: Config, metrics, log, clock: Callable[[], float]):
        self.config, self.metrics, self.log, self.clock = config, metrics, log, clock
        self.wal: WriteAheadLog | None = None
        self.wal_seq = 0         # the newest record written or replayed
        self.step = 0            # the newest global step logged or replayed
        self.num_changes = 0     # records written that change the learned state
        self.last_fsync = clock()
        self.full_since: float | None = None  # the log's disk is full since then
        self.last_probe = 0.0

    def open(self, folder: Path, start_after: int) -> None:
        """Open (or create) the log in `folder`, numbering new records after
        `start_after`; with wal.mode = off, nothing."""
        if self.config.wal.mode != "off":
            self.wal = WriteAheadLog(folder, self.config.wal.segment_bytes, fsync=True,
                                     start_after=start_after)
            self.wal_seq = self.wal.last_seq

    # ---- writing ------------------------------------------------------------------------
    def do(self, learner: Learner, record: dict) -> None:
        """Log a record of this process (tokens, flush, end), then apply it."""
        self.write(record)
        apply(learner, record)

    def log_step(self, num_targets: int) -> dict:
        """Log the next global step (before it runs; apply() runs it)."""
        record = {"t": "train", "g": self.step + 1, "n": int(num_targets)}
        self.write(record)
        self.step += 1
        return record

    def cancel_step(self) -> bool:
        """Another rank could not log the step this one just logged: it does not run.
        A resume record voids it, and its number is free for the next one. False if
        even that cannot be written (the restart voids it anyway)."""
        self.step -= 1
        return self.append({"t": "resume", "g": self.step})

    def write(self, record: dict) -> None:
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
        """Write a record (durable at the next commit); False if the log cannot take it."""
        if self.wal is not None:
            try:
                self.wal_seq = self.wal.append(record)
            except WalFull as e:
                self.metrics.wal_failures.inc()
                if self.full_since is None:
                    self.full_since = self.last_probe = self.clock()
                    self.log.error("write-ahead log full: training paused, input answered "
                                   "busy until it has room", error=str(e))
                return False
        if record["t"] in CHANGES:
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

    def sync(self) -> None:
        """Everything written is durable (before a checkpoint says the log holds it)."""
        if self.wal is not None:
            self.wal.sync()
            self.last_fsync = self.clock()

    def sync_if_due(self) -> None:
        """wal.mode = async: records acked since the last fsync are synced within
        wal.sync_ms even when no further replies come to trigger it."""
        if self.wal is not None and self.wal.dirty:
            self.commit()

    def remove_covered(self, wal_seq: int) -> int:
        return self.wal.remove_covered(wal_seq) if self.wal is not None else 0

    def close(self) -> None:
        if self.wal is not None:
            self.wal.close()

    @property
    def wal_bytes(self) -> int:
        return self.wal.total_bytes if self.wal is not None else 0


class ReplayClock:
    """Status lines every few seconds of a long replay (and a stop request heard)."""

    def __init__(self, progress: Callable[[str], None], every: float = 5.0):
        self.progress, self.every = progress, every
        self.started = self.next = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() < self.next:
            return False
        self.next = time.monotonic() + self.every
        return True

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

"""Recovery at start: the newest checkpoint that loads, then the log after it, record by
record, so that the recovered daemon is the one that never crashed.

Refused, with a message that says what to do (the daemon exits 2): a checkpoint or a log
of another model, a log that does not continue where the loaded state ends (acknowledged
input in between would be lost), damage anywhere in the log but its torn tail.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..config import StartupError, config_from_dict
from ..core.learner import changed_settings, incompatible_keys, settings_to_continue
from .checkpoint import Checkpoints, Saved
from .wal import WalDamaged, WriteAheadLog

if TYPE_CHECKING:
    from .durability import Durability

REPLAY_STATUS_SECONDS = 5.0
FRESH_HINT = "start afresh with `streamrnn serve --fresh` (the old state is moved aside, " \
             "not deleted)"


class IncompatibleState(Exception):
    """The saved state cannot be continued as it is (learned with another model, or a
    damaged or incomplete log): a person must choose, so the daemon refuses to start."""


def recover(d: Durability, fresh: bool, should_stop: Callable[[], bool],
            progress: Callable[[str], None]) -> None:
    """Load the newest good checkpoint into d.learner and replay the log after it.
    `should_stop` is asked between records (a stop request during a long replay);
    `progress` gets a status line every few seconds of replay."""
    if fresh:
        _set_aside(d)
    if any((d.root / "cluster").glob("manifest-*.json")):
        from .lockstep_recovery import leave_cluster  # (which imports this module)
        leave_cluster(d)  # the state of several ranks: taken over, or refused
    loaded = d.checkpoints.load_newest(d.unreadable)
    if loaded is not None:
        _load(d, *loaded)
    log_dir = d.root / "wal"
    if d.config.wal.mode == "off" and not any(log_dir.glob("wal-*.log")):
        _follow_config(d)
        return
    try:
        d.wal = WriteAheadLog(log_dir, d.config.wal.segment_bytes, fsync=True,
                              start_after=d.wal_seq)
    except WalDamaged as e:
        raise IncompatibleState(str(e)) from e
    if d.wal.torn_bytes:
        d.log.warning("cut a torn record off the log's tail (a crash mid-write; it was "
                      "never acknowledged)", bytes=d.wal.torn_bytes)
    _replay(d, should_stop, progress, loaded is not None)
    if should_stop():
        return  # the rest of the log stays for the next start
    _follow_config(d)
    if d.config.wal.mode == "off":
        _retire_log(d)
    elif not d.append({"t": "config", "c": d.config.to_dict()}):  # see _apply
        # without it, a replay would run the updates that follow with the batch width
        # and learning settings of the config before: refuse rather than log what cannot
        # be replayed
        raise StartupError(f"the write-ahead log in {log_dir} cannot take a record (see "
                           "the error above): free space there, then start again")


def _follow_config(d: Durability) -> None:
    """Replayed to the end: from here on, updates run as the config says. A change of
    learning settings is logged, since it alters how the model learns from now on."""
    d.learner.max_batch_streams = d.config.train.max_batch_streams
    changed = changed_settings(d.learner.tuning, d.config.train)
    if changed:
        d.log.warning("learning settings differ from the saved state's; the config's "
                      "apply from now", settings=", ".join(changed))
    d.learner.tune(d.config.train)


def _load(d: Durability, state: dict, path: Path) -> None:
    saved = config_from_dict(state["learner"]["config"])
    differing = incompatible_keys(d.config, saved)
    if differing:
        raise IncompatibleState(
            f"the state in {d.root} was learned with a different config: "
            f"{', '.join(differing)}. To continue it, use its settings (`"
            f"{settings_to_continue(d.config, saved)}`, or the same keys in the config "
            "file: a newer version's defaults do not change a running model), or "
            + FRESH_HINT)
    d.learner.load_state_dict(state["learner"])
    # the batch width of the updates logged after it (see _apply's "config")
    d.learner.max_batch_streams = int(state.get("batch_streams",
                                                d.config.train.max_batch_streams))
    d.learner.tune(saved.train)
    d.wal_seq = int(state["wal_seq"])
    d.last_checkpoint = Saved(path, d.wal_seq, 0.0)
    d.metrics.checkpoint_last_success.set(state["created"])
    d.log.info("checkpoint loaded", path=str(path), updates=d.learner.updates,
               streams=len(d.learner.streams.ids), wal_seq=d.wal_seq)


def _replay(d: Durability, should_stop, progress, from_checkpoint: bool) -> None:
    replayed_tokens = replayed = 0
    started = next_status = time.monotonic()
    for record in d.wal.records_after(d.wal_seq):
        if record["q"] != d.wal_seq + 1:
            where = (f"the checkpoint covers records up to {d.wal_seq}" if from_checkpoint
                     else "no checkpoint could be loaded")
            raise IncompatibleState(
                f"the log in {d.root / 'wal'} continues at record {record['q']} but "
                f"{where}: acknowledged input in between would be lost. Restore the "
                "missing checkpoint or log files, or " + FRESH_HINT)
        replayed_tokens += _apply(d, record)
        replayed += 1
        d.wal_seq = record["q"]
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + REPLAY_STATUS_SECONDS
            d.learner.settle()  # a sync every few seconds keeps the device queue short
            progress(f"replaying the log: record {d.wal_seq}, {d.learner.updates:,} updates")
            if should_stop():
                d.log.warning("stop requested during replay; the rest of the log stays "
                              "for the next start", at=d.wal_seq)
                break
    d.learner.settle()
    d.metrics.recovery_replayed_tokens.inc(replayed_tokens)
    seconds = time.monotonic() - started
    if replayed:
        d.log.info("replayed the log", records=replayed, tokens=replayed_tokens,
                   seconds=round(seconds, 3), updates=d.learner.updates)
    if seconds > 60:  # a crash now would replay all of it again: checkpoint soon
        d.next_due = d.clock()


def _apply(d: Durability, record: dict) -> int:
    kind, learner = record["t"], d.learner
    if kind == "tokens":
        tokens = np.frombuffer(record["k"], "<u4").astype(np.int32)
        learner.streams.append(record["s"], tokens)
        return len(tokens)
    if kind == "train":
        plan = learner.next_update()
        if plan is None:
            raise IncompatibleState(
                f"log record {record['q']} says an update ran there, but replaying the "
                "log before it leaves none ready: the log does not belong to the state "
                f"it follows in {d.root}")
        learner.step(plan)
    elif kind == "flush":
        learner.flush_many(record["s"])
    elif kind == "end":
        learner.end(record["s"])
    elif kind == "config":
        # the config the following records were made with: same model, and their
        # updates replayed with the batch width they ran with
        logged = config_from_dict(record["c"])
        differing = incompatible_keys(d.config, logged)
        if differing:
            raise IncompatibleState(
                f"the log in {d.root / 'wal'} was written with a different config: "
                f"{', '.join(differing)}. To continue it, use its settings (`"
                f"{settings_to_continue(d.config, logged)}`), or " + FRESH_HINT)
        learner.max_batch_streams = logged.train.max_batch_streams
        learner.tune(logged.train)  # replayed updates run as they ran the first time
    return 0  # "noop": a probe written while the disk was full


def _retire_log(d: Durability) -> None:
    """wal.mode = off with a log from an earlier run: the log was replayed above; a
    checkpoint now holds it, then it goes (stale records must never replay onto a newer
    state later)."""
    if d.checkpoint_now() is None:
        raise StartupError("wal.mode = off, and the log left by an earlier run could not "
                           "be folded into a checkpoint (see the error above)")
    d.wal.close()
    for path in (d.root / "wal").glob("wal-*.log"):
        path.unlink()
    d.wal = None
    d.log.info("wal.mode = off: the earlier log was replayed, checkpointed and removed")


def _set_aside(d: Durability) -> None:
    """--fresh: move checkpoints and log into a dated folder inside the state folder (the
    folder itself may be a mount point, as systemd's StateDirectory is)."""
    parts = [d.root / name for name in ("checkpoints", "wal", "cluster")
             if (d.root / name).is_dir() and any((d.root / name).iterdir())]
    parts += sorted(d.root.glob("rank-*-of-*"))  # a cluster's, (serve --nproc) before
    if not parts:
        return
    aside = Path(tempfile.mkdtemp(prefix=f"previous-{time.strftime('%Y%m%d-%H%M%S')}-",
                                  dir=d.root))
    for part in parts:
        part.rename(aside / part.name)
    d.checkpoints = Checkpoints(d.root / "checkpoints", d.config.checkpoint.keep)
    d.log.warning("fresh start: the previous state was moved aside", to=str(aside))

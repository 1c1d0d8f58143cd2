"""Rebuilding the learned state from logs: the records after a checkpoint, in order.

    one log       (one process, or a rank of the same layout) its records in order; each
                  global step runs when its record comes, with the collectives it ran
                  with the first time (every rank replays its log at once)
    several logs  (another layout's ranks, in one process) every rank's own records up
                  to a step, then the step: the union of the old ranks' windows, each
                  old rank's planned as it planned them (`group`)
    steps that count   logged by every rank (up to the lowest last step), and not voided
                  by a resume record after them; the others did not run: their windows
                  train in a later step
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..core.collective import Ranks
from ..core.learner import Learner
from . import faults
from .journal import CHANGES, FRESH_HINT, IncompatibleState, ReplayClock, apply, steps_of
from .statedir import LogFolder
from .wal import read_log

STOP_CHECK_STEPS = 256  # a replay asks the ranks whether to stop this often


class StopDuringRecovery(Exception):
    """SIGTERM during a replay: nothing is written; the next start replays again."""


@dataclass
class Source:
    """One rank's log after the checkpoint: the records to replay."""
    folder: LogFolder
    records: list[dict]
    position: int = 0              # the next record to apply
    steps: list[int] = field(default_factory=list)  # the global steps that count
    void: set[int] = field(default_factory=set)     # sequence numbers of those that do not


@dataclass(frozen=True)
class Replayed:
    records: int
    tokens: int
    changes: int       # records replayed that changed the learned state
    voided: int        # step records that did not count
    seconds: float


def read_source(folder: LogFolder, wal_seq: int, step: int, from_checkpoint: bool) -> Source:
    """A log's records after `wal_seq`, checked: they continue where the checkpoint
    ends, and their global steps follow one another."""
    records = read_log(folder.path, after=wal_seq) if folder.path.is_dir() else []
    if records and records[0]["q"] != wal_seq + 1:
        where = (f"the checkpoint holds records up to {wal_seq}" if from_checkpoint
                 else "no checkpoint could be loaded")
        raise IncompatibleState(
            f"the log in {folder.path} continues at record {records[0]['q']} but "
            f"{where}: acknowledged input in between would be lost. Restore the "
            "missing checkpoint or log files, or " + FRESH_HINT)
    steps, void = steps_of(records, step, folder.legacy)
    if steps != list(range(step + 1, step + 1 + len(steps))):
        raise IncompatibleState(
            f"the log in {folder.path} does not hold the global steps after step "
            f"{step} in order ({steps[:3]}...): the state cannot be rebuilt in step. "
            "Restore the logs, or " + FRESH_HINT)
    return Source(folder, records, steps=steps, void=void)


def holds_changes(folder: LogFolder) -> bool:
    """Whether a log holds records that change the learned state (tokens, updates,
    flushes, ends): not only a start's config and resume records."""
    return any(r["t"] in CHANGES for r in read_log(folder.path))


def replay(learner: Learner, sources: list[Source], step: int, end: int, group,
           ranks: Ranks, should_stop: Callable[[], bool],
           progress: Callable[[str], None]) -> Replayed:
    """Apply each source's records in order; the global steps up to `end` run once
    every source reached them; steps past `end` and void ones do not run. Every
    STOP_CHECK_STEPS steps the ranks agree whether to stop (StopDuringRecovery)."""
    clock = ReplayClock(progress)
    tokens = changes = 0
    for g in range(step + 1, end + 2):  # end + 1: the records after the last step
        records = []
        for s in sources:
            tokens, changes = _apply_local(learner, s, g <= end, tokens, changes)
            if g <= end:
                records.append(s.records[s.position])
                s.position += 1
        if g <= end:
            faults.maybe_slow("replay_step")
            _step(learner, records, group, len(sources))
            changes += 1
        if g % STOP_CHECK_STEPS == 0 and ranks.agree([int(should_stop())], "max")[0]:
            raise StopDuringRecovery()
        if clock.due():
            learner.settle()  # a sync every few seconds keeps the device queue short
            progress(f"replaying the log: step {g:,} of {end:,}, {learner.updates:,} updates")
    learner.settle()
    return Replayed(sum(len(s.records) for s in sources), tokens, changes,
                    sum(len(s.steps) - (end - step) + len(s.void) for s in sources),
                    clock.seconds)


def _apply_local(learner: Learner, s: Source, to_step: bool, tokens: int,
                 changes: int) -> tuple[int, int]:
    """Apply the source's records up to its next step that counts (all that are left,
    if not `to_step`); void steps and resume records are passed over."""
    while s.position < len(s.records):
        record = s.records[s.position]
        is_step = record["t"] == "train" or (record["t"] == "flush" and
                                             ("g" in record or s.folder.legacy))
        if is_step and record["q"] not in s.void and to_step:
            return tokens, changes
        s.position += 1
        if is_step or record["t"] == "resume":
            continue  # void, or past the last step every rank logged: did not run
        tokens += apply(learner, record, legacy=s.folder.legacy)
        changes += record["t"] in CHANGES
    return tokens, changes


def _step(learner: Learner, records: list[dict], group, num_sources: int) -> None:
    """One global step, from every source's record of it."""
    if records[0]["t"] == "flush":  # 0.2.0: a flush step trained at once
        apply(learner, {"t": "flush", "s": [s for r in records for s in r["s"]]},
              legacy=True)
        return
    plan = learner.next_update(group)
    if plan is None and num_sources > 1:
        return  # an old rank chose other windows here: they train in a later step
    apply(learner, records[0], plan)

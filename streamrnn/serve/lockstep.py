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

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..config import StartupError
from . import recovery
from ..core.streams import StreamTable
from .checkpoint import CheckpointError, Checkpoints, Saved, load
from .cluster import Cluster, ClusterFault, Decision
from .durability import Durability, lock, snapshot
from .manifest import PART_FORMAT, REPLICATED_FORMAT, Manifests, rank_folder
from .recovery import IncompatibleState
from .wal import WalDamaged, WriteAheadLog, last_change

GLOBAL_RECORDS = ("train", "flush")
NO_STEP = -1


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
        model = self.learner.model
        # note: a device sync, once per checkpoint
        if not bool(torch.stack([q.isfinite().all() for q in model.parameters()]).all()):
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

    def close(self) -> None:
        if self.pending is not None and self.pending.thread is not None:
            self.pending.thread.join()
        if self.wal is not None:
            self.wal.close()
        self.lock_file.close()
        if self.root_lock is not None:
            self.root_lock.close()

    # ---- recovery ------------------------------------------------------------------------
    def recover(self, fresh: bool = False, should_stop: Callable[[], bool] = lambda: False,
                progress: Callable[[str], None] = lambda line: None) -> None:
        """In lockstep with every rank (collectives: all call it together). A stop
        request waits until the replay is done: a rank cannot leave it alone."""
        if fresh:
            self._set_aside()
        self.cluster.ranks.agree([0])  # nobody reads before everything is set aside
        resharded = self._reshard_if_needed()
        if not resharded:
            self._load_agreed()
        try:
            self.wal = WriteAheadLog(self.root / "wal", self.config.wal.segment_bytes,
                                     fsync=True, start_after=self.wal_seq)
        except WalDamaged as e:
            raise IncompatibleState(str(e)) from e
        if self.wal.torn_bytes:
            self.log.warning("cut a torn record off the log's tail (a crash mid-write; it "
                             "was never acknowledged)", bytes=self.wal.torn_bytes)
        end = self._agree_replay_end()
        self._replay(end, progress)
        recovery._follow_config(self)
        for record in ({"t": "resume", "g": self.step}, {"t": "config", "c": self.config.to_dict()}):
            if not self.append(record):
                raise StartupError(f"the write-ahead log in {self.root / 'wal'} cannot take "
                                   "a record (see the error above): free space there, then "
                                   "start again")
        self.commit()
        self.updates_at_checkpoint = self.learner.updates
        if resharded:  # committed before any input: a crash now must not reshard again
            if self.checkpoint_now() is None:
                raise StartupError("the first checkpoint after changing the number of "
                                   "ranks failed (see the error above)")
            self.cluster.ranks.agree([0])

    def _reshard_if_needed(self) -> bool:
        """A state left by another number of ranks (or by one process), from a clean
        stop: take its weights and this rank's key groups' streams. True if it did."""
        steps = self.manifests.steps()
        single = Checkpoints(self.state_root / "checkpoints", self.config.checkpoint.keep)
        if steps:
            manifest = self.manifests.read_manifest(steps[0])
            old_world = int(manifest["world_size"])
            if old_world == self.cluster.world_size:
                return False
            replicated = load(self.state_root / manifest["replicated"],
                              format=REPLICATED_FORMAT)
            sources = [(load(self.state_root / entry["path"], format=PART_FORMAT),
                        rank_folder(self.state_root, entry["rank"], old_world) / "wal")
                       for entry in manifest["parts"]]
            learner_state, old_step = replicated["learner"], int(manifest["step"])
            self.cluster.num_groups = int(manifest["num_groups"])
        elif single.paths():
            old_world, newest = 1, load(single.paths()[0])
            learner_state, old_step = newest["learner"], 0
            sources = [({"streams": learner_state["streams"], "wal_seq": newest["wal_seq"],
                         "totals": learner_state["totals"]}, self.state_root / "wal")]
        else:
            return False
        unclean = [str(log) for part, log in sources if last_change(log) > part["wal_seq"]]
        if unclean:
            raise IncompatibleState(
                f"the state in {self.state_root} was left by {old_world} rank(s) that did "
                f"not stop cleanly (their logs hold changes after the last checkpoint: "
                f"{', '.join(unclean[:2])}), and this start has {self.cluster.world_size}. "
                f"Start it again as before (--nproc {old_world}; it recovers), stop it with "
                f"SIGTERM, then start it with --nproc {self.cluster.world_size}")
        self._set_aside(manifests=False)  # this rank's folder: older than that state
        streams = self.learner.streams
        totals = dict(learner_state["totals"])
        for key in ("tokens_trained", "bits"):  # rank 0 carries the lifetime sums
            totals[key] = sum(part["totals"][key] for part, _ in sources) \
                if self.cluster.rank == 0 else 0
        recovery._load(self, {"learner": {**learner_state, "streams": streams.state_dict(),
                                          "totals": totals},
                              "batch_streams": self.config.train.max_batch_streams,
                              "wal_seq": 0, "created": time.time()},
                       self.state_root)
        self.last_checkpoint = None
        for part, _ in sources:
            old = StreamTable(streams.k1, streams.k2, streams.state_shape,
                              streams.num_state_tensors, streams.device, streams.dtype,
                              streams.max_resident)
            old.load_state_dict(part["streams"])
            for stream in old.ids:
                if self.cluster.owner(stream) == self.cluster.rank:
                    streams.adopt(stream, old.export(stream))
        self.step = old_step + 1  # a step of its own: the old one's files keep their names
        self.log.warning("the number of ranks changed: this rank took its key groups' "
                         "streams", ranks_before=old_world, ranks=self.cluster.world_size,
                         streams=len(streams.ids), step=self.step)
        return True

    def _load_agreed(self) -> None:
        """The newest committed step that every rank can load."""
        bound, loaded = 2**62, {}
        while True:
            mine = NO_STEP
            for step in self.manifests.steps():
                if step > bound:
                    continue
                try:
                    manifest = self.manifests.read_manifest(step)
                    loaded[step] = manifest, *self.manifests.load(manifest, self.cluster.rank)
                    mine = step
                    break
                except (CheckpointError, KeyError, IndexError) as e:
                    self.unreadable(self.manifests.manifest_path(step),
                                    e if isinstance(e, CheckpointError) else
                                    CheckpointError(f"incomplete: {e!r}"))
                    bound = step - 1
            highest, negated_lowest = self.cluster.ranks.agree([mine, -mine], "max")
            if highest == -negated_lowest:
                break
            bound = -negated_lowest
        if mine == NO_STEP:
            return
        manifest, replicated, part = loaded[mine]
        state = replicated["learner"]
        state["streams"] = part["streams"]
        state["totals"].update(part["totals"])
        recovery._load(self, {"learner": state, "batch_streams": replicated["batch_streams"],
                              "wal_seq": part["wal_seq"], "created": manifest["created"]},
                       self.manifests.manifest_path(mine))
        self.cluster.num_groups = int(manifest["num_groups"])
        self.step = mine

    def _agree_replay_end(self) -> int:
        """The last step every rank logged. Checks first that each rank's steps after
        its checkpoint follow one another (they do unless a log was tampered with):
        a rank that stopped here alone would leave the others waiting."""
        resumes, steps = [], []
        for record in self.wal.records_after(self.wal_seq):
            if record["t"] == "resume":
                resumes.append((record["q"], record["g"]))
            elif record["t"] in GLOBAL_RECORDS:
                steps.append((record["q"], record["g"]))
        self.void = {q for q, g in steps if any(qr > q and gr < g for qr, gr in resumes)}
        valid = [g for q, g in steps if q not in self.void]
        problem = valid != list(range(self.step + 1, self.step + 1 + len(valid)))
        last = valid[-1] if valid else self.step
        lowest, problems = self.cluster.ranks.agree([-last, int(problem)], "max")
        if problems:
            raise IncompatibleState(
                f"the logs do not hold the same global steps after the checkpoint of step "
                f"{self.step} ({'this rank' if problem else 'another rank'}: steps "
                f"{valid[:3]}...): the state cannot be rebuilt in step. Restore the logs, "
                "or " + recovery.FRESH_HINT)
        return -lowest

    def _replay(self, end: int, progress: Callable[[str], None]) -> None:
        replayed_tokens = replayed = voided = 0
        started = next_status = time.monotonic()
        for record in self.wal.records_after(self.wal_seq):
            if record["q"] != self.wal_seq + 1:
                raise IncompatibleState(
                    f"the log in {self.root / 'wal'} continues at record {record['q']} but "
                    f"the checkpoint covers records up to {self.wal_seq}: acknowledged "
                    "input in between would be lost. Restore the missing files, or "
                    + recovery.FRESH_HINT)
            kind = record["t"]
            if kind in GLOBAL_RECORDS:
                if record["q"] in self.void or record["g"] > end:
                    voided += 1  # a step the other ranks never took: trained again later
                elif kind == "train":
                    self.learner.step(self.learner.next_update(), record["n"])
                else:
                    self.learner.flush_many(record["s"])
                if record["q"] not in self.void and record["g"] <= end:
                    self.step = record["g"]
            elif kind != "resume":
                replayed_tokens += recovery._apply(self, record)
            replayed += 1
            self.wal_seq = record["q"]
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + recovery.REPLAY_STATUS_SECONDS
                self.learner.settle()
                progress(f"replaying the log: step {self.step}, record {self.wal_seq}")
        self.learner.settle()
        self.metrics.recovery_replayed_tokens.inc(replayed_tokens)
        if replayed:
            self.log.info("replayed the log", records=replayed, tokens=replayed_tokens,
                          step=self.step, steps_voided=voided, updates=self.learner.updates,
                          seconds=round(time.monotonic() - started, 3))

    def _set_aside(self, manifests: bool = True) -> None:
        """--fresh: each rank moves its log and parts aside; rank 0 also the manifests."""
        parts = [self.root / name for name in ("wal", "parts")
                 if (self.root / name).is_dir() and any((self.root / name).iterdir())]
        if manifests and self.cluster.rank == 0 and any(self.manifests.cluster_dir.iterdir()):
            parts.append(self.manifests.cluster_dir)
        if parts:
            aside = Path(tempfile.mkdtemp(
                prefix=f"previous-{time.strftime('%Y%m%d-%H%M%S')}-", dir=self.root))
            for part in parts:
                part.rename(aside / part.name)
            self.log.warning("fresh start: the previous state was moved aside", to=str(aside))
        self.manifests = Manifests(self.state_root, self.cluster.rank,
                                   self.cluster.world_size, self.config.checkpoint.keep)

"""Recovery at start, for one process and for N ranks alike, so that the recovered daemon
is the one that never crashed. Every rank runs all of it (one process: a cluster of one,
whose agreements are its own values).

    fresh     --fresh: every layout's checkpoints and logs are set aside, once per launch
    load      the newest committed checkpoint that every rank can load (one that does not
              read is counted and skipped for the one before it)
    same layout   (its ranks are these ranks) each rank replays its own log after it, to
              the last global step every rank logged, in lockstep: the same collectives
              as the first time. A step logged beyond it, or voided by a resume record,
              did not run: its windows train later
    another layout   (another number of ranks, or what streamrnn 0.2.0 left) every rank
              replays every old rank's log in one process, each old step the union of
              the old ranks' windows; keeps its key groups' streams; the ranks commit a
              checkpoint before any input, then the old files are set aside
    refused   (exit 2, saying what to do) a state of another model; a log that does not
              continue where its checkpoint ends, or is damaged anywhere but its torn
              tail; a log holding changes that neither the checkpoint loaded nor the
              logs replayed account for; files another process still uses
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from ..config import Config, StartupError, config_from_dict
from ..core.learner import Learner, changed_settings
from ..core.streams import StreamTable
from ..keygroups import DEFAULT_NUM_GROUPS, owner
from .checkpointer import Checkpointer, Saved
from .cluster import Cluster
from .journal import FRESH_HINT, IncompatibleState, Journal, follow
from .statedir import Checkpoint, CheckpointError, LogFolder, StateDir, lock, \
    write_atomically
from .replay import Source, StopDuringRecovery, holds_changes, read_source, replay
from .wal import WalDamaged

FRESH_DONE = "fresh-done"  # in the state folder: the launch ids of the last --fresh


class Recovery:
    def __init__(self, config: Config, learner: Learner, cluster: Cluster,
                 statedir: StateDir, journal: Journal, checkpointer: Checkpointer,
                 metrics, log):
        self.config, self.learner, self.cluster = config, learner, cluster
        self.statedir, self.journal, self.checkpointer = statedir, journal, checkpointer
        self.metrics, self.log = metrics, log
        self.ranks = cluster.ranks
        self.own = statedir.log_folder(cluster.rank, cluster.world_size)

    def run(self, fresh: bool, should_stop: Callable[[], bool],
            progress: Callable[[str], None]) -> None:
        self.should_stop, self.progress = should_stop, progress
        self._fresh_once(fresh)
        if self.cluster.rank == 0:
            self.statedir.remove_uncommitted()
        self.ranks.agree([0])  # nobody reads before that
        checkpoint, state = self._agreed_checkpoint()
        newest = max((c.number for c in self.statedir.committed()), default=0)
        layout, retire, held = self._agreed(lambda: self._layout(checkpoint))
        try:
            if checkpoint is not None and not checkpoint.legacy and \
                    checkpoint.world_size == self.cluster.world_size:
                self._continue(checkpoint, state, newest, retire)
            elif checkpoint is None and all(self._ours(f) for f in layout):
                self._continue(None, None, newest, retire)  # a first run's own logs
            else:
                self._take_over(checkpoint, state, layout, newest, retire)
        finally:
            for lock_file in held:
                lock_file.close()

    # ---- --fresh -----------------------------------------------------------------------
    def _fresh_once(self, fresh: bool) -> None:
        """--fresh on every rank or on none, and once per launch. Ranks are started with
        it again: on several machines by an agent that restarts its ranks for another
        machine's failure (it counts no restart, so launch.serve lets it through), or by
        a launcher rerun after its machine failed. `serve --nproc/--nnodes` draws an id
        per launch (STREAMRNN_FRESH_ID); once carried out, rank 0 records every rank's,
        and a rank whose id is recorded says no. (Plain torchrun has no id: the MIN.)"""
        launch_id = os.environ.get("STREAMRNN_FRESH_ID", "")
        done_path = self.statedir.root / FRESH_DONE
        done = done_path.read_text().split() if done_path.exists() else []
        mine = fresh and not (launch_id and launch_id in done)
        everyone = bool(self.ranks.agree([int(mine)], op="min")[0])
        if fresh and not everyone:
            self.log.warning("--fresh ignored: the other ranks recover (this is a restart)")
        if not everyone:
            return
        ids = [i for i in self.ranks.gather(launch_id) if i]
        if self.cluster.rank == 0:
            aside = self.statedir.set_aside(self.statedir.everything())
            if aside is not None:
                self.log.warning("fresh start: the previous state was moved aside",
                                 to=str(aside))
            if ids:
                write_atomically(done_path, "\n".join(ids) + "\n",
                                 save=lambda text, f: f.write(text.encode()))

    # ---- what to load ------------------------------------------------------------------
    def _agreed_checkpoint(self) -> tuple[Checkpoint | None, tuple | None]:
        """The newest committed checkpoint every rank can load, and what this rank
        loaded of it: its own part (same layout), or every part (another layout)."""
        candidates = self.statedir.committed()
        first = 0
        while True:
            mine, state = len(candidates), None
            for index in range(first, len(candidates)):
                c = candidates[index]
                try:
                    state = c.load(self.cluster.rank if self._same_layout(c) else None)
                    mine = index
                    break
                except (CheckpointError, KeyError, IndexError, TypeError) as e:
                    self.metrics.checkpoint_load_failures.inc()
                    self.log.error("checkpoint unreadable, using the one before it and "
                                   "more of the log", path=str(c.path), error=str(e))
            lowest, highest = self.ranks.agree([-mine, mine], "max")
            if -lowest == highest:
                return (candidates[mine], state) if mine < len(candidates) else (None, None)
            first = highest  # some rank cannot load a newer one: all take an older one

    def _same_layout(self, c: Checkpoint) -> bool:
        return not c.legacy and c.world_size == self.cluster.world_size

    def _ours(self, folder: LogFolder) -> bool:
        """A log of this layout (this version, these many ranks)."""
        return not folder.legacy and folder.world_size == self.cluster.world_size

    def _layout(self, checkpoint: Checkpoint | None) -> tuple[list[LogFolder], list, list]:
        """The logs that go on after `checkpoint` (each rank's of the layout that wrote
        it), what is to be set aside once this start holds them, and the locks held on
        another layout's logs meanwhile. Refuses logs with changes nobody holds."""
        folders = self.statedir.log_folders()
        if checkpoint is not None:
            layout = checkpoint.logs
        else:  # no checkpoint: the one layout whose logs hold changes, if any
            changed = {(f.world_size, f.legacy) for f in folders if holds_changes(f)}
            if len(changed) > 1:
                raise IncompatibleState(
                    f"the state folder {self.statedir.root} holds no checkpoint, and the "
                    f"logs of {len(changed)} layouts hold changes (" +
                    ", ".join(str(f.path) for f in folders) + "): which is the newest "
                    "cannot be told. Move the older ones away, or " + FRESH_HINT)
            # none holds changes (a first run that ended before any input): this
            # layout's logs go on; were they set aside, this start's log would move
            # away under it, and what it acknowledges next would be lost
            layout = [f for f in folders if (f.world_size, f.legacy) in changed] \
                if changed else [f for f in folders if self._ours(f)]
        paths = {f.path for f in layout}
        adopted = {self.statedir.root / name for name in
                   (checkpoint.adopted if checkpoint is not None else [])}
        others = [f for f in folders if f.path not in paths]
        unaccounted = [f for f in others if f.path not in adopted and holds_changes(f)]
        if unaccounted:
            where = (f"checkpoint {checkpoint.path.name} (written by {checkpoint.world_size} "
                     "rank(s))" if checkpoint is not None else "no checkpoint")
            raise IncompatibleState(
                f"the logs in {', '.join(str(f.path) for f in unaccounted[:3])} hold "
                f"acknowledged input, but the state to load is {where}, which does not "
                "hold it (a newer checkpoint may be unreadable): starting would lose it. "
                "Restore the missing checkpoint files, or " + FRESH_HINT)
        retire = [f.path for f in others]
        if checkpoint is not None and not checkpoint.legacy:
            retire += self.statedir.legacy_files()  # a checkpoint of this version holds them
        held = []
        if self.cluster.rank == 0 and not all(self._ours(f) for f in layout):
            # no rank of that layout may still run (0.2.0's one process held STATE/lock,
            # which this process holds now)
            for f in layout:
                if f.path == self.statedir.root / "wal":
                    continue
                try:
                    held.append(lock(self.statedir.lock_path(f), f"the log {f.path}"))
                except StartupError:
                    for lock_file in held:
                        lock_file.close()
                    raise
        return layout, retire, held

    def _agreed(self, work):
        """`work()` on every rank; a refusal on any rank is a refusal on every rank (each
        rank decides from the same disk: they agree unless a file changed meanwhile)."""
        try:
            result, error = work(), None
        except (IncompatibleState, StartupError, WalDamaged) as e:
            result, error = None, e
        if self.ranks.agree([int(error is not None)])[0]:
            if isinstance(error, WalDamaged):
                raise IncompatibleState(str(error)) from error
            raise error or IncompatibleState("another rank refused the saved state (its "
                                              "log line says why)")
        return result

    # ---- the same layout ---------------------------------------------------------------
    def _continue(self, checkpoint: Checkpoint | None, state, newest: int,
                  retire: list) -> None:
        """This layout's checkpoint (or none yet), then this rank's log after it, in
        lockstep with the other ranks'."""
        learner, journal = self.learner, self.journal
        saved, wal_seq, step = None, 0, 0
        if checkpoint is not None:
            replicated, (part,) = state
            self._load(replicated, part, checkpoint)
            self.cluster.num_groups = checkpoint.num_groups
            wal_seq, step = int(part["wal_seq"]), checkpoint.step
            saved = Saved(checkpoint.path, checkpoint.number, wal_seq, 0.0)
        journal.step = step
        source = self._agreed(lambda: read_source(self.own, wal_seq, step,
                                                   checkpoint is not None))
        last = source.steps[-1] if source.steps else step
        end = -self.ranks.agree([-last], "max")[0]  # the last step every rank logged
        replayed = self._replay(learner, [source], step, end, group=None)
        if self.config.wal.mode != "off":
            try:
                journal.open(self.own.path, start_after=wal_seq)
            except WalDamaged as e:
                raise IncompatibleState(str(e)) from e
            if journal.wal.torn_bytes:
                self.log.warning("cut a torn record off the log's tail (a crash mid-write; "
                                 "it was never acknowledged)", bytes=journal.wal.torn_bytes)
            journal.wal_seq = journal.wal.last_seq
        journal.step = end
        self._follow_config()
        self.checkpointer.recovered(saved, newest, replayed > 0)
        self._write_start_records()
        if self.config.wal.mode == "off" and self.ranks.agree(
                [int(self.own.path.exists())], "max")[0]:  # folded in, then set aside
            if self.checkpointer.checkpoint_now() is None:
                raise StartupError("wal.mode = off, and the log left by an earlier run "
                                   "could not be folded into a checkpoint (see the error "
                                   "above)")
            retire += [self.statedir.log_folder(r, self.cluster.world_size).path
                       for r in range(self.cluster.world_size)]
            self.log.info("wal.mode = off: the earlier logs were replayed, checkpointed and "
                          "set aside")
        self._retire(retire)

    # ---- another layout ----------------------------------------------------------------
    def _take_over(self, checkpoint: Checkpoint | None, state, layout: list[LogFolder],
                   newest: int, retire: list) -> None:
        """Rebuild the state that layout left, in one process (every rank alike), keep
        this rank's key groups' streams, commit it as this layout's checkpoint."""
        old_world = checkpoint.world_size if checkpoint is not None else \
            max(f.world_size for f in layout)
        old_groups = (checkpoint.num_groups if checkpoint is not None and
                      checkpoint.num_groups else DEFAULT_NUM_GROUPS)
        scratch = Learner(self.config)  # one process: the old steps without collectives
        wal_seqs, step = [0] * old_world, 0
        if checkpoint is not None:
            replicated, parts = state
            step = checkpoint.step
            self._load_merged(scratch, replicated, parts, checkpoint)
            wal_seqs = [int(p["wal_seq"]) for p in parts]
        by_rank = {f.rank: f for f in layout}
        sources = self._agreed(lambda: [  # (a rank without a log: nothing after its part)
            read_source(by_rank.get(r, self.statedir.log_folder(r, old_world)), wal_seqs[r],
                         step, checkpoint is not None) for r in range(old_world)])
        end = min((s.steps[-1] if s.steps else step) for s in sources)
        ranks_of: dict = {}

        def group(rows: np.ndarray) -> np.ndarray:  # the old rank that planned each row
            ids = scratch.streams.ids
            return np.array([ranks_of.setdefault(ids[r], owner(ids[r], old_world, old_groups))
                             for r in rows.tolist()], np.int64)
        if self.cluster.rank == 0:  # the new layout's logs hold nothing yet: set aside
            self.statedir.set_aside([f.path for f in self.statedir.log_folders()
                                     if f.world_size == self.cluster.world_size and
                                     not f.legacy and f not in layout])
        self.ranks.agree([0])
        self._replay(scratch, sources, step, end, group=group if old_world > 1 else None)
        self._adopt(scratch, old_groups)
        self.journal.step = end
        if self.config.wal.mode != "off":
            self.journal.open(self.own.path, start_after=0)
        self._follow_config()
        self.checkpointer.recovered(None, newest, True)
        self.checkpointer.adopted = [str(f.path.relative_to(self.statedir.root))
                                     for f in layout]
        self._write_start_records()
        saved = self.checkpointer.checkpoint_now()  # before any input: holds it all
        if saved is None:
            raise StartupError("the first checkpoint after taking over the state of "
                               f"{old_world} rank(s) failed (see the error above); that "
                               "state stays as it was")
        if self.ranks.distributed:  # rank 0's weights, bit for bit, on every rank
            replicated = self.statedir.committed()[0].load(self.cluster.rank)[0]
            self.learner.load_replicated(replicated["learner"])
        self.log.warning("took over the state of another layout", ranks_before=old_world,
                         ranks=self.cluster.world_size,
                         legacy=any(f.legacy for f in layout) or bool(checkpoint and
                                                                      checkpoint.legacy),
                         streams=len(self.learner.streams.ids), step=end,
                         checkpoint=str(saved.path))
        self._retire(retire + [f.path for f in layout] + self.statedir.legacy_files())

    def _load_merged(self, scratch: Learner, replicated: dict, parts: list[dict],
                     checkpoint: Checkpoint) -> None:
        """Every old rank's part into one learner (the streams of all of them)."""
        follow(scratch, config_from_dict(replicated["learner"]["config"]),
               what=f"checkpoint {checkpoint.path}")  # the same model, or refused
        merged = StreamTable(scratch.streams.k1, scratch.streams.k2,
                             scratch.streams.state_shape, scratch.streams.num_state_tensors,
                             scratch.device, scratch.streams.dtype, scratch.streams.max_resident)
        for part in parts:
            table = StreamTable(merged.k1, merged.k2, merged.state_shape,
                                merged.num_state_tensors, merged.device, merged.dtype,
                                merged.max_resident)
            table.load_state_dict(part["streams"])
            for stream in table.ids:
                merged.adopt(stream, table.export(stream))
        totals = {key: sum(p["totals"][key] for p in parts)
                  for key in ("tokens_trained", "bits")}
        self._load(replicated, {"streams": merged.state_dict(), "totals": totals},
                   checkpoint, learner=scratch)

    def _adopt(self, scratch: Learner, num_groups: int) -> None:
        """This rank's key groups' streams, the weights and optimizer, from `scratch`;
        the lifetime totals go to rank 0."""
        self.cluster.num_groups = num_groups
        learner = self.learner
        learner.load_replicated(scratch.replicated_state())
        learner.max_batch_streams, learner.tuning = scratch.max_batch_streams, scratch.tuning
        table = StreamTable(learner.streams.k1, learner.streams.k2,
                            learner.streams.state_shape, learner.streams.num_state_tensors,
                            learner.device, learner.streams.dtype, learner.streams.max_resident)
        for stream in scratch.streams.ids:
            if self.cluster.owner(stream) == self.cluster.rank:
                table.adopt(stream, scratch.streams.export(stream))
        first = self.cluster.rank == 0
        learner.load_rank({"streams": table.state_dict(), "totals": {
            "tokens_trained": scratch.tokens_trained if first else 0,
            "bits": scratch.bits if first else 0.0}})

    # ---- shared ------------------------------------------------------------------------
    def _load(self, replicated: dict, part: dict, checkpoint: Checkpoint,
              learner: Learner | None = None) -> None:
        learner = learner or self.learner
        state = replicated["learner"]
        follow(learner, config_from_dict(state["config"]),
               what=f"checkpoint {checkpoint.path}")
        learner.load_replicated(state)
        learner.load_rank(part)
        # the batch width of the updates logged after it (see journal.apply's "config")
        learner.max_batch_streams = int(replicated.get("batch_streams") or
                                        self.config.train.max_batch_streams)
        self.metrics.checkpoint_last_success.set(replicated.get("created", 0.0))
        self.log.info("checkpoint loaded", path=str(checkpoint.path), updates=learner.updates,
                      streams=len(learner.streams.ids), wal_seq=part.get("wal_seq"),
                      **({"legacy": checkpoint.legacy} if checkpoint.legacy else {}))

    def _replay(self, learner: Learner, sources: list[Source], step: int, end: int,
                group) -> int:
        """replay.replay, logged and counted; returns the changes replayed."""
        try:
            done = replay(learner, sources, step, end, group, self.ranks, self.should_stop,
                          self.progress)
        except StopDuringRecovery:
            self.log.warning("stop requested during the replay; it starts again at the "
                             "next start")
            raise
        self.metrics.recovery_replayed_tokens.inc(done.tokens)
        if done.records:
            self.log.info("replayed the log", records=done.records, tokens=done.tokens,
                          step=end, steps_voided=done.voided, updates=learner.updates,
                          seconds=round(done.seconds, 3))
        if done.seconds > 60:  # a crash now would replay all of it again: checkpoint soon
            self.checkpointer.next_due = self.checkpointer.clock()
        return done.changes

    def _follow_config(self) -> None:
        """Replayed to the end: from here on, updates run as the config says. A change of
        learning settings is logged, since it alters how the model learns from now on."""
        changed = changed_settings(self.learner.tuning, self.config.train)
        if changed:
            self.log.warning("learning settings differ from the saved state's; the config's "
                             "apply from now", settings=", ".join(changed))
        self.learner.max_batch_streams = self.config.train.max_batch_streams
        self.learner.tune(self.config.train)

    def _write_start_records(self) -> None:
        """The steps logged after this one's step did not run (void, see the module),
        and the config the records after it are made with."""
        for record in ({"t": "resume", "g": self.journal.step},
                       {"t": "config", "c": self.config.to_dict()}):
            if not self.journal.append(record):
                raise StartupError(f"the write-ahead log in {self.own.path} cannot take a "
                                   "record (see the error above): free space there, then "
                                   "start again")
        self.journal.commit()

    def _retire(self, paths: list) -> None:
        """Rank 0 sets aside what this start holds now (another layout's files)."""
        if self.cluster.rank == 0:
            aside = self.statedir.set_aside(list(dict.fromkeys(paths)))
            if aside is not None:
                self.log.info("set aside files this state holds", to=str(aside),
                              files=len(paths))
        self.ranks.agree([0])

"""Recovery of one rank of several, in lockstep with the others (lockstep.py writes
what it reads).

    newest step every rank can load   (else: a state of another N after a clean stop is
                                       resharded; after a crash it is refused)
    MIN over the ranks of the last step each logged
    replay to it in lockstep           the same collectives as the first time; a step
                                       logged beyond it, or cancelled, is void
    resume + config records            then the daemon takes input

Every function here runs on every rank at once: each contains collectives.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..config import StartupError
from ..core.streams import StreamTable
from . import recovery
from .checkpoint import CheckpointError, Checkpoints, load
from .durability import lock
from .manifest import PART_FORMAT, REPLICATED_FORMAT, Manifests, rank_folder
from .recovery import IncompatibleState
from .wal import WalDamaged, WriteAheadLog, fsync_dir, last_change

if TYPE_CHECKING:
    from .lockstep import ClusterDurability

GLOBAL_RECORDS = ("train", "flush")
NO_STEP = -1


def recover(d: ClusterDurability, fresh: bool, progress: Callable[[str], None]) -> None:
    """Load, replay and log as above. A stop request waits until the replay is done: a
    rank cannot leave the lockstep alone."""
    _fresh_once(d, fresh)
    d.cluster.ranks.agree([0])  # nobody reads before everything is set aside
    resharded = _reshard_if_needed(d)
    if not resharded:
        _load_agreed(d)
    try:
        d.wal = WriteAheadLog(d.root / "wal", d.config.wal.segment_bytes,
                              fsync=True, start_after=d.wal_seq)
    except WalDamaged as e:
        raise IncompatibleState(str(e)) from e
    if d.wal.torn_bytes:
        d.log.warning("cut a torn record off the log's tail (a crash mid-write; it "
                      "was never acknowledged)", bytes=d.wal.torn_bytes)
    end, void = _agree_replay_end(d)
    _replay(d, end, void, progress)
    recovery._follow_config(d)
    for record in ({"t": "resume", "g": d.step}, {"t": "config", "c": d.config.to_dict()}):
        if not d.append(record):
            raise StartupError(f"the write-ahead log in {d.root / 'wal'} cannot take "
                               "a record (see the error above): free space there, then "
                               "start again")
    d.commit()
    d.updates_at_checkpoint = d.learner.updates
    if resharded:  # committed before any input: a crash now must not reshard again
        if d.checkpoint_now() is None:
            raise StartupError("the first checkpoint after changing the number of "
                               "ranks failed (see the error above)")
        d.cluster.ranks.agree([0])


FRESH_DONE = "fresh-done"  # in the state folder: the launch ids of the last --fresh


def _fresh_once(d: ClusterDurability, fresh: bool) -> None:
    """--fresh on every rank or on none, and once per launch. Ranks are started with
    it again: on several machines by an agent that restarts its ranks for another
    machine's failure (it counts no restart, so launch.serve lets it through), or by a
    launcher rerun after its machine failed. `serve --nproc/--nnodes` draws an id per
    launch (STREAMRNN_FRESH_ID); once carried out, rank 0 records every rank's, and a
    rank whose id is recorded says no. (Plain torchrun has no id: the MIN alone.)"""
    launch_id = os.environ.get("STREAMRNN_FRESH_ID", "")
    done_path = d.state_root / FRESH_DONE
    done = done_path.read_text().split() if done_path.exists() else []
    mine = fresh and not (launch_id and launch_id in done)
    everyone = bool(d.cluster.ranks.agree([int(mine)], op="min")[0])
    if fresh and not everyone:
        d.log.warning("--fresh ignored: the other ranks recover (this is a restart)")
    if not everyone:
        return
    set_aside(d)
    ids = [i for i in d.cluster.ranks.gather(launch_id) if i]
    if d.cluster.rank == 0 and ids:
        tmp = done_path.with_name(FRESH_DONE + ".tmp")
        with open(tmp, "w") as f:
            f.write("\n".join(ids) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, done_path)
        fsync_dir(d.state_root)


@dataclass
class LeftState:
    """The newest state another number of ranks (or one process) left."""
    learner: dict                      # weights, optimizer, totals: the replicated part
    sources: list[tuple[dict, Path]]   # each old rank's part (its streams) and its log
    world_size: int
    step: int                          # the old layout's global step (0: one process)
    num_groups: int | None
    path: Path                         # its manifest or checkpoint, for the log


def _left_state(root: Path, manifests: Manifests, single: Checkpoints | None,
                world_size_now: int) -> LeftState | None:
    """None when there is none, or when it is a cluster's of `world_size_now` ranks (a
    restart: recovered as usual, with its fallbacks to older steps). A state that
    cannot be read is refused: only the layout that wrote it falls back to older ones."""
    try:
        return _read_left_state(root, manifests, single, world_size_now)
    except (CheckpointError, OSError, KeyError, TypeError, ValueError) as e:
        raise IncompatibleState(
            f"the state in {root} was written by another number of ranks, and its newest "
            f"checkpoint cannot be read ({type(e).__name__}: {e}). Start it with the "
            "number of ranks that wrote it (that falls back to an older checkpoint), "
            "stop it cleanly, then change the number; or " + recovery.FRESH_HINT) from e


def _read_left_state(root: Path, manifests: Manifests, single: Checkpoints | None,
                     world_size_now: int) -> LeftState | None:
    steps = manifests.steps()
    if steps:
        manifest = manifests.read_manifest(steps[0])
        world_size = int(manifest["world_size"])
        if world_size == world_size_now:
            return None
        replicated = load(root / manifest["replicated"], format=REPLICATED_FORMAT)
        sources = [(load(root / entry["path"], format=PART_FORMAT),
                    rank_folder(root, entry["rank"], world_size) / "wal")
                   for entry in manifest["parts"]]
        if any(int(f["step"]) != int(manifest["step"])
               for f in (replicated, *(part for part, _ in sources))):
            raise CheckpointError(f"the files of step {manifest['step']} hold other steps")
        return LeftState(replicated["learner"], sources, world_size, int(manifest["step"]),
                         int(manifest["num_groups"]), manifests.manifest_path(steps[0]))
    if single is not None and single.paths():
        newest = load(single.paths()[0])
        learner_state = newest["learner"]
        return LeftState(learner_state, [({"streams": learner_state["streams"],
                                            "wal_seq": newest["wal_seq"],
                                            "totals": learner_state["totals"]},
                                           root / "wal")], 1, 0, None, single.paths()[0])
    return None


def _refuse_unless_clean(left: LeftState, root: Path, world_size: int) -> None:
    unclean = [str(log) for part, log in left.sources if last_change(log) > part["wal_seq"]]
    if unclean:
        raise IncompatibleState(
            f"the state in {root} was left by {left.world_size} rank(s) that did not stop "
            f"cleanly (their logs hold changes after the last checkpoint: "
            f"{', '.join(unclean[:2])}), and this start has {world_size}. Start it again "
            f"as before ({left.world_size} rank(s): --nproc {left.world_size}, or --nproc "
            f"times --nnodes on several machines; it recovers), stop it with SIGTERM, then "
            f"change the number of ranks")


def _take_over(d, left: LeftState, owns: Callable[[str], bool], carries_totals: bool,
               ) -> None:
    """Load the left state's weights into d.learner, and the streams `owns` names.
    The lifetime sums go to one process or rank (`carries_totals`), the others count
    from 0."""
    streams = d.learner.streams
    totals = dict(left.learner["totals"])
    for key in ("tokens_trained", "bits"):
        totals[key] = sum(part["totals"][key] for part, _ in left.sources) \
            if carries_totals else 0
    recovery._load(d, {"learner": {**left.learner, "streams": streams.state_dict(),
                                   "totals": totals},
                          "batch_streams": d.config.train.max_batch_streams,
                          "wal_seq": 0, "created": time.time()}, left.path)
    d.last_checkpoint = None
    for part, _ in left.sources:
        old = StreamTable(streams.k1, streams.k2, streams.state_shape,
                          streams.num_state_tensors, streams.device, streams.dtype,
                          streams.max_resident)
        old.load_state_dict(part["streams"])
        for stream in old.ids:
            if owns(stream):
                streams.adopt(stream, old.export(stream))


def _reshard_if_needed(d: ClusterDurability) -> bool:
    """A state left by another number of ranks (or by one process), from a clean
    stop: take its weights and this rank's key groups' streams. True if it did."""
    single = Checkpoints(d.state_root / "checkpoints", d.config.checkpoint.keep)
    left = _left_state(d.state_root, d.manifests, single, d.cluster.world_size)
    if left is None:
        return False
    _refuse_unless_clean(left, d.state_root, d.cluster.world_size)
    if left.num_groups is not None:
        d.cluster.num_groups = left.num_groups
    set_aside(d, manifests=False)  # this rank's folder: older than that state
    _take_over(d, left, lambda stream: d.cluster.owner(stream) == d.cluster.rank,
               carries_totals=d.cluster.rank == 0)
    d.step = left.step + 1  # a step of its own: the old one's files keep their names
    d.log.warning("the number of ranks changed: this rank took its key groups' "
                  "streams", ranks_before=left.world_size, ranks=d.cluster.world_size,
                  streams=len(d.learner.streams.ids), step=d.step)
    return True


def leave_cluster(d) -> None:
    """One process (no --nproc) started on a cluster's state: after a clean stop it
    takes every stream, the weights and the lifetime totals, and writes them as its
    own checkpoint; then the cluster's files are set aside (a crash before that only
    repeats this). After a crash: refused, as for another N."""
    # no rank may still run (rank 0's machine gone, the others waiting in a collective):
    # each holds its folder's lock until it ends
    held = [lock(folder) for folder in sorted(d.root.glob("rank-*-of-*"))]
    try:
        left = _left_state(d.root, Manifests(d.root, 0, 1, d.config.checkpoint.keep),
                           None, world_size_now=0)
        if left is None:
            raise IncompatibleState(f"{d.root} holds a cluster's manifests but no "
                                    "committed step; or " + recovery.FRESH_HINT)
        _refuse_unless_clean(left, d.root, 1)
        aside = Path(tempfile.mkdtemp(
            prefix=f"previous-{time.strftime('%Y%m%d-%H%M%S')}-", dir=d.root))
        for name in ("checkpoints", "wal"):  # one process's, from before the cluster
            for path in sorted((d.root / name).glob("*")):
                (aside / name).mkdir(exist_ok=True)
                path.rename(aside / name / path.name)
            if (aside / name).is_dir():  # gone for good before anything newer is written
                fsync_dir(aside / name)
                fsync_dir(d.root / name)
        _take_over(d, left, lambda stream: True, carries_totals=True)
        if d.checkpoint_now() is None:
            raise StartupError("the first checkpoint of one process taking over a "
                               "cluster's state failed (see the error above); the "
                               "cluster's state stays")
        for path in [d.root / "cluster", *d.root.glob("rank-*-of-*")]:
            path.rename(aside / path.name)
        fsync_dir(aside)
        fsync_dir(d.root)
    finally:
        for lock_file in held:
            lock_file.close()
    d.log.warning("the number of ranks changed: one process took every stream",
                  ranks_before=left.world_size, streams=len(d.learner.streams.ids),
                  set_aside=str(aside))


def _load_agreed(d: ClusterDurability) -> None:
    """The newest committed step that every rank can load."""
    bound, loaded = 2**62, {}
    while True:
        mine = NO_STEP
        for step in d.manifests.steps():
            if step > bound:
                continue
            try:
                manifest = d.manifests.read_manifest(step)
                loaded[step] = manifest, *d.manifests.load(manifest, d.cluster.rank)
                mine = step
                break
            except (CheckpointError, KeyError, IndexError) as e:
                d.unreadable(d.manifests.manifest_path(step),
                             e if isinstance(e, CheckpointError) else
                                CheckpointError(f"incomplete: {e!r}"))
                bound = step - 1
        highest, negated_lowest = d.cluster.ranks.agree([mine, -mine], "max")
        if highest == -negated_lowest:
            break
        bound = -negated_lowest
    if mine == NO_STEP:
        return
    manifest, replicated, part = loaded[mine]
    state = replicated["learner"]
    state["streams"] = part["streams"]
    state["totals"].update(part["totals"])
    recovery._load(d, {"learner": state, "batch_streams": replicated["batch_streams"],
                       "wal_seq": part["wal_seq"], "created": manifest["created"]},
                   d.manifests.manifest_path(mine))
    d.cluster.num_groups = int(manifest["num_groups"])
    d.step = mine


def _agree_replay_end(d: ClusterDurability) -> tuple[int, set[int]]:
    """The last step every rank logged. Checks first that each rank's steps after
    its checkpoint follow one another (they do unless a log was tampered with):
    a rank that stopped here alone would leave the others waiting."""
    resumes, steps = [], []
    for record in d.wal.records_after(d.wal_seq):
        if record["t"] == "resume":
            resumes.append((record["q"], record["g"]))
        elif record["t"] in GLOBAL_RECORDS:
            steps.append((record["q"], record["g"]))
    void = {q for q, g in steps if any(qr > q and gr < g for qr, gr in resumes)}
    valid = [g for q, g in steps if q not in void]
    problem = valid != list(range(d.step + 1, d.step + 1 + len(valid)))
    last = valid[-1] if valid else d.step
    lowest, problems = d.cluster.ranks.agree([-last, int(problem)], "max")
    if problems:
        raise IncompatibleState(
            f"the logs do not hold the same global steps after the checkpoint of step "
            f"{d.step} ({'this rank' if problem else 'another rank'}: steps "
            f"{valid[:3]}...): the state cannot be rebuilt in step. Restore the logs, "
            "or " + recovery.FRESH_HINT)
    return -lowest, void


def _replay(d: ClusterDurability, end: int, void: set[int],
            progress: Callable[[str], None]) -> None:
    replayed_tokens = replayed = voided = 0
    started = next_status = time.monotonic()
    for record in d.wal.records_after(d.wal_seq):
        if record["q"] != d.wal_seq + 1:
            raise IncompatibleState(
                f"the log in {d.root / 'wal'} continues at record {record['q']} but "
                f"the checkpoint covers records up to {d.wal_seq}: acknowledged "
                "input in between would be lost. Restore the missing files, or "
                + recovery.FRESH_HINT)
        kind = record["t"]
        if kind in GLOBAL_RECORDS:
            if record["q"] in void or record["g"] > end:
                voided += 1  # a step the other ranks never took: trained again later
            elif kind == "train":
                d.learner.step(d.learner.next_update(), record["n"])
            else:
                d.learner.flush_many(record["s"])
            if record["q"] not in void and record["g"] <= end:
                d.step = record["g"]
        elif kind != "resume":
            replayed_tokens += recovery._apply(d, record)
        replayed += 1
        d.wal_seq = record["q"]
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + recovery.REPLAY_STATUS_SECONDS
            d.learner.settle()
            progress(f"replaying the log: step {d.step}, record {d.wal_seq}")
    d.learner.settle()
    d.metrics.recovery_replayed_tokens.inc(replayed_tokens)
    if replayed:
        d.log.info("replayed the log", records=replayed, tokens=replayed_tokens,
                   step=d.step, steps_voided=voided, updates=d.learner.updates,
                      seconds=round(time.monotonic() - started, 3))


def set_aside(d: ClusterDurability, manifests: bool = True) -> None:
    """--fresh: each rank moves its log and parts aside; rank 0 also the manifests."""
    parts = [d.root / name for name in ("wal", "parts")
             if (d.root / name).is_dir() and any((d.root / name).iterdir())]
    if manifests and d.cluster.rank == 0 and any(d.manifests.cluster_dir.iterdir()):
        parts.append(d.manifests.cluster_dir)
    if parts:
        aside = Path(tempfile.mkdtemp(
            prefix=f"previous-{time.strftime('%Y%m%d-%H%M%S')}-", dir=d.root))
        for part in parts:
            part.rename(aside / part.name)
        d.log.warning("fresh start: the previous state was moved aside", to=str(aside))
    d.manifests = Manifests(d.state_root, d.cluster.rank,
                            d.cluster.world_size, d.config.checkpoint.keep)

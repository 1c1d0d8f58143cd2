"""The state folder on disk: one layout for one process and for N ranks (one process is
rank 0 of 1).

    STATE/lock                              held by the process, or rank 0 (flock, pid)
    STATE/checkpoints/checkpoint-C.json     checkpoint C's manifest: written last, once
                                            every file of C is durable, it commits C
    STATE/checkpoints/replicated-C.pt       weights, optimizer, global counts (rank 0)
    STATE/checkpoints/part-C-R-of-W.pt      rank R's streams, its totals, its log position
    STATE/logs/rank-R-of-W/wal-*.log        rank R's write-ahead log (wal.py), and its lock
    STATE/previous-DATE-*/                  what --fresh set aside, or a layout retired

C counts up over the folder's life, whatever the number of ranks W. Every file is
written whole or not at all (write_atomically); files of a C without a manifest were
never committed and are removed at the next start. streamrnn 0.2.0 left
`checkpoints/checkpoint-*.pt` and `wal/` (one process) or `cluster/` and
`rank-R-of-W/` (ranks): they are read as the checkpoints and logs they are, once, and
set aside when a checkpoint of this version holds them (recovery.py).
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import StartupError
from . import faults
from .wal import fsync_dir

MANIFEST_FORMAT = "streamrnn.manifest/2"
REPLICATED_FORMAT = "streamrnn.replicated/1"
PART_FORMAT = "streamrnn.part/1"
LEGACY_MANIFEST_FORMAT = "streamrnn.manifest/1"  # 0.2.0's ranks
LEGACY_CHECKPOINT_FORMAT = "streamrnn.checkpoint/1"  # 0.2.0's one process


class CheckpointError(Exception):
    """A checkpoint file that cannot be used (missing, truncated, foreign)."""


@dataclass(frozen=True)
class LogFolder:
    """One rank's write-ahead log, of the layout that wrote it."""
    path: Path
    rank: int
    world_size: int
    legacy: bool = False  # 0.2.0's: its flush records trained at once (journal.apply)


@dataclass
class Checkpoint:
    """A committed checkpoint: what recovery loads and `checkpoint list` shows."""
    path: Path                 # its manifest (a 0.2.0 one-process checkpoint: its file)
    number: int                # C (0.2.0's: 0, older than any of this version)
    step: int                  # the global steps it holds
    world_size: int            # the ranks that wrote it
    num_groups: int
    created: float
    updates: int
    parts: list[dict]          # per rank: rank, path, wal_seq (and totals, this version)
    logs: list[LogFolder]      # per rank: the log that goes on after it
    replicated: Path | None
    adopted: list[str] = field(default_factory=list)  # log folders it holds to their end
    legacy: str = ""           # "0.2.0, one process" | "0.2.0, N ranks" | ""
    error: str = ""            # why its manifest cannot be read

    def load(self, rank: int | None = None) -> tuple[dict, list[dict]]:
        """(the replicated part, the parts): rank `rank`'s only, or every rank's (None).
        CheckpointError if a file is missing or does not read."""
        if self.error:
            raise CheckpointError(self.error)
        if self.replicated is None:  # 0.2.0, one process: one file holds both
            state = load(self.path, format=LEGACY_CHECKPOINT_FORMAT)
            learner = dict(state["learner"])
            streams, totals = learner.pop("streams"), dict(learner["totals"])
            learner["totals"] = {k: totals[k] for k in ("updates", "skipped_updates")
                                 if k in totals}
            part = {"streams": streams, "wal_seq": state["wal_seq"], "totals":
                    {"tokens_trained": totals["tokens_trained"], "bits": totals["bits"]}}
            return {"learner": learner, "batch_streams": state.get("batch_streams"),
                    "created": state["created"], "version": state.get("version")}, [part]
        replicated = load(self.replicated, format=REPLICATED_FORMAT)
        ranks = range(self.world_size) if rank is None else [rank]
        parts = [load(self.root / self.parts[r]["path"], format=PART_FORMAT) for r in ranks]
        if any(f.get("step") != self.step for f in (replicated, *parts)):
            raise CheckpointError(f"the files of {self.path.name} hold other steps")
        return replicated, parts

    @property
    def root(self) -> Path:
        return self.path.parent.parent


class StateDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.logs = self.root / "logs"

    # ---- names ---------------------------------------------------------------------------
    def log_folder(self, rank: int, world_size: int) -> LogFolder:
        return LogFolder(self.logs / f"rank-{rank}-of-{world_size}", rank, world_size)

    def manifest_path(self, number: int) -> Path:
        return self.checkpoints / f"checkpoint-{number:08d}.json"

    def replicated_path(self, number: int) -> Path:
        return self.checkpoints / f"replicated-{number:08d}.pt"

    def part_path(self, number: int, rank: int, world_size: int) -> Path:
        return self.checkpoints / f"part-{number:08d}-{rank}-of-{world_size}.pt"

    def lock_path(self, folder: LogFolder) -> Path:
        """The lock a rank holds while it uses its log: beside it (so that the folder
        can be set aside under it); 0.2.0's in the rank's folder."""
        if folder.legacy:
            return folder.path.parent / "lock"
        return folder.path.with_name(folder.path.name + ".lock")

    # ---- what is on disk -----------------------------------------------------------------
    def committed(self) -> list[Checkpoint]:
        """Every committed checkpoint, newest first: this version's by number, then
        0.2.0's (ranks' by step, one process's by log position). One whose manifest
        cannot be read is listed with what its name says, and fails to load."""
        found = [self._manifest(path) for path in self.checkpoints.glob("checkpoint-*.json")]
        found.sort(key=lambda c: c.number, reverse=True)
        legacy = [self._legacy_manifest(p) for p in (self.root / "cluster").glob("manifest-*.json")]
        legacy.sort(key=lambda c: c.step, reverse=True)
        single = [self._legacy_single(p) for p in self.checkpoints.glob("checkpoint-*.pt")]
        single.sort(key=lambda c: _legacy_order(c.path), reverse=True)
        return [c for c in found + legacy + single if c is not None]

    def log_folders(self) -> list[LogFolder]:
        """Every rank's log on disk, of any layout (0.2.0's too)."""
        folders = []
        for path in sorted(self.logs.glob("rank-*-of-*")):
            rank_world = _rank_of(path.name)
            if rank_world:
                folders.append(LogFolder(path, *rank_world))
        for path in sorted(self.root.glob("rank-*-of-*")):  # 0.2.0's ranks
            rank_world = _rank_of(path.name)
            if rank_world and (path / "wal").is_dir():
                folders.append(LogFolder(path / "wal", *rank_world, legacy=True))
        if (self.root / "wal").is_dir():  # 0.2.0's one process
            folders.append(LogFolder(self.root / "wal", 0, 1, legacy=True))
        return folders

    def _manifest(self, path: Path) -> Checkpoint | None:
        number = _number(path.stem, "checkpoint-")
        if number is None:
            return None
        try:
            m = read_json(path, MANIFEST_FORMAT)
            return Checkpoint(path, number, int(m["step"]), int(m["world_size"]),
                              int(m["num_groups"]), float(m["created"]), int(m["updates"]),
                              m["parts"], [self.log_folder(p["rank"], int(m["world_size"]))
                                           for p in m["parts"]],
                              self.root / m["replicated"], list(m.get("adopted", [])))
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            return _unreadable(path, number, 0, e)

    def _legacy_manifest(self, path: Path) -> Checkpoint | None:
        step = _number(path.stem, "manifest-")
        if step is None:
            return None
        try:
            m = read_json(path, LEGACY_MANIFEST_FORMAT)
            world = int(m["world_size"])
            return Checkpoint(path, 0, step, world, int(m["num_groups"]),
                              float(m["created"]), int(m["updates"]), m["parts"],
                              [LogFolder(self.root / f"rank-{p['rank']}-of-{world}" / "wal",
                                         p["rank"], world, legacy=True) for p in m["parts"]],
                              self.root / m["replicated"], legacy=f"0.2.0, {world} ranks")
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            return _unreadable(path, 0, step, e, legacy="0.2.0, ranks")

    def _legacy_single(self, path: Path) -> Checkpoint | None:
        if _legacy_order(path) < (0, 0):
            return None
        return Checkpoint(path, 0, 0, 1, 0, path.stat().st_mtime, -1,
                          [{"rank": 0, "wal_seq": _legacy_order(path)[0]}],
                          [LogFolder(self.root / "wal", 0, 1, legacy=True)], None,
                          legacy="0.2.0, one process")

    def legacy_files(self) -> list[Path]:
        """What 0.2.0 left: set aside once a checkpoint of this version holds it."""
        paths = [self.root / "cluster", self.root / "wal", *self.root.glob("rank-*-of-*")]
        paths += list(self.checkpoints.glob("checkpoint-*.pt"))
        return [p for p in paths if p.exists()]

    # ---- keeping it tidy -------------------------------------------------------------------
    def remove_uncommitted(self) -> None:
        """Files of checkpoints never committed (a write a crash or a failure cut short),
        and temp files. At start, before any rank writes."""
        newest = max((c.number for c in self.committed()), default=0)
        for path in list(self.checkpoints.glob("*")):
            if path.name.endswith(".tmp") or _file_number(path.name) > newest:
                path.unlink()

    def prune(self, keep: int) -> list[Checkpoint]:
        """Keep the newest `keep` checkpoints of this version; remove the others'
        manifests (first: they are no longer committed), then their files. Returns the
        ones kept."""
        current = [c for c in self.committed() if not c.legacy]
        kept, old = current[:keep], current[keep:]
        for c in old:
            c.path.unlink(missing_ok=True)
        if old:
            fsync_dir(self.checkpoints)
        for c in old:
            if c.replicated is not None:
                c.replicated.unlink(missing_ok=True)
            for part in c.parts:
                (self.root / part["path"]).unlink(missing_ok=True)
        return kept

    def set_aside(self, paths: list[Path]) -> Path | None:
        """Move these into a new STATE/previous-DATE-* folder (inside the state folder: it
        may be a mount point, as systemd's StateDirectory is), durably. Never deletes."""
        paths = [p for p in dict.fromkeys(paths) if p.exists()]
        paths = [p for p in paths if not any(o in p.parents for o in paths)]  # outermost
        if not paths:
            return None
        aside = Path(tempfile.mkdtemp(prefix=f"previous-{time.strftime('%Y%m%d-%H%M%S')}-",
                                      dir=self.root))
        for path in paths:
            target = aside / path.relative_to(self.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
            fsync_dir(target.parent)
        for parent in {p.parent for p in paths}:
            fsync_dir(parent)
        return aside

    def everything(self) -> list[Path]:
        """What --fresh sets aside: every layout's checkpoints and logs (not the locks
        the ranks hold)."""
        paths = [self.checkpoints, *self.logs.glob("rank-*-of-*[0-9]"),
                 *self.legacy_files()]
        return [p for p in dict.fromkeys(paths) if p.exists() and
                (p.is_file() or any(p.iterdir()))]


# ---- files -----------------------------------------------------------------------------------
def lock(path: Path, what: str):
    """One daemon (one rank) per folder: an flock on the file `path`, released by the
    kernel when the process ends. Returns the open lock file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(path, "a+")
    except OSError as e:
        raise StartupError(f"cannot use {what} {path.parent} (checkpoint.dir): "
                           f"{e.strerror or e}") from e
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        raise StartupError(f"{what} {path.parent} is in use by {holder}: one daemon "
                           "per folder (set checkpoint.dir for another)") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"streamrnn serve, pid {os.getpid()}\n")
    lock_file.flush()
    return lock_file


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


def write_json(path: Path, value: dict) -> None:
    write_atomically(path, value, save=lambda v, f: f.write(json.dumps(v, indent=1).encode()))


def load(path: Path, format: str, map_location="cpu") -> dict:
    """A .pt file of ours: torch.load(weights_only=True), never arbitrary pickles."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, missing, or not a torch file at all
        raise CheckpointError(f"{path} cannot be read: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}"[:300]) from e
    if not isinstance(state, dict) or state.get("format") != format:
        raise CheckpointError(f"{path} is not a streamrnn file of format {format} (format "
                              f"{state.get('format') if isinstance(state, dict) else None!r})")
    return state


def read_json(path: Path, format: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from e
    if not isinstance(value, dict) or value.get("format") != format:
        raise CheckpointError(f"{path} is not a streamrnn manifest of format {format}")
    return value


def _unreadable(path: Path, number: int, step: int, error: Exception,
                legacy: str = "") -> Checkpoint:
    """A manifest that does not read: listed, in its place, and refused when loaded."""
    message = error if isinstance(error, CheckpointError) else \
        f"{path} is incomplete: {type(error).__name__}: {error}"
    return Checkpoint(path, number, step, 0, 0, 0.0, -1, [], [], None, legacy=legacy,
                      error=str(message))


def _file_number(name: str) -> int:
    """C from checkpoint-C.json, replicated-C.pt, part-C-R-of-W.pt; -1 for other files
    (0.2.0's checkpoint-<log position>-<n>.pt among them)."""
    kind, _, rest = name.partition("-")
    digits = rest.split("-")[0].split(".")[0]
    if kind in ("replicated", "part") or (kind == "checkpoint" and name.endswith(".json")):
        return int(digits) if digits.isdigit() else -1
    return -1


def _number(stem: str, prefix: str) -> int | None:
    digits = stem[len(prefix):] if stem.startswith(prefix) else ""
    return int(digits) if digits.isdigit() else None


def _rank_of(name: str) -> tuple[int, int] | None:
    """(rank, world size) from rank-R-of-W."""
    parts = name.split("-")
    if len(parts) == 4 and parts[1].isdigit() and parts[3].isdigit() and \
            int(parts[1]) < int(parts[3]):
        return int(parts[1]), int(parts[3])
    return None


def _legacy_order(path: Path) -> tuple[int, int]:
    """(wal_seq, number) from a 0.2.0 checkpoint-<wal_seq>-<number>.pt."""
    parts = path.stem.split("-")
    try:
        return int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        return -1, -1


# ---- what `streamrnn checkpoint list/inspect` show -------------------------------------------
def listing(root: Path) -> list[dict]:
    """Every committed checkpoint, newest first, from its manifest alone (0.2.0's
    one-process files: from the file), the one the next start loads marked."""
    rows, marked = [], False
    for c in StateDir(root).committed():
        row = _row(c)
        if c.replicated is None and not c.error:  # 0.2.0, one process: one file
            row = _inspected(c)
        files = [c.replicated] + [c.root / p["path"] for p in c.parts if "path" in p]
        if "error" not in row and not marked and all(f is None or f.exists() for f in files):
            row["next_start"] = marked = True
        rows.append(row)
    return rows


def inspect(path: Path) -> dict:
    """One checkpoint, every file of it read: its manifest (or a 0.2.0 file)."""
    path = Path(path)
    found = [c for c in StateDir(path.absolute().parent.parent).committed()
             if c.path.absolute() == path.absolute()]
    if not found:
        return {"path": str(path), "error": f"{path} is not a checkpoint's manifest in a "
                "state folder (STATE/checkpoints/checkpoint-C.json), nor a checkpoint of "
                "streamrnn 0.2.0"}
    return _inspected(found[0])


def _row(c: Checkpoint) -> dict:
    if c.error:
        return {"path": str(c.path), "error": c.error}
    tokens = sum(p["tokens_trained"] for p in c.parts) if all(
        "tokens_trained" in p for p in c.parts) else None
    bits = sum(p["bits"] for p in c.parts) if tokens is not None else None
    return {"path": str(c.path), "number": c.number, "created": c.created,
            "ranks": c.world_size, "step": c.step, "updates": c.updates,
            "streams": sum(p["streams"] for p in c.parts) if tokens is not None else None,
            "tokens_trained": tokens, "bits": bits,
            "bits_per_token": bits / tokens if tokens else None,
            "log_positions": [p["wal_seq"] for p in c.parts], "legacy": c.legacy}


def _inspected(c: Checkpoint) -> dict:
    try:
        replicated, parts = c.load()
    except (CheckpointError, KeyError, IndexError, TypeError) as e:
        return {"path": str(c.path), "error": str(e)}
    learner = replicated["learner"]
    tokens = sum(p["totals"]["tokens_trained"] for p in parts)
    bits = sum(p["totals"]["bits"] for p in parts)
    return {**_row(c), "created": replicated.get("created", c.created),
            "updates": learner["totals"]["updates"],
            "streams": sum(len(p["streams"]["ids"]) for p in parts),
            "tokens_trained": tokens, "bits": bits,
            "bits_per_token": bits / tokens if tokens else None,
            "log_positions": [p["wal_seq"] for p in parts],
            "version": replicated.get("version"), "config": learner["config"]}

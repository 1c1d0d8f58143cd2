"""A cluster's checkpoints: one per global step S, in parts, committed by a manifest.

    STATE/cluster/replicated-S.pt      rank 0: config, weights, optimizer, global totals
    STATE/rank-R-of-W/parts/part-S.pt  each rank: its streams, its totals, its wal_seq
    STATE/cluster/manifest-S.json      rank 0, once every part is durable: the commit

Each file is written whole or not at all (checkpoint.write_atomically). A step without
its manifest was never committed and is ignored (its files are removed later); a
manifest whose files do not load is skipped for the one before it, as a corrupt
checkpoint is. The newest checkpoint.keep manifests are kept, with their files; the
parts and log segments older than the oldest kept are removed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .. import __version__
from .checkpoint import CheckpointError, load, write_atomically

MANIFEST_FORMAT = "streamrnn.manifest/1"
REPLICATED_FORMAT = "streamrnn.replicated/1"
PART_FORMAT = "streamrnn.part/1"


def rank_folder(root: Path, rank: int, world_size: int) -> Path:
    return root / f"rank-{rank}-of-{world_size}"


class Manifests:
    def __init__(self, root: Path, rank: int, world_size: int, keep: int):
        self.root, self.rank, self.world_size, self.keep = root, rank, world_size, keep
        self.cluster_dir = root / "cluster"
        self.parts_dir = rank_folder(root, rank, world_size) / "parts"
        for folder in (self.cluster_dir, self.parts_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def replicated_path(self, step: int) -> Path:
        return self.cluster_dir / f"replicated-{step:016d}.pt"

    def part_path(self, step: int, rank: int | None = None) -> Path:
        folder = self.parts_dir if rank is None else \
            rank_folder(self.root, rank, self.world_size) / "parts"
        return folder / f"part-{step:016d}.pt"

    def manifest_path(self, step: int) -> Path:
        return self.cluster_dir / f"manifest-{step:016d}.json"

    # ---- writing -------------------------------------------------------------------------
    def write_part(self, step: int, part: dict, replicated: dict | None) -> None:
        """This rank's files of step S (rank 0 also writes the replicated part)."""
        if replicated is not None:
            write_atomically(self.replicated_path(step),
                             {"format": REPLICATED_FORMAT, "step": step, **replicated})
        write_atomically(self.part_path(step), {"format": PART_FORMAT, "step": step,
                                                "rank": self.rank, **part})

    def commit(self, step: int, updates: int, num_groups: int, wal_seqs: list[int]) -> Path:
        """Rank 0, once every rank's part of `step` is durable: the manifest, written
        last, makes the step the one a restart loads."""
        manifest = {
            "format": MANIFEST_FORMAT, "version": __version__, "created": time.time(),
            "step": step, "updates": updates, "world_size": self.world_size,
            "num_groups": num_groups,
            "replicated": str(self.replicated_path(step).relative_to(self.root)),
            "parts": [{"rank": r, "wal_seq": seq,
                       "path": str(self.part_path(step, r).relative_to(self.root))}
                      for r, seq in enumerate(wal_seqs)],
        }
        path = self.manifest_path(step)
        write_atomically(path, manifest,
                         save=lambda m, f: f.write(json.dumps(m, indent=1).encode()))
        return path

    def prune(self) -> int | None:
        """Keep the newest `keep` manifests and their files; remove this rank's parts
        (rank 0: also manifests and replicated parts) of older or uncommitted steps.
        Returns the oldest kept step, whose wal_seq bounds the log segments to keep."""
        kept = self.steps()[:self.keep]
        if not kept:
            return None
        oldest = kept[-1]
        folders = [self.parts_dir] + ([self.cluster_dir] if self.rank == 0 else [])
        for folder in folders:
            for path in folder.iterdir():
                step = _step_of(path)
                # newer than the newest commit: a write in progress, left alone
                if step is not None and step not in kept and step < kept[0]:
                    path.unlink()
        return oldest

    # ---- reading -------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, newest first."""
        steps = [_step_of(p) for p in self.cluster_dir.glob("manifest-*.json")]
        return sorted((s for s in steps if s is not None), reverse=True)

    def readable(self) -> list[dict]:
        """The committed manifests, newest first, less any removed meanwhile (rank 0
        prunes them while the other ranks read)."""
        out = []
        for step in self.steps():
            try:
                out.append(self.read_manifest(step))
            except CheckpointError:
                pass
        return out

    def read_manifest(self, step: int) -> dict:
        path = self.manifest_path(step)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path} cannot be read: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{path} is not a streamrnn manifest")
        return manifest

    def load(self, manifest: dict, rank: int) -> tuple[dict, dict]:
        """(the replicated part, rank `rank`'s part) of a committed step."""
        replicated = load(self.root / manifest["replicated"], format=REPLICATED_FORMAT)
        entry = manifest["parts"][rank]
        part = load(self.root / entry["path"], format=PART_FORMAT)
        if replicated["step"] != manifest["step"] or part["step"] != manifest["step"]:
            raise CheckpointError(f"the files of step {manifest['step']} hold other steps")
        return replicated, part


def _step_of(path: Path) -> int | None:
    """S from manifest-S.json, replicated-S.pt, part-S.pt; None for other files."""
    name = path.name
    for prefix, suffix in (("manifest-", ".json"), ("replicated-", ".pt"),
                           ("part-", ".pt")):
        if name.startswith(prefix) and name.endswith(suffix):
            digits = name[len(prefix):-len(suffix)]
            return int(digits) if digits.isdigit() else None
    return None

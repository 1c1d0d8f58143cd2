"""Real text found on this machine: the Python standard library's own sources.

The demo and the benchmark learn from it, so they need no download and no data set.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_files(limit: int | None = None, min_bytes: int = 20_000) -> list[Path]:
    """Python source files of the standard library, largest first, deterministic."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.glob("*.py") if p.stat().st_size >= min_bytes]
    files.sort(key=lambda p: (-p.stat().st_size, p.name))
    if not files:
        raise RuntimeError(f"no Python sources of {min_bytes}+ bytes under {root}")
    return files[:limit]


def text_streams(num_streams: int, bytes_per_stream: int) -> list[bytes]:
    """`num_streams` different byte strings of real text, each `bytes_per_stream` long
    (the sources concatenated and cut into pieces, wrapping around if too short)."""
    corpus = b"".join(p.read_bytes() for p in stdlib_files())
    need = num_streams * bytes_per_stream
    corpus = corpus * (need // len(corpus) + 1)
    return [corpus[i * bytes_per_stream:(i + 1) * bytes_per_stream]
            for i in range(num_streams)]

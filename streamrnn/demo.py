"""`streamrnn demo`: watch the engine learn real text, live.

Several Python standard library sources are fed as parallel streams, a few hundred bytes
per stream per turn; a progress line shows bytes/s and the prequential bits/byte (each
byte predicted before it is trained on) falling. At the end: a summary next to what xz
and bzip2 achieve on the same bytes, and a short text sampled from the learned model.
"""
from __future__ import annotations

import bz2
import lzma
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .config import Config
from .learner import Learner
from .textdata import stdlib_files


@dataclass
class Progress:
    """Running totals for the progress line; bits include each stream's first byte at
    8 bits (it has no prediction), so the figure compares with a compressor's."""
    started: float = field(default_factory=time.perf_counter)
    num_bytes: int = 0
    bits: float = 0.0
    recent: list[tuple[int, float]] = field(default_factory=list)  # (targets, bits)

    def add(self, num_bytes: int, bits: float) -> None:
        self.num_bytes += num_bytes
        self.bits += bits
        self.recent = (self.recent + [(num_bytes, bits)])[-20:]

    @property
    def recent_bits_per_byte(self) -> float:
        n = sum(t for t, _ in self.recent)
        return sum(b for _, b in self.recent) / n if n else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.num_bytes if self.num_bytes else float("nan")


def run(config: Config, seconds: float, num_streams: int, chunk: int, out=sys.stdout) -> dict:
    learner = Learner(config)
    files = stdlib_files(limit=num_streams)
    streams = {f.name: f.read_bytes() for f in files}
    interactive = out.isatty()
    say = lambda text: print(text, file=out, flush=True)
    say(f"streamrnn demo: learning {len(streams)} Python sources as parallel byte streams "
        f"on {learner.device} ({config.model.kind.upper()} {config.model.num_layers}x"
        f"{config.model.hidden_size}, TBPTT({config.train.k1}, {config.train.k2}), "
        f"{config.train.optimizer} lr {config.train.lr:g}) for {seconds:g} s")
    progress = Progress()
    fed = {name: 0 for name in streams}
    last_print = 0.0
    while time.perf_counter() - progress.started < seconds:
        piece = {name: data[fed[name]:fed[name] + chunk] for name, data in streams.items()
                 if fed[name] < len(data)}
        if not piece:
            break
        result = learner.learn_many({n: np.frombuffer(b, np.uint8) for n, b in piece.items()})
        first_bytes = sum(1 for n in piece if fed[n] == 0)  # no prediction: 8 bits each
        for name, b in piece.items():
            fed[name] += len(b)
        progress.add(result.targets + first_bytes, result.bits + 8.0 * first_bytes)
        now = time.perf_counter()
        if now - last_print >= (0.5 if interactive else 10.0):
            last_print = now
            line = _progress_line(progress, seconds, len(piece))
            print("\r" + line if interactive else line, end="" if interactive else "\n",
                  file=out, flush=True)
    result = learner.flush()
    progress.add(result.targets, result.bits)
    if interactive:
        print(file=out)
    return _summary(learner, progress, streams, fed, say)


def _progress_line(p: Progress, seconds: float, num_streams: int) -> str:
    elapsed = time.perf_counter() - p.started
    done = min(1.0, elapsed / seconds)
    bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
    return (f"[{bar}] {elapsed:4.0f}/{seconds:.0f}s  {p.num_bytes:>9,} bytes  "
            f"{p.num_bytes / max(elapsed, 1e-9):>7,.0f} B/s  bits/byte: now "
            f"{p.recent_bits_per_byte:5.2f}  overall {p.bits_per_byte:5.2f}  "
            f"streams {num_streams}")


def _summary(learner: Learner, p: Progress, streams: dict, fed: dict, say) -> dict:
    elapsed = time.perf_counter() - p.started
    seen = b"".join(data[:fed[name]] for name, data in streams.items())
    xz = 8 * len(lzma.compress(seen, preset=9 | lzma.PRESET_EXTREME)) / len(seen)
    bzip = 8 * len(bz2.compress(seen, 9)) / len(seen)
    say(f"learned {p.num_bytes:,} bytes in {elapsed:.0f} s ({p.num_bytes / elapsed:,.0f} "
        f"bytes/s), {learner.updates:,} updates")
    say(f"prequential bits/byte: {p.bits_per_byte:.3f} overall, "
        f"{p.recent_bits_per_byte:.3f} at the end  (same bytes: xz -9e {xz:.3f}, "
        f"bzip2 -9 {bzip:.3f})")
    name = next(iter(streams))
    sample = bytes(t for t in learner.generate(name, 240, temperature=0.7) if t < 256)
    say(f"sampled from the model, continuing {name}:")
    say("  | " + sample.decode("utf-8", "replace").replace("\n", "\n  | "))
    return {"bytes": p.num_bytes, "seconds": elapsed, "bits_per_byte": p.bits_per_byte,
            "recent_bits_per_byte": p.recent_bits_per_byte, "xz_bits_per_byte": xz,
            "bzip2_bits_per_byte": bzip, "updates": learner.updates}

"""`streamrnn demo`: the whole system on its defaults, watched live.

Starts `streamrnn serve` (default config, a temporary state folder, free loopback
ports), feeds Python standard library sources as parallel byte streams through the real
producer client, and shows what the daemon reports: bytes/s trained and the prequential
bits/byte (every byte predicted before it is trained on) falling. Then a summary next to
what xz and bzip2 achieve on the same bytes, and a text sampled from the learned model.
The daemon's queue is kept small, so its busy replies pace the producer: backpressure
at work.
"""
from __future__ import annotations

import bz2
import lzma
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path


from ..client import Producer, ProducerError
from .feeding import round_robin, wait_trained
from .local import LocalDaemon, free_port
from .textdata import stdlib_files


def run(overrides: list[str], seconds: float, num_streams: int, chunk: int,
        out=sys.stdout) -> int:
    say = lambda text: print(text, file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="streamrnn-demo-") as state:
        metrics_port = free_port()
        # a small queue: the producer is paced by busy replies, and little is left to
        # train when the feeding stops
        daemon = LocalDaemon(state, [f"metrics.port={metrics_port}",
                                     "ingest.max_queued_tokens=65536", *overrides])
        endpoint = daemon.endpoint
        try:
            with Producer(endpoint, retry_seconds=120) as control:
                info = control.status()  # waits until the daemon answers
                files = stdlib_files(limit=num_streams)
                say(f"streamrnn demo: daemon up at {endpoint} on {info['device']} "
                    f"({info['model']}, TBPTT({info['tbptt'][0]}, {info['tbptt'][1]})); "
                    f"feeding {len(files)} Python sources as parallel byte streams for "
                    f"{seconds:g} s")
                feeder = _Feeder(endpoint, files, chunk)
                feeder.start()
                _watch(control, feeder, seconds, out)
                feeder.stop()
                for f in files:
                    control.request({"type": "flush", "stream": f.name})
                final = wait_trained(control, timeout=120)
                _summary(control, feeder, final, say)
                say(f"(while it ran, Prometheus metrics were at "
                    f"http://127.0.0.1:{metrics_port}/metrics; `streamrnn serve` runs one "
                    "that stays)")
        except (ProducerError, KeyboardInterrupt) as e:
            say(f"streamrnn demo: {e or 'interrupted'}")
            say(daemon.log_tail())
            return 1
        finally:
            daemon.stop()
    return 0


class _Feeder(threading.Thread):
    """Sends the files round-robin, `chunk` bytes of each in turn, until stopped."""

    def __init__(self, endpoint: str, files: list[Path], chunk: int):
        super().__init__(daemon=True)
        self.endpoint, self.chunk = endpoint, chunk
        self.data = {f.name: f.read_bytes() for f in files}
        self.sent = {name: 0 for name in self.data}
        self.stopping = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with Producer(self.endpoint, retry_seconds=120) as producer:
                self.sent = round_robin(producer, self.data, self.chunk,
                                        go_on=lambda: not self.stopping.is_set())
                producer.flush()
        except Exception as e:  # reported by the main thread
            self.error = e

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        if self.error:
            raise ProducerError(f"feeding failed: {self.error}")

    def bytes_fed(self) -> bytes:
        return b"".join(d[:self.sent[n]] for n, d in self.data.items())


def _watch(control: Producer, feeder: _Feeder, seconds: float, out) -> None:
    interactive = out.isatty()
    started = time.monotonic()
    history: list[tuple[float, int, float]] = []  # (time, trained, bits)
    last_print = 0.0
    while (elapsed := time.monotonic() - started) < seconds and feeder.is_alive():
        time.sleep(0.5)
        s = control.status()
        now = time.monotonic()
        history.append((now, s["tokens_trained"], s["bits"]))
        if now - last_print < (1.0 if interactive else 10.0):
            continue
        last_print = now
        past = next((h for h in history if h[0] >= now - 10), history[0])
        trained, bits = s["tokens_trained"] - past[1], s["bits"] - past[2]
        recent = f"{bits / trained:5.2f}" if trained else "  -  "
        overall = s["bits"] / s["tokens_trained"] if s["tokens_trained"] else float("nan")
        done = min(1.0, elapsed / seconds)
        bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
        line = (f"[{bar}] {elapsed:4.0f}/{seconds:.0f}s  trained {s['tokens_trained']:>9,} B"
                f"  {trained / max(now - past[0], 1e-9):>7,.0f} B/s  bits/byte: now {recent}"
                f"  overall {overall:5.2f}  streams {s['streams']}")
        print("\r" + line if interactive else line, end="" if interactive else "\n",
              file=out, flush=True)
    if interactive:
        print(file=out)


def _summary(control: Producer, feeder: _Feeder, s: dict, say) -> None:
    seen = feeder.bytes_fed()
    streams = sum(1 for n in feeder.sent if feeder.sent[n])
    # each stream's first byte has no prediction: charge it 8 bits, as a compressor would
    bits_per_byte = (s["bits"] + 8 * streams) / max(1, s["tokens_trained"] + streams)
    size = max(1, len(seen))
    xz = 8 * len(lzma.compress(seen, preset=9 | lzma.PRESET_EXTREME)) / size
    bzip = 8 * len(bz2.compress(seen, 9)) / size
    gzip = 8 * len(zlib.compress(seen, 9)) / size
    say(f"trained {s['tokens_trained']:,} of {len(seen):,} bytes fed, {s['updates']:,} "
        f"updates, in {s['uptime_seconds']:.0f} s")
    say(f"prequential bits/byte: {bits_per_byte:.3f} overall; on the same bytes xz -9e "
        f"{xz:.3f}, bzip2 -9 {bzip:.3f}, gzip -9 {gzip:.3f}")
    best = min((xz, "xz"), (bzip, "bzip2"))
    verdict = (f"{1 - bits_per_byte / best[0]:.0%} fewer bits than {best[1]}"
               if bits_per_byte < best[0] else
               f"{bits_per_byte / best[0] - 1:.0%} more bits than {best[1]}")
    say(f"  {verdict}: the model predicted each byte before learning from it, in one pass")
    name = next(iter(feeder.data))
    generated = control.generate(name, 240, temperature=0.7)
    say(f"sampled from the model, continuing {name}:")
    text = bytes(t for t in generated if t < 256).decode("utf-8", "replace")
    say("  | " + text.replace("\n", "\n  | "))

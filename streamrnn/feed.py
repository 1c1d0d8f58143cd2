"""`streamrnn feed`: send files (or stdin) to a daemon as byte streams, through Producer.

Each file is its own stream (named by its path) unless --stream names one stream for
all; the bytes are appended at the stream's current end. Files go out interleaved, a
chunk of each in turn. At the end every message is acknowledged, and the streams are
flushed so their last bytes are trained too.
"""
from __future__ import annotations

import os
import stat
import sys
import time
from typing import BinaryIO, Iterator

import numpy as np

from .client import Producer, ProducerError


def run(endpoint: str, paths: list[str], stream: str | None, retry_seconds: float,
        chunk: int, flush: bool, keys: tuple[str | None, str | None] = (None, None),
        out=sys.stderr) -> int:
    sources = _open(paths)
    names = [stream] if stream else [name for name, _ in sources]
    interactive = out.isatty()
    started, sent = time.monotonic(), 0
    # at once, so that a wrong endpoint is seen before retry_seconds run out
    print(f"streamrnn feed: feeding {len(names)} stream(s) to {endpoint}", file=out,
          flush=True)
    try:
        with Producer(endpoint, retry_seconds=retry_seconds, server_key=keys[0],
                      client_key=keys[1]) as producer:
            progress = _Progress(producer, endpoint, interactive, out, started)
            producer.on_wait = lambda: progress.show(sent)  # while a full window waits
            if stream:  # one stream: the inputs one after the other
                readers = [(stream, (c for _, f in sources for c in _chunks(f, chunk)))]
            else:       # a stream per input, interleaved
                readers = [(name, _chunks(f, chunk)) for name, f in sources]
            while readers:
                for item in list(readers):
                    name, reader = item
                    data = next(reader, None)
                    if data is None:
                        readers.remove(item)
                        continue
                    producer.send(name, np.frombuffer(data, np.uint8))
                    sent += len(data)
                progress.show(sent)
            producer.flush()
            if flush:
                for name in names:
                    producer.request({"type": "flush", "stream": name})
    except ProducerError as e:
        print(("\n" if interactive else "") + f"streamrnn feed: {e}", file=out)
        return 1
    finally:
        for _, f in sources:
            if f is not sys.stdin.buffer:
                f.close()
    seconds = time.monotonic() - started
    print(("\r" if interactive else "") + f"fed {sent:,} bytes to {len(names)} "
          f"stream(s) in {seconds:.1f} s, all acknowledged", file=out)
    return 0


class _Progress:
    """A line every 0.5 s on a terminal (every 10 s in a log): bytes acknowledged (on
    disk at the daemon) of those sent, and what is waited for when nothing moves."""

    def __init__(self, producer: Producer, endpoint: str, interactive: bool, out,
                 started: float):
        self.producer, self.endpoint, self.interactive, self.out = (producer, endpoint,
                                                                     interactive, out)
        self.started, self.last_print, self.last_acked = started, started, 0
        self.last_move = started

    def show(self, sent: int) -> None:
        now = time.monotonic()
        acked = self.producer.stats.tokens_acked
        if acked != self.last_acked:
            self.last_acked, self.last_move = acked, now
        if now - self.last_print < (0.5 if self.interactive else 10):
            return
        line = (f"{acked:,} of {sent:,} bytes acknowledged, "
                f"{acked / max(now - self.started, 1e-9):,.0f} B/s")
        if self.producer.unacked and now - self.last_move >= 2:
            why = "answering busy" if self.producer.answered_busy() else "no answer"
            line += (f"; {self.producer.unacked} messages waiting "
                     f"{now - self.last_move:.0f} s for {self.endpoint} ({why})")
        self.last_print = now
        print("\r" + line + "\033[K" if self.interactive else line,
              end="" if self.interactive else "\n", file=self.out, flush=True)


def _open(paths: list[str]) -> list[tuple[str, BinaryIO]]:
    sources = []
    for path in paths:
        if path == "-":
            sources.append(("stdin", sys.stdin.buffer))
        else:
            try:
                sources.append((path, open(path, "rb")))
            except OSError as e:
                raise SystemExit(f"streamrnn feed: cannot read {path}: {e.strerror}")
    return sources


def _chunks(f: BinaryIO, size: int) -> Iterator[bytes]:
    """Chunks of at most `size` bytes. A file is read in full chunks; a pipe or terminal
    (`journalctl -f | streamrnn feed -`) gives whatever has arrived, at once: a full-size
    read would hold a slow trickle back until `size` bytes piled up."""
    read = f.read if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else f.read1
    while data := read(size):
        yield data

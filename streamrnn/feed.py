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
    started, sent, last_print = time.monotonic(), 0, 0.0
    try:
        with Producer(endpoint, retry_seconds=retry_seconds, server_key=keys[0],
                      client_key=keys[1]) as producer:
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
                now = time.monotonic()
                if now - last_print >= (0.5 if interactive else 10):
                    last_print = now
                    line = (f"fed {sent:,} bytes to {len(names)} stream(s), "
                            f"{sent / max(now - started, 1e-9):,.0f} B/s")
                    print("\r" + line if interactive else line, end="" if interactive
                          else "\n", file=out, flush=True)
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

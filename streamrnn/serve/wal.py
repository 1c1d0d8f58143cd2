"""The write-ahead log: every change to the learned state, in order, before it is acked.

Records are msgpack maps numbered by a global sequence number `q`:
    {"q": n, "t": "tokens", "s": stream, "k": <uint32 LE bytes>}  tokens appended
    {"q": n, "t": "train"}                                        one update ran
    {"q": n, "t": "flush", "s": [streams]}                        these were flushed
    {"q": n, "t": "end", "s": stream}                             stream ended (forgotten at
                                                                  the flush that empties it)
    {"q": n, "t": "config", "c": {...}}                           the daemon (re)started
                                                                  with this config
    {"q": n, "t": "noop"}                                         a probe for disk room
Replaying them in order onto the checkpoint that covers records <= its `q` rebuilds the
exact state: the batching of every update follows from the table the records built.

On disk: segment files `wal-<first q, 16 digits>.log`, each record framed as
    u32 length | u32 crc32(payload) | payload      (little-endian)
A crash can leave the newest record torn: opening the log cuts the newest segment at the
first frame that does not check out. A bad frame in an older segment is no torn write
but damage, and acknowledged records may follow it: the log refuses to open (WalDamaged)
rather than cut them. Segments whose records are all covered by the oldest kept
checkpoint are deleted.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Iterator

import msgpack

from . import faults

HEADER = struct.Struct("<II")
MAX_RECORD = 64 << 20


class WalFull(OSError):
    """A record could not be written (disk full): nothing of it is in the log."""


class WalSyncFailed(Exception):
    """fsync failed: what the log holds since the last good sync may not be on disk, and
    a later fsync would not say so (the kernel reports a write-back error once). Nothing
    more may be acknowledged: the daemon ends, and the next start replays what is there."""


class WalDamaged(Exception):
    """A segment other than the newest does not read to its end."""


class WriteAheadLog:
    def __init__(self, directory: Path, segment_bytes: int, fsync: bool = True,
                 start_after: int = 0):
        """Open (or create) the log in `directory`. New records are numbered after both
        what the log holds and `start_after` (the checkpoint's sequence number)."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync_enabled = fsync
        self.torn_bytes = 0  # cut from the tail on opening (a crash mid-write)
        scanned = self._scan()
        # kept up to date here, not read from the disk: a scrape on the metrics thread
        # reads it while the loop deletes segments
        self.num_bytes = sum(p.stat().st_size for p in self._segments())
        self.last_seq = max(scanned, start_after)
        self.file = None
        self.dirty = False
        segments = self._segments()
        if segments and self.last_seq == scanned:
            self._open(segments[-1])
        else:  # an empty log, or one the checkpoint is ahead of: a fresh segment
            self._open(self.dir / _segment_name(self.last_seq + 1))

    # ---- writing ---------------------------------------------------------------------------
    def append(self, record: dict) -> int:
        """Write one record (not yet durable: see sync); returns its sequence number."""
        seq = self.last_seq + 1
        payload = msgpack.packb({"q": seq, **record}, use_bin_type=True)
        if len(payload) > MAX_RECORD:  # reading would take it for a torn frame
            raise ValueError(f"a log record of {len(payload)} bytes (limit {MAX_RECORD})")
        frame = HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        try:
            if self.size + len(frame) > self.segment_bytes and self.size > 0:
                self._rotate(seq)  # a new file: can fail for want of inodes or space
            faults.maybe_fail("wal_write")
            written = os.write(self.file.fileno(), frame)
            if written != len(frame):
                raise OSError(28, "short write")
        except OSError as e:
            os.ftruncate(self.file.fileno(), self.size)  # no partial record stays behind
            raise WalFull(e.errno, f"write-ahead log {self.path}: {e.strerror or e}") from e
        self.size += len(frame)
        self.num_bytes += len(frame)
        self.last_seq = seq
        self.dirty = True
        return seq

    def sync(self) -> None:
        """Make everything appended durable (one fsync for the whole group)."""
        if self.dirty and self.fsync_enabled:
            faults.maybe_crash("wal_fsync")
            try:
                faults.maybe_fail("wal_fsync")
                os.fsync(self.file.fileno())
            except OSError as e:
                raise WalSyncFailed(f"fsync of the write-ahead log {self.path} failed: "
                                    f"{e.strerror or e}") from e
        self.dirty = False

    def close(self) -> None:
        if self.file is not None:
            self.sync()
            self.file.close()
            self.file = None

    # ---- reading ---------------------------------------------------------------------------
    def records_after(self, seq: int) -> Iterator[dict]:
        """Every record with q > seq, in order."""
        for path in self._segments():
            for record in _read_segment(path)[0]:
                if record["q"] > seq:
                    yield record

    def remove_covered(self, seq: int) -> int:
        """Delete segments whose records all have q <= seq (never the one being written).
        Returns the number deleted."""
        segments = self._segments()
        removed = 0
        for path, following in zip(segments, segments[1:]):
            if _first_seq(following) - 1 <= seq and path != self.path:
                size = path.stat().st_size
                path.unlink()
                self.num_bytes -= size
                removed += 1
        if removed:
            fsync_dir(self.dir)
        return removed

    @property
    def total_bytes(self) -> int:
        """The log's size on disk (no disk access: safe from any thread)."""
        return self.num_bytes

    # ---- internals -------------------------------------------------------------------------
    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("wal-*.log"))

    def _scan(self) -> int:
        """Check every segment; cut a torn tail; return the last sequence number."""
        last = 0
        for path, records, good_bytes, size in _checked_segments(self.dir):
            if good_bytes < size:  # the newest segment's torn tail
                self.torn_bytes += size - good_bytes
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
                    os.fsync(f.fileno())
            if records:
                last = records[-1]["q"]
        return last

    def _rotate(self, first_seq: int) -> None:
        self.sync()
        faults.maybe_fail("wal_rotate")
        old = self.file
        self._open(self.dir / _segment_name(first_seq))  # the old one stays if this fails
        old.close()

    def _open(self, path: Path) -> None:
        file = open(path, "ab")
        try:
            fsync_dir(self.dir)
        except OSError:
            file.close()
            raise
        self.path, self.file, self.size = path, file, file.tell()


def _read_segment(path: Path) -> tuple[list[dict], int]:
    """The records of a segment up to the first frame that does not check out, and the
    number of bytes they take."""
    data = path.read_bytes()
    records, pos = [], 0
    while pos + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if length > MAX_RECORD or end > len(data):
            break
        payload = data[pos + HEADER.size:end]
        if zlib.crc32(payload) != crc:
            break
        try:
            record = msgpack.unpackb(payload, raw=False)
        except Exception:
            break
        records.append(record)
        pos = end
    return records, pos


def _checked_segments(directory: Path):
    """(path, records, bytes they take, size) of each segment, in order. Only the newest
    may end in a torn record: damage before it, or a missing segment, is WalDamaged."""
    segments = sorted(Path(directory).glob("wal-*.log"))
    last = 0
    for path in segments:
        records, good_bytes = _read_segment(path)
        size = path.stat().st_size
        if good_bytes < size and path != segments[-1]:
            raise WalDamaged(
                f"log segment {path} is damaged at byte {good_bytes} of {size}, and "
                "newer segments follow it: records after the damage would be lost. "
                "Restore it from a backup, or start afresh with `streamrnn serve "
                "--fresh` (the old state is moved aside, not deleted)")
        if records and records[0]["q"] != last + 1 and last:
            raise WalDamaged(f"log segment {path} starts at record {records[0]['q']}, "
                             f"but the one before it ends at {last}: a segment is missing")
        if records:
            last = records[-1]["q"]
        yield path, records, good_bytes, size


def read_log(directory: Path, after: int = 0) -> list[dict]:
    """Every record with q > after, without opening the log for writing (a torn tail
    stays on disk; it was never acknowledged). WalDamaged as when opening."""
    return [record for _, records, _, _ in _checked_segments(directory)
            for record in records if record["q"] > after]


def last_change(directory: Path) -> int:
    """The sequence number of the newest record in a log folder that changes the state
    (not a noop probe), without opening the log for writing; 0 if none."""
    last = 0
    for path in sorted(Path(directory).glob("wal-*.log")):
        for record in _read_segment(path)[0]:
            if record["t"] != "noop":
                last = record["q"]
    return last


def _segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:016d}.log"


def _first_seq(path: Path) -> int:
    return int(path.stem.split("-")[1])


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

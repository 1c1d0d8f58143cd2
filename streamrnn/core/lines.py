"""Scored targets -> line records: how surprising each line of a stream was.

The learner scores each target of a watched stream in the pass that trains on it
(engine.target_scores: bits = -log2 p, under the weights before that update). Lines
are cut at the line token (newline for bytes); a line's record is made once its last
token has been scored, which may be several updates after its first:

    line            its number in the stream, from 0 (StreamTable.lines counts them)
    offset          the offset of its first scored token (a stream's first token is
                    predicted by nothing, so line 0 starts being scored at offset 1)
    tokens, bits    how many tokens were scored, and their bits summed
    bits_per_token  bits / tokens
    peak_bits       the mean bits of its PEAK_TOKENS most surprising tokens (all of a
                    shorter line's): what a few garbled bytes do to a line, whatever
                    its length; what `score` ranks by
    worst           the position with the most bits: offset, bits, the token the model
                    expected there, and that token's probability
    score           0 .. 1: the share of the stream's recent lines (scores.recent_lines)
                    with a lower peak_bits; 0 until warmup_lines lines were seen
    complete        False when its first tokens were scored before this tracker knew
                    the stream (a subscription, or a restart, in the middle of a line):
                    tokens and bits then cover the part seen
    text            its scored tokens (bytes for a byte vocabulary), token_bits theirs

Memory: per watched stream, its open line (up to MAX_LINE_TOKENS kept for the text) and
recent_lines float32s; streams nobody watches cost nothing here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .learner import Scored

MAX_LINE_TOKENS = 4096  # of a longer line, the first this many are sent as its text
# A line's surprise is ranked by its few most surprising tokens, not by its mean: on
# logs with garbled spans injected (bench anomaly, one log per stream, deploy/logs.toml)
# the mean of the top 8 gave AUC-ROC 0.996 / 0.999 / 0.999 / 1.000 on the Linux, HPC,
# Proxifier and OpenStack logs where the mean gave 0.968 / 0.998 / 0.998 / 0.996
PEAK_TOKENS = 8


@dataclass
class _OpenLine:
    number: int
    offset: int
    complete: bool
    next_offset: int   # the offset its next scored token must have to continue it
    tokens: int = 0
    bits: float = 0.0
    worst: tuple[int, float, int, float] | None = None  # offset, bits, expected, p
    peak: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    text: list[np.ndarray] = field(default_factory=list)
    token_bits: list[np.ndarray] = field(default_factory=list)
    kept: int = 0      # tokens in text

    def add(self, offset: int, tokens: np.ndarray, bits: np.ndarray, expected: np.ndarray,
            p_expected: np.ndarray) -> None:
        if not len(tokens):
            return
        i = int(np.argmax(bits))  # (a NaN, from an update that was skipped, wins)
        if self.worst is None or not bits[i] <= self.worst[1]:
            self.worst = (offset + i, float(bits[i]), int(expected[i]), float(p_expected[i]))
        self.tokens += len(tokens)
        self.bits += float(bits.sum(dtype=np.float64))
        both = np.concatenate([self.peak, bits])
        self.peak = both if len(both) <= PEAK_TOKENS else \
            np.partition(both, len(both) - PEAK_TOKENS)[-PEAK_TOKENS:]
        self.next_offset = offset + len(tokens)
        room = MAX_LINE_TOKENS - self.kept
        if room > 0:
            self.text.append(tokens[:room])
            self.token_bits.append(bits[:room])
            self.kept += min(room, len(tokens))


class Recent:
    """The last `size` lines' peak bits of one stream, to rank a new line among. Grows
    with the lines seen, to 4 bytes a line at most: a stream of few lines costs little."""

    def __init__(self, size: int):
        self.size = size
        self.values = np.zeros(min(size, 16), np.float32)
        self.count = 0  # lines seen (the ring holds the last `size`)

    def rank(self, value: float) -> float:
        """The share of recent lines below `value` (ties count half), then add it."""
        held = self.values[:min(self.count, len(self.values))]
        below = np.count_nonzero(held < value) + 0.5 * np.count_nonzero(held == value)
        share = float(below / len(held)) if len(held) else 0.0
        if self.count == len(self.values) < self.size:  # full before it wraps: grow
            self.values = np.concatenate([self.values, np.zeros(
                min(len(self.values), self.size - len(self.values)), np.float32)])
        self.values[self.count % len(self.values)] = value
        self.count += 1
        return share


class LineTracker:
    """Line records from the scored targets of the streams it is given, in order."""

    def __init__(self, line_token: int, recent_lines: int, warmup_lines: int,
                 vocab_size: int):
        self.line_token = line_token
        self.recent_lines, self.warmup_lines = recent_lines, warmup_lines
        self.as_bytes = vocab_size <= 256
        self.open: dict = {}    # stream -> _OpenLine
        self.recent: dict = {}  # stream -> Recent

    def forget(self, stream) -> None:
        """Nobody watches the stream's lines any more: drop what was kept of it."""
        self.open.pop(stream, None)
        self.recent.pop(stream, None)

    def lines(self, scored: Scored, wanted: np.ndarray) -> list[tuple[object, dict]]:
        """(stream, record) for every line of `scored` that ended, of the streams
        `wanted` (a bool per stream of `scored`), in order."""
        records = []
        ends = np.cumsum(scored.counts)
        for i in np.flatnonzero(wanted).tolist():
            begin, end = int(ends[i] - scored.counts[i]), int(ends[i])
            records += self._stream(scored, i, begin, end)
        return records

    def _stream(self, s: Scored, i: int, begin: int, end: int) -> list[tuple[object, dict]]:
        stream, offset = s.streams[i], int(s.first_offset[i])
        line = self._continue(stream, offset, int(s.previous[begin]), int(s.lines_before[i]))
        out = []
        cuts = (np.flatnonzero(s.tokens[begin:end] == self.line_token) + 1).tolist()
        start = 0
        for stop in cuts + ([] if cuts and cuts[-1] == end - begin else [end - begin]):
            at = slice(begin + start, begin + stop)
            line.add(offset + start, s.tokens[at], s.bits[at], s.expected[at],
                     s.p_expected[at])
            if cuts and stop <= cuts[-1]:  # the line ended at stop
                out.append((stream, self._record(stream, line)))
                line = _OpenLine(line.number + 1, offset + stop, True, offset + stop)
            start = stop
        self.open[stream] = line
        return out

    def _continue(self, stream, offset: int, previous: int, lines_before: int) -> _OpenLine:
        """The line the target at `offset` belongs to: the open one it continues, or a
        new one (complete when it starts there or at the stream's start)."""
        line = self.open.get(stream)
        if line is not None and line.next_offset == offset and line.number == lines_before:
            return line
        if offset == 1:  # the stream's start (the table counts its first token as the
            # first update commits: not yet)
            return _OpenLine(lines_before + (previous == self.line_token), 1, True, 1)
        return _OpenLine(lines_before, offset, previous == self.line_token, offset)

    def _record(self, stream, line: _OpenLine) -> dict:
        per_token = line.bits / line.tokens if line.tokens else 0.0
        peak = float(line.peak.mean(dtype=np.float64)) if len(line.peak) else 0.0
        recent = self.recent.get(stream)
        if recent is None:
            recent = self.recent[stream] = Recent(self.recent_lines)
        warm = recent.count >= self.warmup_lines
        score = recent.rank(peak)
        text = np.concatenate(line.text) if line.text else np.zeros(0, np.int64)
        worst = line.worst or (line.offset, 0.0, 0, 0.0)
        return {"kind": "line", "stream": stream, "line": line.number, "offset": line.offset,
                "tokens": line.tokens, "bits": line.bits, "bits_per_token": per_token,
                "peak_bits": peak,
                "worst": {"offset": worst[0], "bits": worst[1], "expected": worst[2],
                          "p_expected": worst[3]},
                "score": score if warm else 0.0, "complete": line.complete,
                "text": (text.astype(np.uint8).tobytes() if self.as_bytes
                         else text.astype("<i4").tobytes()),
                "token_bits": np.concatenate(line.token_bits).astype("<f4").tobytes()
                if line.token_bits else b""}

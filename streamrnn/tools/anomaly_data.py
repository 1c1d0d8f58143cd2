"""Data, baselines and metrics for `streamrnn bench anomaly`: how well per-line surprise
scores find anomalous lines in a log.

A benchmark log is a LabelledLog: the bytes fed to the model as one stream (lines ending
in b"\\n") and a label per line (True: anomalous). Two sources:

- bgl(): BGL_2k.log, whose first column labels each line (`-` normal, otherwise an alert
  category); the column is stripped so that the model never sees the label.
- injected_logs(): the unlabelled base logs, with anomalies of our own at known places
  in their second half: foreign lines (whole lines of another log) and garbled spans
  (8-24 random printable bytes inside a line).

A model scores every line (higher: more surprising) seeing only the bytes before it, as
the daemon does online; evaluate() turns scores into AUC-ROC, AUC-PR (average precision)
and the best F1, on the second half of the log (the first half is for learning what
normal is: second_half()). Two baselines score the same way, with no model: zlib (bits
to compress the line given the 32 KiB before it) and an adaptive order-3 byte context
model (PPM, escape method C):

    log = bgl(loghub_folder())
    scores = ...                                   # one float per line of log.data
    evaluate(scores, log.labels, second_half(log.labels))
    baselines(log, second_half(log.labels))        # {"zlib": {...}, "order3": {...}}

Only numpy and the standard library: the metrics are written here, not taken from
sklearn, and tested against their brute-force definitions.

Licence of the data. The logs are samples of loghub, https://github.com/logpai/loghub
(commit dd61d09), whose licence asks that any use or copy of the datasets refer to that
repository and cite: Jieming Zhu, Shilin He, Pinjia He, Jinyang Liu, Michael R. Lyu,
"Loghub: A Large Collection of System Log Datasets for AI-driven Log Analytics", ISSRE
2023. BGL: Adam J. Oliner, Jon Stearley, "What Supercomputers Say: A Study of Five System
Logs", DSN 2007. Data derived from those files (every LabelledLog made here, and anything
written from one) keeps this note with it.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOGHUB_ENV = "STREAMRNN_LOGHUB"
BGL_FILE = "BGL_2k.log"
# the unlabelled base logs, in the order injected_logs() returns them
BASE_LOGS = ("Linux", "Apache", "Hadoop", "HPC", "Proxifier", "OpenStack")

INJECTED_FRACTION = 0.01  # of the second half's lines, for each kind of anomaly
MIN_INJECTED = 5          # of each kind, however short the log
GARBLE_MIN, GARBLE_MAX = 8, 24  # a garbled span's length in bytes, both included
PRINTABLE = np.arange(0x20, 0x7F, dtype=np.uint8)  # printable ASCII: space to ~

ZLIB_WINDOW = 32768  # raw deflate (wbits -15) can look back this far, no further
PPM_ORDER = 3


# ---- where the data is ------------------------------------------------------------------
def loghub_folder() -> Path:
    """The folder of loghub samples: $STREAMRNN_LOGHUB if set, else
    <repo>/../shared/data/loghub. FileNotFoundError, saying what to set, if neither is
    a folder. A STREAMRNN_LOGHUB that is set but wrong is an error, not skipped: a
    benchmark must not quietly read other data than the one it was pointed at."""
    setting = os.environ.get(LOGHUB_ENV)
    if setting:
        folder = Path(setting)
        if not folder.is_dir():
            raise FileNotFoundError(f"{LOGHUB_ENV}={setting} is not a folder: set it to "
                                    f"the folder that holds {BGL_FILE} and the other "
                                    "loghub samples")
        return folder
    repo = Path(__file__).resolve().parents[2]  # streamrnn/tools/this file -> the repo
    folder = repo.parent / "shared" / "data" / "loghub"
    if not folder.is_dir():
        raise FileNotFoundError(f"no loghub samples: {folder} is not a folder; set "
                                f"{LOGHUB_ENV} to the folder that holds {BGL_FILE} and "
                                "the other loghub *_2k.log files")
    return folder


# ---- lines ------------------------------------------------------------------------------
def lines(data: bytes) -> list[bytes]:
    """The lines of `data`, each with its b"\\n": as many as data.count(b"\\n"). Bytes
    after the last b"\\n" are an unfinished line and not counted (a LabelledLog's data
    always ends with b"\\n", so it has none)."""
    pieces = data.split(b"\n")[:-1]  # the last piece is what follows the last b"\n"
    return [piece + b"\n" for piece in pieces]


def line_offsets(data: bytes) -> np.ndarray:
    """Where each line starts in `data`, and after them where the last one ends: line i
    is data[offsets[i]:offsets[i + 1]]. len(offsets) == data.count(b"\\n") + 1. For
    turning per-byte scores into per-line ones (np.add.reduceat over offsets[:-1])."""
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    return np.concatenate([[0], newlines + 1]).astype(np.int64)


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare with ==
class LabelledLog:
    """One benchmark log: `data` is fed to the model as one stream; labels[i] says
    whether line i of it is anomalous. Checked on creation: data ends with b"\\n" and
    there is one bool label per line. The labels are made read-only, as the log is."""
    name: str
    data: bytes
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.data and not self.data.endswith(b"\n"):
            raise ValueError(f"{self.name}: data must end with a newline")
        labels = np.array(self.labels, dtype=bool)  # a copy: the caller's stays theirs
        n_lines = self.data.count(b"\n")
        if labels.shape != (n_lines,):
            raise ValueError(f"{self.name}: {labels.shape} labels for {n_lines} lines")
        labels.flags.writeable = False
        object.__setattr__(self, "labels", labels)  # frozen: the documented way round

    @property
    def lines(self) -> list[bytes]:
        return lines(self.data)


def read_log_lines(path: Path) -> list[bytes]:
    """The lines of a log file, without their line ends. A CRLF line end counts as a
    newline: most loghub samples end lines with b"\\r\\n", Proxifier's with b"\\n", and
    a left-over b"\\r" would mark where a line came from (a foreign line would be found
    by its line end alone). A last line with no newline after it is kept."""
    pieces = path.read_bytes().split(b"\n")
    if pieces[-1] == b"":  # the file ended with a newline: no unfinished last line
        pieces.pop()
    return [p[:-1] if p.endswith(b"\r") else p for p in pieces]


def _joined(lines_: list[bytes]) -> bytes:
    """Lines without line ends, as one stream: each followed by b"\\n"."""
    return b"".join(line + b"\n" for line in lines_)


def second_half(labels: np.ndarray) -> slice:
    """The lines a benchmark is evaluated on: the second half (the middle line goes to
    it when the count is odd). The first half is where the model learns what normal is;
    injected logs keep every anomaly in this half."""
    n = len(labels)
    return slice(n // 2, n)


# ---- BGL: labelled ----------------------------------------------------------------------
def bgl(folder: Path) -> LabelledLog:
    """BGL_2k.log with its label column stripped (with the space after it); a line is
    anomalous where that column is not `-`. Line ends as read_log_lines() reads them."""
    labels, stripped = [], []
    for number, line in enumerate(read_log_lines(Path(folder) / BGL_FILE), 1):
        label, space, rest = line.partition(b" ")
        if not space or not label:
            raise ValueError(f"{BGL_FILE} line {number}: no label column")
        labels.append(label != b"-")
        stripped.append(rest)
    return LabelledLog("BGL", _joined(stripped), np.array(labels, dtype=bool))


# ---- injected anomalies -----------------------------------------------------------------
def injected_count(n_lines: int) -> int:
    """How many anomalies of each kind a base log of n_lines gets: about 1% of its
    second half, at least MIN_INJECTED."""
    return max(MIN_INJECTED, round(INJECTED_FRACTION * (n_lines - n_lines // 2)))


def injected(name: str, base: bytes, seed: int, foreign_pool: list[bytes]
             ) -> LabelledLog:
    """`base` (lines ending in b"\\n") with anomalies at known places, all in the second
    half of the result, so second_half(labels) holds every one of them:

    - foreign lines: injected_count() lines drawn from `foreign_pool` (lines of other
      logs, with or without their b"\\n"), each inserted as a new line;
    - garbled spans: in injected_count() other lines, a span of 8-24 bytes is replaced
      by random printable ASCII (never a newline), different from what was there; the
      line keeps its length and the rest of its bytes.

    The result has len(base lines) + injected_count() lines. The same seed gives the
    same log; the name is mixed into the seed so that logs made with one seed do not
    share positions. Named "<name>+injected"."""
    if not base.endswith(b"\n"):
        raise ValueError(f"{name}: base must end with a newline")
    base_lines = [line[:-1] for line in lines(base)]  # without their b"\n"
    n = len(base_lines)
    count = injected_count(n)
    # The result's first half is base lines 0 .. first - 1, untouched: an anomaly goes
    # at or after base line `first`, and inserting lines only moves later ones further.
    first = (n + count) // 2
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])

    # lines long enough to hold a span of GARBLE_MAX bytes: every length can be drawn
    garbleable = [i for i in range(first, n) if len(base_lines[i]) >= GARBLE_MAX]
    if len(garbleable) < count or n - first < count or len(foreign_pool) < count:
        raise ValueError(f"{name}: too few lines to inject {count} anomalies of a kind")
    garbled = set(rng.choice(garbleable, size=count, replace=False).tolist())
    # a foreign line goes before base line i (i == n: after the last line)
    insert_before = set(rng.choice(np.arange(first, n + 1), size=count,
                                   replace=False).tolist())
    foreign = [foreign_pool[i].removesuffix(b"\n")
               for i in rng.choice(len(foreign_pool), size=count, replace=False)]
    if any(b"\n" in line for line in foreign):
        raise ValueError(f"{name}: a foreign line holds a newline inside it")

    out_lines, labels = [], []
    for i in range(n + 1):
        if i in insert_before:
            out_lines.append(foreign.pop())
            labels.append(True)
        if i == n:
            break
        if i in garbled:
            out_lines.append(_garbled(base_lines[i], rng))
            labels.append(True)
        else:
            out_lines.append(base_lines[i])
            labels.append(False)
    return LabelledLog(f"{name}+injected", _joined(out_lines), np.array(labels))


def _garbled(line: bytes, rng: np.random.Generator) -> bytes:
    """`line` (no newline, at least GARBLE_MAX bytes) with a random span of 8-24 bytes
    replaced by random printable ASCII that differs from the bytes it replaces."""
    length = int(rng.integers(GARBLE_MIN, GARBLE_MAX + 1))
    start = int(rng.integers(0, len(line) - length + 1))
    old = line[start:start + length]
    while True:  # equal only with odds 95**-8 or less: a redraw, not a bias
        new = rng.choice(PRINTABLE, size=length).tobytes()
        if new != old:
            return line[:start] + new + line[start + length:]


def injected_logs(folder: Path, seed: int = 0) -> list[LabelledLog]:
    """Each base log of BASE_LOGS with injected anomalies; its foreign lines are drawn
    from the lines of the other base logs."""
    base = {name: read_log_lines(Path(folder) / f"{name}_2k.log") for name in BASE_LOGS}
    logs = []
    for name in BASE_LOGS:
        pool = [line for other in BASE_LOGS if other != name for line in base[other]]
        logs.append(injected(name, _joined(base[name]), seed, pool))
    return logs


# ---- baselines: per-line scores with no model -------------------------------------------
def zlib_line_bits(data: bytes, window: int = ZLIB_WINDOW) -> np.ndarray:
    """For each line of `data`: the bits raw deflate (level 9) spends on the line with
    the `window` bytes before it as a preset dictionary, per byte of the line (its
    b"\\n" included). Online: a line's score depends on it and the bytes before it only.

    Each line is compressed on its own and finished, so its bits include one block's
    header and end code and the padding to a whole byte: a cost of roughly 2-10 bytes
    per line whatever the line holds, which raises short lines' scores more than long
    ones'. That is part of this baseline, as measured."""
    if not 0 < window <= ZLIB_WINDOW:
        raise ValueError(f"window must be 1 .. {ZLIB_WINDOW} bytes (raw deflate's)")
    offsets = line_offsets(data)
    scores = np.empty(len(offsets) - 1)
    for i, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        history = data[max(0, start - window):start]
        # zlib refuses an empty preset dictionary: the first line goes without one
        compressor = (zlib.compressobj(9, zlib.DEFLATED, -15, zdict=history) if history
                      else zlib.compressobj(9, zlib.DEFLATED, -15))
        compressed = compressor.compress(data[start:end]) + compressor.flush()
        scores[i] = 8 * len(compressed) / (end - start)
    return scores


def order3_byte_bits(data: bytes) -> np.ndarray:
    """The bits an adaptive order-3 context model spends on each byte of `data`, each
    predicted from the bytes before it only, and learned from after.

    PPM with escape method C (Moffat's PPMC) and exclusions: the byte is predicted in
    the context of the previous 3 bytes; if never seen there, an escape is coded and the
    context of the previous 2 bytes is tried, then 1, then 0 (byte frequencies), then a
    uniform guess. In a context with n bytes seen, d of them distinct, a byte seen c times
    has probability c / (n + d) and the escape d / (n + d). Exclusion: after an escape
    the bytes of the context escaped from are not candidates below (they would have been
    coded above), so their counts are left out. Counts of every order are updated after
    each byte, so a shorter context has seen every byte a longer one has: the bytes to
    exclude are just those of the last context escaped from."""
    # counts[k] maps a context (the k bytes before) to {byte: times seen after it};
    # totals[k] maps it to the sum of those times
    counts: list[dict[bytes, dict[int, int]]] = [{} for _ in range(PPM_ORDER + 1)]
    totals: list[dict[bytes, int]] = [{} for _ in range(PPM_ORDER + 1)]
    bits = np.empty(len(data))
    log2 = math.log2
    for i, byte in enumerate(data):
        contexts = [data[i - k:i] for k in range(min(PPM_ORDER, i) + 1)]
        probability = 1.0
        excluded: dict[int, int] = {}  # the bytes of the last context escaped from
        for k in range(len(contexts) - 1, -1, -1):
            seen = counts[k].get(contexts[k])
            if seen is None:  # a context never met: no escape to code
                continue
            n = totals[k][contexts[k]] - sum(seen[b] for b in excluded)
            d = len(seen) - len(excluded)
            if d == 0:  # every byte seen here was excluded: nothing to code either
                continue
            c = seen.get(byte)
            if c is not None:  # not excluded: an excluded byte would have been found
                probability *= c / (n + d)
                break
            probability *= d / (n + d)
            excluded = seen
        else:  # escaped from every order: a byte never seen, uniform over the others
            probability /= 256 - len(excluded)
        bits[i] = -log2(probability)
        for k, context in enumerate(contexts):
            seen = counts[k].setdefault(context, {})
            seen[byte] = seen.get(byte, 0) + 1
            totals[k][context] = totals[k].get(context, 0) + 1
    return bits


def order3_line_bits(data: bytes) -> np.ndarray:
    """For each line of `data` (lines() counts them): the mean bits per byte that
    order3_byte_bits() spends on its bytes, its b"\\n" included."""
    offsets = line_offsets(data)
    if len(offsets) == 1:
        return np.empty(0)
    byte_bits = order3_byte_bits(data[:offsets[-1]])
    return np.add.reduceat(byte_bits, offsets[:-1]) / np.diff(offsets)


# ---- metrics ----------------------------------------------------------------------------
def _checked(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"{scores.shape} scores for {labels.shape} labels: one each")
    if np.isnan(scores).any():  # a NaN has no place in an order of scores
        raise ValueError("a score is NaN")
    return scores, labels


def _counts_by_threshold(scores: np.ndarray, labels: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct score t, highest first: t, and the true and false positives
    when every line scoring t or more is called anomalous. Tied scores make one
    threshold: lines of equal score cannot be told apart by any threshold."""
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    tp, fp = np.cumsum(labels), np.cumsum(~labels)
    last_of_tie = np.flatnonzero(np.diff(scores) != 0)  # the last line of each tie
    ends = np.append(last_of_tie, len(scores) - 1)
    return scores[ends], tp[ends], fp[ends]


def auc_roc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The area under the ROC curve: the chance that an anomalous line scores higher
    than a normal one, ties counting a half (Mann-Whitney U with average ranks). NaN if
    there are no anomalous or no normal lines."""
    scores, labels = _checked(scores, labels)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    # average ranks, 1-based: a tie of m values starting at rank r has rank r + (m-1)/2
    _, tie_of, tie_size = np.unique(scores, return_inverse=True, return_counts=True)
    tie_start = np.cumsum(tie_size) - tie_size + 1
    ranks = tie_start[tie_of] + (tie_size[tie_of] - 1) / 2
    u = ranks[labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def auc_pr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision, as sklearn's average_precision_score defines it: the sum over
    thresholds, highest first, of (R_n - R_{n-1}) * P_n (recall R, precision P, R_0 = 0;
    tied scores one threshold). NaN if there are no anomalous or no normal lines."""
    scores, labels = _checked(scores, labels)
    positives = int(labels.sum())
    if positives == 0 or positives == len(labels):
        return math.nan
    _, tp, fp = _counts_by_threshold(scores, labels)
    precision = tp / (tp + fp)
    recall = tp / positives
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The best F1 over all thresholds, and that threshold (a line is called anomalous
    if its score is at least that); of thresholds with the same F1, the highest. (NaN,
    NaN) if there are no anomalous or no normal lines."""
    scores, labels = _checked(scores, labels)
    positives = int(labels.sum())
    if positives == 0 or positives == len(labels):
        return math.nan, math.nan
    thresholds, tp, fp = _counts_by_threshold(scores, labels)
    f1 = 2 * tp / (tp + fp + positives)  # 2PR / (P + R), with tp + fp > 0 always
    best = int(np.argmax(f1))  # the first: the highest threshold
    return float(f1[best]), float(thresholds[best])


def evaluate(scores: np.ndarray, labels: np.ndarray, on: slice = slice(None)) -> dict:
    """The metrics over the lines `on` (e.g. second_half(labels)): {"auc_roc",
    "auc_pr", "best_f1", "positives", "lines"}, as plain floats and ints."""
    scores, labels = _checked(scores, labels)
    scores, labels = scores[on], labels[on]
    return {"auc_roc": auc_roc(scores, labels), "auc_pr": auc_pr(scores, labels),
            "best_f1": best_f1(scores, labels)[0], "positives": int(labels.sum()),
            "lines": len(labels)}


def baselines(log: LabelledLog, evaluated: slice) -> dict[str, dict]:
    """The baselines' metrics on the lines `evaluated` of `log`: {"zlib": ...,
    "order3": ...}, each as evaluate() gives them. Each scores the whole log (the lines
    before `evaluated` are its history), a few seconds for 2,000 lines."""
    return {"zlib": evaluate(zlib_line_bits(log.data), log.labels, evaluated),
            "order3": evaluate(order3_line_bits(log.data), log.labels, evaluated)}

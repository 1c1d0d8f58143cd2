"""The anomaly benchmark's data, baselines and metrics (streamrnn.tools.anomaly_data).

The metrics are checked against their brute-force definitions on small random inputs
full of ties; the data on the real loghub samples (skipped, with the reason, where the
folder is missing: set STREAMRNN_LOGHUB). The logs are loghub's,
https://github.com/logpai/loghub: Zhu et al., "Loghub: A Large Collection of System Log
Datasets for AI-driven Log Analytics", ISSRE 2023; BGL: Oliner & Stearley, DSN 2007.
"""
from __future__ import annotations

import itertools
import math
import re
from fractions import Fraction

import numpy as np
import pytest

from streamrnn.tools import anomaly_data as ad


# ---- metrics: brute force ---------------------------------------------------------------
def brute_auc_roc(scores, labels):
    """The fraction of (anomalous, normal) pairs ordered right, a tie counting 1/2."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0
               for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_by_threshold(scores, labels):
    """(threshold, precision, recall, F1) for each distinct score, highest first, a
    line called anomalous when its score is at least the threshold. Exact fractions, so
    that equal F1s compare equal."""
    positives = sum(labels)
    rows = []
    for t in sorted(set(scores), reverse=True):
        called = [s >= t for s in scores]
        tp = sum(c and y for c, y in zip(called, labels))
        fp = sum(c and not y for c, y in zip(called, labels))
        precision, recall = Fraction(tp, tp + fp), Fraction(tp, positives)
        f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
        rows.append((t, precision, recall, f1))
    return rows


def brute_average_precision(scores, labels):
    ap, previous_recall = Fraction(0), Fraction(0)
    for _, precision, recall, _ in brute_by_threshold(scores, labels):
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return float(ap)


def brute_best_f1(scores, labels):
    rows = brute_by_threshold(scores, labels)
    best = max(f1 for _, _, _, f1 in rows)
    return float(best), max(t for t, _, _, f1 in rows if f1 == best)  # the highest such


def random_cases(count=300, seed=1):
    """Small scores drawn from few values (ties everywhere), both labels present."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < count:
        n = int(rng.integers(2, 25))
        scores = rng.integers(0, int(rng.integers(1, 6)), size=n) / 2.0
        labels = rng.random(n) < rng.uniform(0.1, 0.9)
        if 0 < labels.sum() < n:
            made += 1
            yield scores, labels


def test_the_metrics_agree_with_their_brute_force_definitions_with_ties():
    for scores, labels in random_cases():
        s, y = scores.tolist(), labels.tolist()
        assert ad.auc_roc(scores, labels) == pytest.approx(brute_auc_roc(s, y))
        assert ad.auc_pr(scores, labels) == pytest.approx(brute_average_precision(s, y))
        f1, threshold = ad.best_f1(scores, labels)
        want_f1, want_threshold = brute_best_f1(s, y)
        assert (f1, threshold) == (pytest.approx(want_f1), want_threshold)


def test_the_metrics_give_sklearns_values_on_its_documented_example():
    # sklearn's docs: roc_auc_score 0.75, average_precision_score 0.8333 on these
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert ad.auc_roc(scores, labels) == pytest.approx(0.75)
    assert ad.auc_pr(scores, labels) == pytest.approx(0.8333333333)
    # a tie is one threshold: at 0.5 P = R = 1/2, at 0.2 P = 2/3 and R = 1
    tie = np.array([0.5, 0.5, 0.2])
    assert ad.auc_pr(tie, np.array([1, 0, 1])) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert ad.auc_roc(tie, np.array([1, 0, 1])) == pytest.approx(0.25)  # 1/2 + 0, of 2


def test_the_metrics_are_nan_without_both_kinds_of_line_and_refuse_nan_scores():
    for labels in ([0, 0, 0], [1, 1, 1]):
        labels = np.array(labels, dtype=bool)
        assert math.isnan(ad.auc_roc(np.arange(3.0), labels))
        assert math.isnan(ad.auc_pr(np.arange(3.0), labels))
        assert all(math.isnan(x) for x in ad.best_f1(np.arange(3.0), labels))
    with pytest.raises(ValueError, match="NaN"):
        ad.auc_roc(np.array([0.0, math.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="one each"):
        ad.auc_pr(np.zeros(3), np.zeros(2, dtype=bool))


def test_evaluate_measures_only_the_lines_asked_for():
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 0], dtype=bool)
    scores = np.array([0.0, 0.0, 9.0, 9.0, 5.0, 1.0, 4.0, 2.0])  # first half: backwards
    half = ad.second_half(labels)
    assert half == slice(4, 8)
    result = ad.evaluate(scores, labels, half)
    assert result == {"auc_roc": 1.0, "auc_pr": 1.0, "best_f1": 1.0, "positives": 2,
                      "lines": 4}
    assert ad.evaluate(scores, labels)["auc_roc"] < 0.5
    assert ad.second_half(np.zeros(5)) == slice(2, 5)  # the middle line: second half


# ---- lines ------------------------------------------------------------------------------
def test_lines_and_offsets_count_a_line_by_its_newline():
    data = b"a\n\nbc\r\nunfinished"
    assert ad.lines(data) == [b"a\n", b"\n", b"bc\r\n"]
    offsets = ad.line_offsets(data)
    assert offsets.tolist() == [0, 2, 3, 7]
    assert [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])] == ad.lines(data)
    assert ad.lines(b"") == [] and ad.line_offsets(b"").tolist() == [0]


def test_a_labelled_log_has_one_label_per_line_and_cannot_be_changed():
    labels = [False, True]
    log = ad.LabelledLog("x", b"one\ntwo\n", labels)
    assert log.lines == [b"one\n", b"two\n"] and log.labels.dtype == bool
    with pytest.raises(ValueError):
        log.labels[0] = True  # read-only
    with pytest.raises(ValueError, match="labels for 2 lines"):
        ad.LabelledLog("x", b"one\ntwo\n", [True])
    with pytest.raises(ValueError, match="end with a newline"):
        ad.LabelledLog("x", b"one\ntwo", [True])


# ---- the loghub samples -----------------------------------------------------------------
@pytest.fixture(scope="module")
def folder():
    try:
        return ad.loghub_folder()
    except FileNotFoundError as e:
        pytest.skip(f"no loghub samples: {e}")


@pytest.fixture(scope="module")
def injected(folder):
    return ad.injected_logs(folder, seed=0)


@pytest.fixture(scope="module")
def base_lines(folder):
    return {name: ad.read_log_lines(folder / f"{name}_2k.log") for name in ad.BASE_LOGS}


def test_the_folder_comes_from_the_environment_first(monkeypatch, tmp_path):
    monkeypatch.setenv(ad.LOGHUB_ENV, str(tmp_path))
    assert ad.loghub_folder() == tmp_path
    monkeypatch.setenv(ad.LOGHUB_ENV, str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match=ad.LOGHUB_ENV):
        ad.loghub_folder()


def test_bgl_is_labelled_by_its_first_column_and_loses_it(folder):
    raw = (folder / ad.BGL_FILE).read_bytes()
    log = ad.bgl(folder)
    assert len(log.labels) in (1999, 2000)
    # The README says 142 of 1,999: wc -l's count, which misses the last line (it has no
    # newline). Counted here from the file, not from bgl(): 143 alert lines in 2,000.
    alerts = sum(1 for line in raw.split(b"\n") if line and not line.startswith(b"- "))
    assert int(log.labels.sum()) == alerts == 143
    assert b"\r" not in log.data and log.data.endswith(b"\n")
    label_column = re.compile(rb"^(-|[A-Z]+) \d{10} ")
    assert not any(label_column.match(line) or line.startswith(b"- ")
                   for line in log.lines)
    assert all(re.match(rb"^\d{10} \d{4}\.\d\d\.\d\d ", line) for line in log.lines)
    # the label is where the column said: line 9 (0-based 8) is the first APPREAD
    first = raw.split(b"\n")[8]
    assert first.startswith(b"APPREAD ") and log.labels[8] and not log.labels[:8].any()
    assert log.lines[8] == first.removeprefix(b"APPREAD ").removesuffix(b"\r") + b"\n"


def test_injected_anomalies_are_where_the_labels_say_and_only_there(injected, base_lines):
    assert [log.name for log in injected] == [f"{n}+injected" for n in ad.BASE_LOGS]
    for name, log in zip(ad.BASE_LOGS, injected):
        base = base_lines[name]
        count = ad.injected_count(len(base))
        assert count == max(5, round(0.01 * (len(base) - len(base) // 2)))
        got = [line[:-1] for line in log.lines]
        assert len(got) == len(base) + count
        anomalous = np.flatnonzero(log.labels)
        assert anomalous.min() >= ad.second_half(log.labels).start  # second half only
        assert not log.labels[:len(log.labels) // 2].any()

        own = set(base)
        others = {line for other in ad.BASE_LOGS if other != name
                  for line in base_lines[other]}
        foreign = [i for i in anomalous if got[i] in others and got[i] not in own]
        assert len(foreign) == count
        kept = [line for i, line in enumerate(got) if i not in set(foreign)]
        kept_labels = np.delete(log.labels, foreign)
        assert len(kept) == len(base)  # without the foreign lines: the base, in order
        garbled = 0
        for line, was, label in zip(kept, base, kept_labels):
            if not label:
                assert line == was
                continue
            garbled += 1
            assert len(line) == len(was) and line != was
            changed = [j for j, (a, b) in enumerate(zip(line, was)) if a != b]
            assert changed[-1] - changed[0] < ad.GARBLE_MAX  # within one span
            span = line[changed[0]:changed[-1] + 1]
            assert all(0x20 <= b < 0x7F for b in span)  # printable, no newline
        assert garbled == count


def test_injection_is_deterministic_for_a_seed(folder, injected):
    again = ad.injected_logs(folder, seed=0)
    other = ad.injected_logs(folder, seed=1)
    for a, b, c in zip(injected, again, other):
        assert a.data == b.data and np.array_equal(a.labels, b.labels)
        assert a.data != c.data and len(a.labels) == len(c.labels)


def test_a_garbled_span_fits_lines_of_any_length_allowed():
    rng = np.random.default_rng(0)
    for _ in range(200):
        line = b"x" * int(rng.integers(ad.GARBLE_MAX, 40))
        out = ad._garbled(line, rng)
        changed = [j for j, (a, b) in enumerate(zip(out, line)) if a != b]
        assert len(out) == len(line) and changed
        assert changed[-1] - changed[0] < ad.GARBLE_MAX


# ---- baselines --------------------------------------------------------------------------
def test_the_baselines_find_a_foreign_line_among_its_neighbours(base_lines):
    linux, openstack = base_lines["Linux"], base_lines["OpenStack"]
    at = 300
    stream = [*linux[:at], openstack[0], *linux[at:at + 8]]
    data = b"".join(line + b"\n" for line in stream)
    for score in (ad.zlib_line_bits, ad.order3_line_bits):
        scores = score(data)
        assert len(scores) == data.count(b"\n")
        neighbours = np.r_[scores[at - 4:at], scores[at + 1:at + 5]]
        assert scores[at] > neighbours.max(), score.__name__


def test_a_lines_score_depends_only_on_the_bytes_up_to_its_end(base_lines):
    data = b"".join(line + b"\n" for line in base_lines["HPC"][:150])
    changed = data + b"anything after\n"
    for score in (ad.zlib_line_bits, ad.order3_line_bits):
        assert np.array_equal(score(changed)[:150], score(data)), score.__name__
        assert len(score(data + b"unfinished")) == 150  # no newline: not a line


def test_the_baselines_on_bgl_and_an_injected_log(folder, injected, capsys):
    """A measured fact, printed: the issue measured AUC-ROC about 0.51 (zlib) and 0.69
    (order 3) on BGL's second half; asserted only to be in that neighbourhood."""
    log = ad.bgl(folder)
    result = ad.baselines(log, ad.second_half(log.labels))
    with capsys.disabled():
        for name, row in result.items():
            print(f"\nBGL second half, {name}: " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in row.items()))
    assert result["zlib"]["positives"] == 47 and result["zlib"]["lines"] == 1000
    assert 0.41 <= result["zlib"]["auc_roc"] <= 0.61
    assert 0.59 <= result["order3"]["auc_roc"] <= 0.79
    # injected anomalies are easy for both: far above chance
    apache = injected[ad.BASE_LOGS.index("Apache")]
    for name, row in ad.baselines(apache, ad.second_half(apache.labels)).items():
        assert row["auc_roc"] > 0.9 and row["positives"] == 20, name

"""Scores from the pass that trains (engine.target_scores, Learner.scorer) and the line
records built from them (core/lines.py), against the unrolled float64 reference and
against lines cut by hand. The feed on real sockets: test_watch.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import streamrnn
from streamrnn.core.learner import Scored
from streamrnn.core.lines import LineTracker
from test_engine_reference import VOCAB, make_pair, random_tokens


class Collect:
    """A scorer that watches the streams it is given (all: None) and keeps what comes."""

    def __init__(self, streams=None):
        self.streams = streams
        self.updates: list[Scored] = []
        self.active = True

    def watched(self, ids):
        return np.array([self.streams is None or s in self.streams for s in ids], bool)

    def scored(self, scored: Scored):
        self.updates.append(scored)

    def by_target(self) -> dict:
        out = {}
        for u in self.updates:
            ends = np.cumsum(u.counts)
            for i, stream in enumerate(u.streams):
                for j in range(int(ends[i] - u.counts[i]), int(ends[i])):
                    offset = int(u.first_offset[i]) + j - int(ends[i] - u.counts[i])
                    assert (stream, offset) not in out, "a target scored twice"
                    out[(stream, offset)] = (float(u.bits[j]), int(u.expected[j]),
                                             float(u.p_expected[j]), int(u.tokens[j]),
                                             int(u.previous[j]))
        return out


@pytest.mark.parametrize("kind,layers,k1,k2", [("lstm", 2, 3, 7), ("gru", 1, 4, 4)])
def test_each_targets_score_equals_the_unrolled_reference(kind, layers, k1, k2):
    learner, reference = make_pair(kind, layers, k1, k2, "adam")
    scorer = learner.scorer = Collect(streams={"a", "c"})  # b trains unwatched beside
    rng = np.random.default_rng(3)
    chunks = [{"a": random_tokens(rng, 17)},
              {"a": random_tokens(rng, 6), "b": random_tokens(rng, 11)},
              {"b": random_tokens(rng, 9), "c": random_tokens(rng, 4),
               "a": random_tokens(rng, 2)}]
    tokens: dict[str, list[int]] = {}
    for chunk in chunks:
        learner.learn_many({s: np.array(t) for s, t in chunk.items()})
        reference.feed(chunk)
        for s, t in chunk.items():
            tokens.setdefault(s, []).extend(t)
    learner.flush()
    reference.flush()
    got = scorer.by_target()
    want = {key: v for key, v in reference.target_scores.items() if key[0] in ("a", "c")}
    assert sorted(got) == sorted(want)  # every watched target once, no unwatched one
    for (stream, offset), (bits, expected, p, token, previous) in got.items():
        ref_bits, ref_expected, ref_p = want[(stream, offset)]
        assert bits == pytest.approx(ref_bits, rel=1e-5, abs=1e-6)
        assert expected == ref_expected and p == pytest.approx(ref_p, rel=1e-5)
        assert token == tokens[stream][offset] and previous == tokens[stream][offset - 1]


def test_watching_a_stream_changes_no_weight_and_no_total():
    """Scores come from the loss's logits but apart from the loss: a watched stream
    trains bit for bit as an unwatched one (so a replay, watched or not, is exact)."""
    config = streamrnn.load_config(overrides=[
        "model.hidden_size=32", "model.embed_dim=8", "model.num_layers=2",
        "train.k1=4", "train.k2=8", "train.device=cpu"])
    rng = np.random.default_rng(4)
    data = {s: rng.integers(0, 256, 300) for s in ("x", "y", "z")}
    plain, watched = streamrnn.Learner(config), streamrnn.Learner(config)
    watched.scorer = Collect()
    for learner in (plain, watched):
        for start in range(0, 300, 37):
            learner.learn_many({s: t[start:start + 37] for s, t in data.items()})
        learner.flush()
    for (name, p), q in zip(plain.model.named_parameters(), watched.model.parameters()):
        assert torch.equal(p, q), name
    assert plain.bits == watched.bits and plain.tokens_trained == watched.tokens_trained
    scores = watched.scorer.by_target()
    assert len(scores) == 3 * 299
    assert sum(v[0] for v in scores.values()) == pytest.approx(watched.bits, rel=1e-5)


def test_nothing_is_scored_while_nobody_watches():
    learner, _ = make_pair("lstm", 1, 3, 7, "sgd")
    scorer = learner.scorer = Collect()
    scorer.active = False
    learner.learn("a", np.arange(40) % VOCAB)
    assert scorer.updates == []


# ---- lines ---------------------------------------------------------------------------
def lines_by_hand(data: bytes, bits: dict[int, float]) -> list[dict]:
    """Each line of `data` with the bits of its scored tokens (offset 0 has none)."""
    out, start = [], 0
    for number, line in enumerate(data.split(b"\n")[:-1]):
        offsets = [o for o in range(start, start + len(line) + 1) if o in bits]
        out.append({"line": number, "offset": offsets[0] if offsets else None,
                    "tokens": len(offsets), "bits": sum(bits[o] for o in offsets),
                    "text": bytes(data[o] for o in offsets)})
        start += len(line) + 1
    return out


def byte_learner(k1=4, k2=8):
    config = streamrnn.load_config(overrides=[
        "model.hidden_size=32", "model.embed_dim=8", "model.num_layers=1",
        f"train.k1={k1}", f"train.k2={k2}", "train.device=cpu", "train.precision=fp64"])
    return streamrnn.Learner(config)


def run_lines(learner, chunks: dict[str, list[bytes]], watched=None, warmup=0):
    """Feed the chunks round by round (every stream's i-th chunk together), collect the
    scores, and build line records from them as the score feed does."""
    scorer = learner.scorer = Collect(watched)
    tracker = LineTracker(10, recent_lines=50, warmup_lines=warmup, vocab_size=256)
    records, done = [], 0
    for i in range(max(len(c) for c in chunks.values())):
        learner.learn_many({s: np.frombuffer(c[i], np.uint8) for s, c in chunks.items()
                            if i < len(c)})
        for u in scorer.updates[done:]:  # as the feed gets them: update by update
            records += [r for _, r in tracker.lines(u, np.ones(len(u.streams), bool))]
        done = len(scorer.updates)
    return records, scorer


@pytest.mark.parametrize("k1,k2", [(4, 8), (16, 16), (1, 3)])
def test_lines_equal_lines_cut_by_hand(k1, k2):
    rng = np.random.default_rng(k1)
    texts = {"web": b"GET /index.html 200\nGET /a 404\n\nPOST /login 302\n" * 6,
             "db": b"\nstarts with an empty line\n" + bytes(rng.integers(32, 127, 70)) +
             b"\nx\n" * 5}
    chunks = {s: [t[i:i + 13] for i in range(0, len(t), 13)] for s, t in texts.items()}
    records, scorer = run_lines(byte_learner(k1, k2), chunks)
    all_bits: dict[str, dict[int, float]] = {s: {} for s in texts}
    for (stream, offset), v in scorer.by_target().items():  # what the lines came from
        all_bits[stream][offset] = v[0]
    for stream, text in texts.items():
        got = [r for r in records if r["stream"] == stream]
        # lines whose last token was trained (k1 windows: the tail may wait for a flush)
        trained = max(all_bits[stream])
        want = [w for w in lines_by_hand(text, all_bits[stream])
                if w["offset"] is not None and w["offset"] + w["tokens"] - 1 <= trained
                and text[w["offset"] + w["tokens"] - 1] == 10]
        assert [r["line"] for r in got] == [w["line"] for w in want]
        for r, w in zip(got, want):
            assert (r["offset"], r["tokens"], r["text"]) == (w["offset"], w["tokens"],
                                                             w["text"])
            assert r["bits"] == pytest.approx(w["bits"], rel=1e-9)
            assert r["bits_per_token"] == pytest.approx(w["bits"] / w["tokens"], rel=1e-9)
            assert r["complete"]
            assert len(r["token_bits"]) == 4 * r["tokens"]
            line_bits = [all_bits[stream][r["offset"] + j] for j in range(r["tokens"])]
            assert r["worst"]["offset"] == r["offset"] + int(np.argmax(line_bits))
            assert r["peak_bits"] == pytest.approx(np.mean(sorted(line_bits)[-8:]), rel=1e-6)


def test_a_line_seen_from_its_middle_says_so_and_the_next_is_whole():
    learner = byte_learner(4, 8)
    text = b"first line is long enough\nsecond\nthird line\n"
    # watch from the second chunk on: the first line's start was trained unwatched
    scorer = learner.scorer = Collect(streams=set())
    learner.learn("s", np.frombuffer(text[:10], np.uint8))
    scorer.streams = {"s"}
    learner.learn("s", np.frombuffer(text[10:], np.uint8))
    learner.flush()
    tracker = LineTracker(10, recent_lines=50, warmup_lines=0, vocab_size=256)
    records = [r for u in scorer.updates for _, r in tracker.lines(u, np.ones(1, bool))]
    assert [(r["line"], r["complete"]) for r in records] == [(0, False), (1, True),
                                                            (2, True)]
    assert records[0]["offset"] > 1 and text[records[0]["offset"]:].startswith(
        records[0]["text"])
    assert records[1]["text"] == b"second\n" and records[2]["text"] == b"third line\n"


def test_the_score_ranks_a_line_among_recent_ones_after_the_warm_up():
    learner = byte_learner(8, 8)
    normal = b"user alice logged in from 10.0.0.1\n"
    text = normal * 60 + b"kernel panic: ### !!! \x7f~~ zz\n" + normal * 3
    chunks = {"auth": [text[i:i + 64] for i in range(0, len(text), 64)]}
    records, _ = run_lines(learner, chunks, warmup=20)
    assert all(r["score"] == 0.0 for r in records[:20])  # warm-up: nothing flagged
    odd = next(r for r in records if r["text"].startswith(b"kernel"))
    assert odd["score"] > 0.95
    assert odd["score"] == max(r["score"] for r in records)
    assert 0 <= min(r["score"] for r in records[20:])


def test_recent_ranks_among_the_last_lines_as_a_sort_would():
    from streamrnn.core.lines import Recent
    rng = np.random.default_rng(5)
    values = rng.integers(0, 20, 300).astype(np.float32)  # ties on purpose
    recent, seen = Recent(50), []
    for value in values:
        held = np.array(seen[-50:], np.float32)
        want = ((held < value).sum() + 0.5 * (held == value).sum()) / len(held) \
            if len(held) else 0.0
        assert recent.rank(float(value)) == pytest.approx(want)
        seen.append(value)
    assert len(recent.values) == 50  # grown to its size, no further


def test_the_feed_forgets_streams_the_learner_forgot():
    import zmq
    from streamrnn.core.lines import Recent
    from streamrnn.serve.metrics import Metrics
    from streamrnn.serve.scores import ScoreFeed
    config = streamrnn.load_config(overrides=["scores.endpoint=tcp://127.0.0.1:*"])
    context = zmq.Context()
    feed = ScoreFeed(config, config.scores.endpoint, context, Metrics())
    try:
        for stream in ("gone", "kept"):
            feed.watching[stream] = (True, False)
            feed.tracker.recent[stream] = Recent(10)
        feed.prune({"kept": 0})
        assert list(feed.watching) == ["kept"] and list(feed.tracker.recent) == ["kept"]
    finally:
        feed.close()
        context.term()

"""The engine's TBPTT(k1, k2) equals an explicitly unrolled float64 reference.

Random tokens, one stream and several at different offsets, LSTM and GRU, one and two
layers, k1 = k2 and k1 < k2 with k2 not a multiple of k1, SGD and Adam, clipping on and
off, flushes in the middle. After every call the parameters and the prequential bits
must agree to float64 rounding.
"""
from __future__ import annotations

import numpy as np
import pytest

import streamrnn
from reference import ReferenceTBPTT

VOCAB, EMBED, HIDDEN = 11, 5, 6
TOLERANCE = 1e-13  # measured: at most 9e-16 after 17-69 updates; a real bug is >1e-6


# what the reference does unless a test says otherwise, whatever the defaults are
CONSTANT_LR_TORCH_ADAM = ("train.warmup_updates=0", "train.lr_decay_updates=0",
                          "train.lr_floor=0", "train.adam_beta1=0.9",
                          "train.adam_beta2=0.999", "train.adam_eps=1e-8")


def make_pair(kind="lstm", layers=1, k1=3, k2=7, optimizer="sgd", clip=0.0, lr=None,
              max_batch_streams=64, skip=False, settings=(), **reference_options):
    lr = lr if lr is not None else (0.5 if optimizer == "sgd" else 0.02)
    config = streamrnn.load_config(overrides=[*CONSTANT_LR_TORCH_ADAM, *settings,
                                              f"model.skip={str(skip).lower()}",
        f"model.kind={kind}", f"model.vocab_size={VOCAB}", f"model.embed_dim={EMBED}",
        f"model.hidden_size={HIDDEN}", f"model.num_layers={layers}",
        f"train.k1={k1}", f"train.k2={k2}", f"train.optimizer={optimizer}",
        f"train.lr={lr}", f"train.grad_clip={clip}", "train.precision=fp64",
        "train.device=cpu", f"train.max_batch_streams={max_batch_streams}",
        f"train.seed={k1 * 100 + k2}"])
    learner = streamrnn.Learner(config)
    reference = ReferenceTBPTT(dict(learner.model.named_parameters()), kind, layers,
                               HIDDEN, k1, k2, optimizer, lr, clip, skip=skip,
                               **reference_options)
    return learner, reference


def assert_same(learner, reference, tolerance=TOLERANCE):
    for name, p in learner.model.named_parameters():
        want = reference.params[name].detach()
        diff = (p.detach() - want).abs().max().item()
        assert diff <= tolerance * max(1.0, want.abs().max().item()), (name, diff)


def random_tokens(rng, n):
    return rng.integers(0, VOCAB, n).tolist()


def feed_both(learner, reference, chunk):
    steps_before = len(reference.step_bits)
    result = learner.learn_many({sid: np.array(t) for sid, t in chunk.items()})
    reference.feed(chunk)
    new_bits = reference.step_bits[steps_before:]
    assert result.updates == len(new_bits)
    assert result.bits == pytest.approx(sum(new_bits), rel=1e-12, abs=1e-12)
    return result


CASES = [  # kind, layers, k1, k2, optimizer, clip
    ("lstm", 1, 4, 4, "sgd", 0.0),
    ("lstm", 1, 3, 7, "sgd", 0.0),
    ("lstm", 2, 3, 7, "adam", 0.0),
    ("lstm", 2, 2, 5, "sgd", 0.5),
    ("gru", 1, 4, 4, "adam", 0.0),
    ("gru", 1, 3, 7, "sgd", 0.0),
    ("gru", 2, 2, 5, "adam", 0.5),
    ("lstm", 1, 1, 6, "adam", 0.0),
]


@pytest.mark.parametrize("kind,layers,k1,k2,optimizer,clip", CASES)
def test_one_stream_matches_reference(kind, layers, k1, k2, optimizer, clip):
    learner, reference = make_pair(kind, layers, k1, k2, optimizer, clip)
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 13, 3, 9, 57):  # cut windows anywhere; 57 overflows the ring
        feed_both(learner, reference, {"s": random_tokens(rng, n)})
        assert_same(learner, reference)


@pytest.mark.parametrize("kind,layers,k1,k2,optimizer,clip", CASES)
def test_streams_at_different_offsets_match_reference(kind, layers, k1, k2, optimizer, clip):
    learner, reference = make_pair(kind, layers, k1, k2, optimizer, clip)
    rng = np.random.default_rng(2)
    # "a" is old when "b" starts, "c" is young throughout: mixed window lengths in a batch
    feed_both(learner, reference, {"a": random_tokens(rng, 17)})
    feed_both(learner, reference, {"a": random_tokens(rng, 6), "b": random_tokens(rng, 11)})
    feed_both(learner, reference, {"b": random_tokens(rng, 9), "c": random_tokens(rng, 4),
                                   "a": random_tokens(rng, 2)})
    assert_same(learner, reference)
    # a flush in the middle, then the streams continue
    learner.flush()
    reference.flush()
    assert learner.tokens_trained == sum(len(t) - 1 for t in reference.tokens.values())
    assert_same(learner, reference)
    feed_both(learner, reference, {"c": random_tokens(rng, 12), "a": random_tokens(rng, 8),
                                   "d": random_tokens(rng, 7)})
    learner.flush()
    reference.flush()
    assert_same(learner, reference)
    assert learner.tokens_trained == sum(len(t) - 1 for t in reference.tokens.values())


def inverse_sqrt_schedule(lr, warmup, decay, floor):
    """The README's schedule, written out again: linear warm-up over `warmup` updates,
    times 1 / sqrt(1 + u / decay) but never below the fraction `floor`."""
    def lr_at(u):
        ramp = min(1.0, (u + 1) / warmup) if warmup else 1.0
        fall = (1.0 + u / decay) ** -0.5 if decay else 1.0
        return lr * ramp * max(floor, fall)
    return lr_at


@pytest.mark.parametrize("optimizer,beta1,beta2,eps,warmup,decay,floor", [
    ("adam", 0.0, 0.9999, 1e-6, 0, 0.0, 0.0),     # the online compressors' Adam
    ("adam", 0.025, 0.99, 1e-5, 4, 3.0, 0.0),     # warm-up, then the decay
    ("adam", 0.0, 0.9999, 1e-6, 0, 2.0, 0.5),     # the decay reaches its floor
    ("sgd", 0.9, 0.999, 1e-8, 3, 5.0, 0.6),       # the schedule drives SGD too
])
def test_adam_settings_and_lr_schedule_match_reference(optimizer, beta1, beta2, eps,
                                                       warmup, decay, floor):
    lr = 0.5 if optimizer == "sgd" else 0.02
    settings = (f"train.adam_beta1={beta1}", f"train.adam_beta2={beta2}",
                f"train.adam_eps={eps}", f"train.warmup_updates={warmup}",
                f"train.lr_decay_updates={decay}", f"train.lr_floor={floor}")
    learner, reference = make_pair("lstm", 2, 3, 7, optimizer, 0.5, lr, settings=settings,
                                   betas=(beta1, beta2), eps=eps,
                                   lr_at=inverse_sqrt_schedule(lr, warmup, decay, floor))
    rng = np.random.default_rng(6)
    for n in (9, 4, 13, 30):
        feed_both(learner, reference, {"a": random_tokens(rng, n),
                                       "b": random_tokens(rng, n + 2)})
        assert_same(learner, reference)
    assert reference.num_updates >= 12  # past the warm-up, the decay down to the floors
    learner.flush()
    reference.flush()
    assert_same(learner, reference)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(
        reference.lr_at(reference.num_updates - 1), rel=1e-15)


@pytest.mark.parametrize("kind,layers,k1,k2,optimizer", [
    ("lstm", 1, 3, 7, "adam"), ("lstm", 2, 2, 5, "sgd"), ("gru", 2, 3, 3, "adam"),
    ("lstm", 3, 4, 9, "adam")])
def test_skip_connections_match_reference(kind, layers, k1, k2, optimizer):
    learner, reference = make_pair(kind, layers, k1, k2, optimizer, 0.5, skip=True)
    assert any(name.startswith("layers.") for name in reference.params)
    rng = np.random.default_rng(7)
    feed_both(learner, reference, {"a": random_tokens(rng, 15)})  # mixed window lengths
    feed_both(learner, reference, {"a": random_tokens(rng, 5), "b": random_tokens(rng, 12),
                                   "c": random_tokens(rng, 3)})
    assert_same(learner, reference)
    learner.flush()
    reference.flush()
    feed_both(learner, reference, {"b": random_tokens(rng, 21), "c": random_tokens(rng, 9)})
    assert_same(learner, reference)
    assert reference.num_updates >= 8


def test_batches_respect_max_batch_streams():
    """With more ready streams than fit in one update, the schedule differs from the
    all-at-once reference, but every target is still trained exactly once."""
    learner, _ = make_pair(max_batch_streams=2)
    rng = np.random.default_rng(3)
    chunk = {f"s{i}": random_tokens(rng, 20 + i) for i in range(5)}
    result = learner.learn_many(chunk)
    assert result.streams == 5
    learner.flush()
    assert learner.tokens_trained == sum(len(t) - 1 for t in chunk.values())


def test_sensitivity():
    """The comparison can fail: an engine with k2 one shorter, or one that drops the
    carried state, disagrees with the reference far beyond the tolerance."""
    rng = np.random.default_rng(4)
    chunks = [{"s": random_tokens(rng, 30)}]
    learner, reference = make_pair(k1=3, k2=7)
    wrong, _ = make_pair(k1=3, k2=6)
    wrong.model.load_state_dict(learner.model.state_dict())
    for chunk in chunks:
        feed_both(learner, reference, chunk)
        wrong.learn_many(chunk)
    assert_same(learner, reference)
    with pytest.raises(AssertionError):
        assert_same(wrong, reference, tolerance=1e-6)


def test_float32_is_close_to_reference():
    """The default precision follows the same computation, to float32 accuracy."""
    config = streamrnn.load_config(overrides=[
        f"model.vocab_size={VOCAB}", f"model.embed_dim={EMBED}", f"model.hidden_size={HIDDEN}",
        "model.num_layers=1", "model.skip=false", "train.k1=3", "train.k2=7",
        "train.optimizer=sgd", "train.lr=0.5", "train.lr_decay_updates=0",
        "train.device=cpu"])
    learner = streamrnn.Learner(config)
    reference = ReferenceTBPTT(dict(learner.model.named_parameters()), "lstm", 1, HIDDEN,
                               3, 7, "sgd", 0.5, 0.0)
    rng = np.random.default_rng(5)
    chunk = {"a": random_tokens(rng, 40), "b": random_tokens(rng, 25)}
    learner.learn_many(chunk)
    reference.feed(chunk)
    assert_same(learner, reference, tolerance=1e-5)

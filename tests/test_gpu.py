"""The engine on CUDA: the same TBPTT as the float64 reference, within the precision.

Run on a GPU machine with `./scripts/test -m gpu` (or scripts/device-check)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import streamrnn
from reference import ReferenceTBPTT
from test_engine_reference import (CONSTANT_LR_TORCH_ADAM, EMBED, HIDDEN, VOCAB,
                                   random_tokens)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch)")]


@pytest.fixture(autouse=True)
def _no_tf32():
    """Comparisons with the float64 reference want float32 arithmetic: cuDNN may
    otherwise use TF32 (10-bit mantissa) for its float32 RNN kernels."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cuda_pair(precision, kind="lstm", layers=2, k1=3, k2=7, optimizer="adam", skip=False):
    config = streamrnn.load_config(overrides=[*CONSTANT_LR_TORCH_ADAM,
                                              f"model.skip={str(skip).lower()}",
        f"model.kind={kind}", f"model.vocab_size={VOCAB}", f"model.embed_dim={EMBED}",
        f"model.hidden_size={HIDDEN}", f"model.num_layers={layers}", f"train.k1={k1}",
        f"train.k2={k2}", f"train.optimizer={optimizer}", "train.lr=0.02",
        "train.grad_clip=0.5", f"train.precision={precision}", "train.device=cuda"])
    learner = streamrnn.Learner(config)
    params = {n: p.detach().cpu() for n, p in learner.model.named_parameters()}
    return learner, ReferenceTBPTT(params, kind, layers, HIDDEN, k1, k2, optimizer, 0.02, 0.5,
                                   skip=skip)


def feed(learner, reference, seed=0):
    rng = np.random.default_rng(seed)
    chunks = [{"a": random_tokens(rng, 30)},
              {"a": random_tokens(rng, 9), "b": random_tokens(rng, 23), "c": random_tokens(rng, 5)}]
    for chunk in chunks:
        learner.learn_many(chunk)
        reference.feed(chunk)
    learner.flush()
    reference.flush()


def max_error(learner, reference):
    return max((p.detach().cpu().double() - reference.params[n].detach()).abs().max().item()
               for n, p in learner.model.named_parameters())


@pytest.mark.parametrize("kind,skip", [("lstm", False), ("gru", False), ("lstm", True)])
def test_cuda_fp64_matches_reference(kind, skip):
    learner, reference = cuda_pair("fp64", kind, skip=skip)
    feed(learner, reference)
    assert max_error(learner, reference) < 1e-12


@pytest.mark.parametrize("kind,skip", [("lstm", False), ("gru", False), ("lstm", True)])
def test_cuda_fp32_cudnn_matches_reference(kind, skip):
    learner, reference = cuda_pair("fp32", kind, skip=skip)
    feed(learner, reference)
    assert max_error(learner, reference) < 2e-4  # cuDNN float32, Adam amplifies rounding


def test_cuda_bf16_learns():
    learner, _ = cuda_pair("bf16")
    result = learner.learn("s", np.arange(400) % VOCAB)
    assert result.targets == 399 // 3 * 3 and np.isfinite(result.bits)


def test_cuda_bf16_update_follows_fp32():
    """One SGD step over 256 streams: the loss is a mean over 8,192 targets, so the
    gradients reaching the recurrence are tiny; in float16 (what cuDNN uses under
    autocast) they would underflow. bf16 must move the weights as fp32 does."""
    rng = np.random.default_rng(3)
    chunk = {i: rng.integers(0, 256, 33) for i in range(256)}
    deltas = {}
    for precision in ("fp32", "bf16"):
        learner = streamrnn.Learner(streamrnn.load_config(overrides=[
            "train.k1=32", "train.k2=32", "train.optimizer=sgd", "train.lr=1.0",
            "train.grad_clip=0", f"train.precision={precision}", "train.device=cuda"]))
        before = torch.cat([p.detach().flatten().clone() for p in learner.model.rnn.parameters()])
        assert learner.learn_many(chunk).updates == 1
        after = torch.cat([p.detach().flatten() for p in learner.model.rnn.parameters()])
        deltas[precision] = (after - before).double()
    cosine = torch.nn.functional.cosine_similarity(deltas["fp32"], deltas["bf16"], dim=0)
    ratio = deltas["bf16"].norm() / deltas["fp32"].norm()
    assert cosine > 0.99 and 0.95 < ratio < 1.05, (cosine, ratio)


def test_cuda_state_resumes_on_cpu():
    learner, _ = cuda_pair("fp32")
    learner.learn("s", np.arange(100) % VOCAB)
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True, map_location="cpu")
    cpu = streamrnn.Learner(streamrnn.load_config(overrides=[
        f"model.vocab_size={VOCAB}", f"model.embed_dim={EMBED}", f"model.hidden_size={HIDDEN}",
        "model.num_layers=2", "train.k1=3", "train.k2=7", "train.device=cpu"]))
    cpu.load_state_dict(state)
    assert cpu.streams.next_offset("s") == 100
    assert torch.allclose(cpu.predict("s"), learner.predict("s"), atol=1e-4)


def _train_on_cuda() -> int:
    learner = streamrnn.Learner(streamrnn.load_config(overrides=[
        f"model.vocab_size={VOCAB}", f"model.hidden_size={HIDDEN}", "train.device=cuda"]))
    return learner.learn("s", np.arange(200) % VOCAB).updates


def test_a_process_forked_from_the_forkserver_trains_on_cuda():
    """`serve --nproc` forks its ranks from a forkserver that imported torch and the
    engine (serve/launch.py), not from fresh interpreters: CUDA must initialise in
    such a child. (The forkserver is a fresh process: whatever this one did with CUDA
    does not reach it.)"""
    import multiprocessing
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "streamrnn.core.learner"])
    with context.Pool(1) as pool:
        assert pool.apply(_train_on_cuda) > 0

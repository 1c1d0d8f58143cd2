"""The fused optimizer against torch.optim's own: the same weights and state, bit for bit,
through skipped steps, parameters without a gradient and a changing rate; the same
state_dict layout both ways; foreign states refused; and no torch._dynamo import."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import streamrnn
from streamrnn.core.optim import FusedOptimizer, make_optimizer

SMALL = ["model.vocab_size=13", "model.embed_dim=6", "model.hidden_size=10",
         "model.num_layers=2", "train.device=cpu"]


def two_models(optimizer: str, dtype=torch.float32):
    config = streamrnn.load_config(overrides=[*SMALL, f"train.optimizer={optimizer}",
                                              "train.adam_beta1=0.8", "train.adam_eps=1e-6"])
    ours = streamrnn.Learner(config).model.to(dtype)
    theirs = streamrnn.Learner(config).model.to(dtype)
    theirs.load_state_dict(ours.state_dict())
    return config, ours, theirs


def torch_optimizer(model, config):
    train = config.train
    if train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=train.lr, fused=True,
                                betas=(train.adam_beta1, train.adam_beta2),
                                eps=train.adam_eps)
    return torch.optim.SGD(model.parameters(), lr=train.lr, fused=True)


def run_steps(pairs, steps, seed):
    """Give both optimizers the same gradients and rates; some steps skipped
    (found_inf 1), some parameters without a gradient in some steps."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        found_inf = torch.tensor(1.0 if step % 5 == 3 else 0.0)
        lr = 0.01 * (1 + step % 3)
        grads = {}
        for (model, optimizer) in pairs:
            for index, p in enumerate(model.parameters()):
                if (index + step) % 4 == 0 and step > 0:
                    p.grad = None  # left out of this step, as an unused parameter is
                    continue
                if index not in grads:
                    grads[index] = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                p.grad = grads[index].clone()
            for group in optimizer.param_groups:
                group["lr"] = lr
            if isinstance(optimizer, FusedOptimizer):
                optimizer.step(found_inf=found_inf)
            else:
                optimizer.found_inf = found_inf
                optimizer.step()


def assert_same(ours, theirs, our_optimizer, their_optimizer):
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    our_state, their_state = our_optimizer.state_dict(), their_optimizer.state_dict()
    assert our_state["param_groups"] == their_state["param_groups"]
    assert our_state["state"].keys() == their_state["state"].keys()
    for index, state in our_state["state"].items():
        assert state.keys() == their_state["state"][index].keys()
        for name, value in state.items():
            other = their_state["state"][index][name]
            assert value.dtype == other.dtype and torch.equal(value, other), (index, name)


@pytest.mark.parametrize("optimizer,dtype", [("adam", torch.float32), ("sgd", torch.float32),
                                             ("adam", torch.float64)])
def test_bit_for_bit_torch_optim_fused(optimizer, dtype):
    config, ours, theirs = two_models(optimizer, dtype)
    our_optimizer, their_optimizer = make_optimizer(ours, config.train), \
        torch_optimizer(theirs, config)
    run_steps([(ours, our_optimizer), (theirs, their_optimizer)], 12, seed=1)
    assert_same(ours, theirs, our_optimizer, their_optimizer)
    if optimizer == "adam":  # each count is the steps that ran with its gradient
        for index, state in our_optimizer.state.items():
            ran = [s for s in range(12) if s % 5 != 3 and not ((index + s) % 4 == 0 and s)]
            assert float(state["step"]) == len(ran)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_state_dicts_load_both_ways(optimizer):
    config, ours, theirs = two_models(optimizer)
    our_optimizer, their_optimizer = make_optimizer(ours, config.train), \
        torch_optimizer(theirs, config)
    run_steps([(ours, our_optimizer), (theirs, their_optimizer)], 6, seed=2)
    # swap: each continues from the other's saved state
    our_next, their_next = make_optimizer(ours, config.train), torch_optimizer(theirs, config)
    our_next.load_state_dict(their_optimizer.state_dict())
    their_next.load_state_dict(our_optimizer.state_dict())
    run_steps([(ours, our_next), (theirs, their_next)], 6, seed=3)
    assert_same(ours, theirs, our_next, their_next)


def test_foreign_states_are_refused_before_anything_changes():
    config, ours, _ = two_models("adam")
    optimizer = make_optimizer(ours, config.train)
    run_steps([(ours, optimizer)], 3, seed=4)
    before = optimizer.state_dict()
    before = {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in before["state"].items()},
              "param_groups": before["param_groups"]}

    fewer = {"state": {}, "param_groups": [{**before["param_groups"][0], "params": [0, 1]}]}
    with pytest.raises(ValueError, match="for 2 parameters in 1 group"):
        optimizer.load_state_dict(fewer)
    sgd_config, sgd_model, _ = two_models("sgd")
    with pytest.raises(ValueError, match="not adam's"):
        optimizer.load_state_dict(make_optimizer(sgd_model, sgd_config.train).state_dict())
    reshaped = {"state": {0: {**before["state"][0],
                              "exp_avg": torch.zeros(3, 3)}},
                "param_groups": before["param_groups"]}
    with pytest.raises(ValueError, match="exp_avg for parameter 0 has shape"):
        optimizer.load_state_dict(reshaped)

    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, state in before["state"].items():
        assert all(torch.equal(v, after["state"][index][k]) for k, v in state.items())


def test_learning_never_imports_dynamo():
    """torch._dynamo costs every daemon start 1.4 s (optim.py says why); a learner that
    trains, saves and loads must not pull it in."""
    script = (
        "import io, sys, torch, streamrnn\n"
        f"config = streamrnn.load_config(overrides={SMALL!r})\n"
        "learner = streamrnn.Learner(config)\n"
        "learner.learn('s', list(range(13)) * 20)\n"
        "buffer = io.BytesIO(); torch.save(learner.state_dict(), buffer); buffer.seek(0)\n"
        "streamrnn.Learner(config).load_state_dict(torch.load(buffer))\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

"""The in-process API: inputs it takes and refuses, prediction, flush, exact resume."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import streamrnn

SMALL = ["model.vocab_size=13", "model.embed_dim=6", "model.hidden_size=10",
         "train.k1=4", "train.k2=10", "train.device=cpu"]


def make(*extra):
    return streamrnn.Learner(streamrnn.load_config(overrides=[*SMALL, *extra]))


def params(learner):
    return [p.detach().clone() for p in learner.model.parameters()]


def test_accepts_lists_arrays_and_tensors_alike():
    tokens = np.random.default_rng(0).integers(0, 13, 40)
    results = []
    forms = (tokens.tolist(), tokens, tokens.astype(np.uint8), torch.from_numpy(tokens),
             bytes(tokens.astype(np.uint8)))
    for form in forms:
        learner = make()
        results.append((learner.learn("s", form), params(learner)))
    first_result, first_params = results[0]
    assert first_result.updates == 9 and first_result.targets == 36
    for result, ps in results[1:]:
        assert result == first_result
        assert all(torch.equal(a, b) for a, b in zip(ps, first_params))


@pytest.mark.parametrize("bad,message", [
    ([[1, 2], [3, 4]], "one-dimensional"),
    ([0.5, 1.0], "integers"),
    ([True, False], "integers"),
    ([1, -1], "token id -1 is outside 0 .. 12"),
    ([1, 13], "token id 13 is outside 0 .. 12"),
])
def test_bad_tokens_are_refused_and_change_nothing(bad, message):
    learner = make()
    before = params(learner)
    with pytest.raises(ValueError, match=message):
        learner.learn_many({"good": list(range(12)) * 3, "bad": bad})
    assert learner.streams.next_offset("good") == 0  # the good stream was not taken either
    assert all(torch.equal(a, b) for a, b in zip(before, params(learner)))


def test_empty_input_is_fine():
    learner = make()
    assert learner.learn("s", []) == streamrnn.LearnResult()
    assert learner.flush() == streamrnn.LearnResult()
    assert learner.flush("never-seen") == streamrnn.LearnResult()


def test_flush_trains_the_rest_and_the_stream_continues():
    learner = make()
    learner.learn("s", list(range(11)))       # 10 targets: two updates of 4, 2 left
    assert learner.tokens_trained == 8
    result = learner.flush("s")
    assert (result.updates, result.targets) == (1, 2)
    assert learner.streams.untrained("s") == 0
    learner.learn("s", list(range(4)))        # continues: 4 more targets, one update
    assert learner.tokens_trained == 14
    assert learner.flush().targets == 0


def test_every_target_once_for_a_huge_call():
    learner = make()
    n = 5000  # far more than the ring holds: the rest waits and moves in as windows slide
    result = learner.learn("s", np.arange(n) % 13)
    assert result.targets == (n - 1) // 4 * 4
    assert learner.flush().targets == (n - 1) % 4
    assert learner.tokens_trained == n - 1


def test_max_batch_streams_bounds_each_update():
    learner = make("train.max_batch_streams=3")
    result = learner.learn_many({f"s{i}": list(range(9)) for i in range(7)})  # 2 windows each
    assert result.targets == 7 * 8
    assert result.updates == 5  # 14 windows, at most 3 per update, oldest windows first
    assert result.streams == 7


def test_predict_young_stream_equals_a_plain_forward():
    learner = make()
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]  # shorter than k2 - k1: window start stays at 0
    learner.learn("s", tokens)
    got = learner.predict("s")
    with torch.no_grad():
        logits, _ = learner.model(torch.tensor(tokens)[:, None], None)
    assert torch.allclose(got, torch.log_softmax(logits[-1, 0], -1), atol=1e-6)
    assert got.shape == (13,) and torch.isclose(got.exp().sum(), torch.tensor(1.0))


def test_predict_unknown_stream_is_uniform():
    got = make().predict("nobody")
    assert torch.allclose(got, torch.full((13,), -np.log(13.0)))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_state_dict_resumes_exactly(kind):
    rng = np.random.default_rng(1)
    first = {f"s{i}": rng.integers(0, 13, 30 + 7 * i) for i in range(3)}
    second = {f"s{i}": rng.integers(0, 13, 25) for i in range(4)}
    original = make(f"model.kind={kind}", "train.optimizer=adam")
    original.learn_many(first)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = make(f"model.kind={kind}", "train.optimizer=adam")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.streams.next_offset("s2") == 44
    results = [learner.learn_many(second) for learner in (original, resumed)]
    results += [learner.flush() for learner in (original, resumed)]
    assert results[0] == results[1] and results[2] == results[3]
    assert all(torch.equal(a, b) for a, b in zip(params(original), params(resumed)))
    assert torch.equal(original.predict("s3"), resumed.predict("s3"))
    assert (original.updates, original.tokens_trained, original.bits) == (
        resumed.updates, resumed.tokens_trained, resumed.bits)


def test_state_from_another_model_is_refused():
    state = make().state_dict()
    with pytest.raises(ValueError, match="model.hidden_size \\(saved 10, now 12\\)"):
        make("model.hidden_size=12").load_state_dict(state)
    with pytest.raises(ValueError, match="not a streamrnn learner state"):
        make().load_state_dict({"format": "something else"})


def test_gpu_device_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for machines without it")
    with pytest.raises(streamrnn.ConfigError, match="train.device = 'cuda' but"):
        streamrnn.Learner(streamrnn.load_config(overrides=["train.device=cuda"]))


def test_bf16_learns_on_cpu():
    learner = make("train.precision=bf16")
    result = learner.learn("s", np.arange(200) % 13)
    assert result.targets == 196 and np.isfinite(result.bits)


def record_dtypes(learner) -> dict[str, set]:
    """The dtypes the recurrent layers ("rnn": nn.LSTM, or each layer with model.skip)
    and the head put out."""
    seen: dict[str, set] = {"rnn": set(), "head": set()}
    model = learner.model
    modules = {"rnn": list(model.layers) if model.config.skip else [model.rnn],
               "head": [model.head]}
    for name, group in modules.items():
        for module in group:
            module.register_forward_hook(lambda module, args, out, name=name: seen[name].add(
                (out[0] if isinstance(out, tuple) else out).dtype))
    return seen


@pytest.mark.parametrize("skip", ["true", "false"])
def test_bf16_keeps_the_recurrence_in_float32(skip):
    """Autocast would run the recurrent layers in low precision (float16 on cuDNN, whose
    small gradients underflow); precision bf16 means the embedding and head only."""
    learner = make("train.precision=bf16", f"model.skip={skip}")
    seen = record_dtypes(learner)
    learner.learn("s", np.arange(60) % 13)
    learner.predict("s")
    assert seen == {"rnn": {torch.float32}, "head": {torch.bfloat16}}


def test_stored_states_are_contiguous_for_every_layer_count():
    """cuDNN refuses a strided initial state; a one-slot slice of a 2-layer pool is one."""
    learner = make("model.num_layers=2")
    learner.learn_many({"a": np.arange(30) % 13, "b": np.arange(20) % 13})
    for row in range(2):
        assert all(t.is_contiguous() for t in learner.streams.states.state(row))


def test_spilling_idle_streams_changes_nothing_but_where_states_live():
    """With room for 2 streams on the device, 5 streams learn exactly as with room for
    all: states of idle streams wait in host memory and come back when needed."""
    rng = np.random.default_rng(7)
    calls = [{f"s{i}": rng.integers(0, 13, int(rng.integers(3, 30)))
              for i in rng.choice(5, size=int(rng.integers(1, 4)), replace=False)}
             for _ in range(25)]
    roomy = make("train.max_batch_streams=2")
    tight = make("train.max_batch_streams=2", "train.max_resident_streams=2")
    for call in calls:
        assert roomy.learn_many(call) == tight.learn_many(call)
    assert tight.streams.states.num_resident == 2 and tight.streams.states.num_spilled >= 2
    for sid in ("s0", "s1", "s2", "s3", "s4"):
        assert torch.equal(roomy.predict(sid), tight.predict(sid))
    assert roomy.flush() == tight.flush()
    assert all(torch.equal(a, b) for a, b in zip(params(roomy), params(tight)))
    buffer = io.BytesIO()  # spilled states survive a save and load
    torch.save(tight.state_dict(), buffer)
    buffer.seek(0)
    resumed = make("train.max_batch_streams=2", "train.max_resident_streams=2")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    more = {"s3": rng.integers(0, 13, 17), "s0": rng.integers(0, 13, 9)}
    assert resumed.learn_many(more) == tight.learn_many(more)
    assert all(torch.equal(a, b) for a, b in zip(params(resumed), params(tight)))


def test_totals_are_counted_update_by_update():
    """A checkpoint taken between two steps (the daemon serves requests there) must see
    model, table and totals agree."""
    learner = make()
    learner.add("s", np.arange(41) % 13)  # 10 updates of k1 = 4
    seen = []
    while (plan := learner.next_update()) is not None:
        learner.step(plan)
        seen.append(learner.state_dict()["totals"])
    assert [t["updates"] for t in seen] == list(range(1, 11))
    assert [t["tokens_trained"] for t in seen] == list(range(4, 41, 4))
    assert all(a["bits"] < b["bits"] for a, b in zip(seen, seen[1:]))
    assert seen[-1]["bits"] == learner.bits


def test_next_update_changes_nothing_until_it_runs():
    learner = make()
    learner.add("s", np.arange(41) % 13)
    before = copy.deepcopy(learner.state_dict())
    plans = [learner.next_update() for _ in range(3)]
    assert all(np.array_equal(p.rows, plans[0].rows) and np.array_equal(p.n, plans[0].n)
               for p in plans)
    assert_same(learner.state_dict(), before)


def poison_head(learner, when):
    """Make the head's output NaN on the forward passes `when` says (a stand-in for a
    loss that overflows); returns the list of forward passes seen."""
    calls = []

    def hook(module, inputs, output):
        calls.append(len(calls))
        return output * float("nan") if when(len(calls) - 1) else output
    learner.model.head.register_forward_hook(hook)
    return calls


def test_a_non_finite_loss_changes_neither_weights_nor_optimizer():
    learner = make()
    learner.learn("s", np.arange(9) % 13)  # two updates: Adam has state
    before = copy.deepcopy(learner.state_dict())  # state_dict() shares the tensors
    poison_head(learner, when=lambda i: i == 0)
    result = learner.learn("s", np.arange(9, 13) % 13)  # one update, poisoned
    assert (result.updates, result.skipped, result.skipped_targets, result.targets) == \
        (1, 1, 4, 0)
    assert result.bits == 0.0
    after = learner.state_dict()
    assert_same(after["model"], before["model"])
    # the rate follows the update count (the schedule), skipped updates included
    for groups in (after["optimizer"]["param_groups"], before["optimizer"]["param_groups"]):
        for group in groups:
            group.pop("lr")
    assert_same(after["optimizer"], before["optimizer"])  # step counts too
    assert learner.skipped_updates == 1 and learner.tokens_trained == 8
    assert np.isfinite(learner.bits)
    states = learner.streams.states.tensors
    assert all(torch.isfinite(t).all() for t in states)
    healthy = learner.learn("s", np.arange(13, 17) % 13)  # the next one steps again
    assert (healthy.skipped, healthy.targets) == (0, 4)
    assert not torch.equal(learner.model.head.weight, before["model"]["head.weight"])


def test_a_finite_gradient_whose_square_overflows_is_not_stepped_on():
    """Without clipping, a finite gradient of 1e20 would put inf into Adam's squared-
    gradient average (1e40 > float32's 3.4e38): that parameter would never move again,
    and the state would carry it into every checkpoint."""
    learner = make("train.grad_clip=0")
    learner.learn("s", np.arange(9) % 13)
    before = copy.deepcopy(learner.state_dict())
    handle = learner.model.head.register_full_backward_hook(
        lambda module, grad_input, grad_output: tuple(
            None if g is None else g * 1e20 for g in grad_input))
    result = learner.learn("s", np.arange(9, 13) % 13)
    assert (result.updates, result.skipped) == (1, 1)
    assert_same(learner.state_dict()["model"], before["model"])
    handle.remove()
    assert learner.learn("s", np.arange(13, 17) % 13).skipped == 0
    optimizer = learner.state_dict()["optimizer"]["state"]
    assert all(torch.isfinite(t).all() for s in optimizer.values() for t in s.values())
    assert all(torch.isfinite(p).all() for p in learner.model.parameters())


def test_a_step_that_raises_leaves_the_table_where_the_model_is():
    learner = make()
    learner.add("s", np.arange(9) % 13)
    handle = learner.model.head.register_forward_hook(
        lambda *_: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        learner.train()
    assert learner.num_untrained == 8 and learner.updates == 0
    handle.remove()
    twin = make()
    twin.add("s", np.arange(9) % 13)
    assert learner.train() == twin.train()  # the same two updates, nothing skipped
    assert_same(learner.state_dict()["model"], twin.state_dict()["model"])


def test_torch_threads_are_half_the_cores_unless_set(monkeypatch):
    """More threads than free cores collapse training on a shared host (bench
    contention): by default a learner leaves half the cores to everything else, unless
    OMP_NUM_THREADS says otherwise (torchrun gives each rank 1)."""
    import os
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        make()
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
        make("train.cpu_threads=3")
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by torch at its start: kept
        make()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_tuple_is_one_stream_id():
    learner = make()
    learner.learn(("a", 1), np.arange(7) % 13)  # 6 targets: 4 trained, 2 wait
    learner.learn("a", np.arange(7) % 13)
    result = learner.flush(("a", 1))
    assert (result.streams, result.targets) == (1, 2)
    assert learner.streams.untrained("a") == 2
    assert learner.flush_many(["a", ("a", 1)]).targets == 2


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_an_ended_stream_is_forgotten_at_the_flush_and_nothing_else_changes():
    """Twin learners, fed alike; in one, stream d ends: its last target trains in the
    flush, which then forgets it; then b ends with nothing left to train: it goes at
    once. The other streams' positions and states (moved to new rows, some spilled to
    host memory) are the same as in the twin."""
    rng = np.random.default_rng(11)
    feeds = [{s: rng.integers(0, 13, int(rng.integers(5, 30))) for s in "abcdef"}
             for _ in range(4)]
    ending, twin = (make("train.max_resident_streams=2", "train.max_batch_streams=2") for _ in range(2))
    for feed in feeds:
        assert ending.learn_many(feed) == twin.learn_many(feed)
    assert ending.streams.untrained("b") == 0 and ending.streams.untrained("d") == 1
    assert ending.end("d") and not ending.end("zz")
    with pytest.raises(ValueError, match="has ended"):
        ending.learn_many({"a": [1, 2], "d": [3]})
    assert ending.streams.next_offset("a") == twin.streams.next_offset("a")  # nothing taken
    assert ending.flush() == twin.flush()
    assert "d" not in ending.streams.row_of and ending.streams.next_offset("d") == 0
    assert ending.streams.ids == ["a", "b", "c", "f", "e"]  # f moved into d's row
    assert ending.streams.states.slot_of_row[3] < 0  # and its state was in host memory
    assert ending.end("b") and "b" not in ending.streams.row_of  # nothing left: at once
    assert ending.streams.ids == ["a", "e", "c", "f"]
    assert all(torch.equal(p, q) for p, q in zip(params(ending), params(twin)))
    for s in "acef":
        assert ending.streams.next_offset(s) == twin.streams.next_offset(s)
        assert torch.equal(ending.predict(s), twin.predict(s))
    assert ending.num_untrained == twin.num_untrained == 0
    ending.learn("b", [1, 2, 3])  # the id starts again, from scratch
    assert ending.streams.next_offset("b") == 3 and ending.num_untrained == 2
    restored = make("train.max_resident_streams=2", "train.max_batch_streams=2")
    restored.load_state_dict(ending.state_dict())
    assert restored.num_untrained == 2 and restored.streams.num_received == \
        ending.streams.num_received


def test_a_flush_asked_twice_trains_once_and_survives_a_save():
    """flush_many with a repeated id counts it once; a flush asked for (an end) that
    has not trained yet is part of the saved state."""
    learner = make()
    learner.add("a", np.arange(7) % 13)  # 6 targets: a window of 4, then 2 left
    assert learner.flush_many(["a", "a", "a"]).targets == 6
    assert learner.num_untrained == 0 and learner.streams.untrained("a") == 0
    learner.add("b", np.arange(6) % 13)
    assert learner.end("b")
    restored = make()
    restored.load_state_dict(learner.state_dict())
    assert restored.train().targets == 5  # the window, and the rest the end asked for
    assert "b" not in restored.streams.row_of


def test_ended_streams_are_kept_across_save_and_load():
    learner = make()
    learner.learn_many({"a": np.arange(10) % 13, "b": np.arange(7) % 13})
    learner.end("a")
    restored = make()
    restored.load_state_dict(learner.state_dict())
    assert restored.streams.ended == {"a"}
    restored.flush()
    assert restored.streams.ids == ["b"]


def test_a_sliced_generation_is_the_one_of_the_moment_it_was_asked_for():
    """The daemon advances a generation a token at a time between updates: its tokens are
    those of the model and stream when it was asked, whatever trains meanwhile."""
    learner = make()
    tokens = np.random.default_rng(1).integers(0, 13, 300)
    learner.learn("s", tokens[:150])
    reference = copy.deepcopy(learner).generate("s", 40, temperature=0.8, seed=5)
    sliced = learner.generation("s", 40, temperature=0.8, seed=5)
    slices, fed = 0, 150
    while not sliced.advance(pause=lambda: True):  # one token per slice
        slices += 1
        learner.learn("s", tokens[fed:fed + 5])  # the weights and the stream move on
        fed += 5
    assert slices == 39 and learner.updates > 40
    assert sliced.tokens == reference
    # and the moved model samples otherwise: the test would see a live-weights bug
    assert learner.generate("s", 40, temperature=0.8, seed=5) != reference

"""The in-process API: feed tokens, get every TBPTT(k1, k2) update they make possible.

    learner = streamrnn.Learner(streamrnn.load_config(overrides=["train.k1=16"]))
    result = learner.learn_many({"a": tokens_a, "b": tokens_b})
    result.bits / result.targets       # prequential bits per token of what was trained
    learner.predict("a")               # log-probabilities of a's next token

No sockets, no files: the daemon and library users share this class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from ..config import Config, ConfigError, TrainConfig, config_from_dict, torch_threads
from .collective import Ranks
from .engine import Engine, nats_to_bits
from .generation import Generation
from .model import RecurrentLM
from .optim import apply_settings, learning_rate, make_optimizer
from .streams import Plan, StreamId, StreamTable

FORMAT = "streamrnn.learner/1"


@dataclass(frozen=True)
class LearnResult:
    """What some updates did."""
    streams: int = 0    # distinct streams that got at least one update
    updates: int = 0    # updates run (windows consumed), skipped ones included
    targets: int = 0    # tokens predicted and then trained on (not in skipped updates)
    bits: float = 0.0   # prequential bits over those targets (measured before each step)
    batch_streams: tuple[int, ...] = ()  # streams in each update, in order
    skipped: int = 0    # updates whose loss or gradient was not finite: no step taken
    skipped_targets: int = 0  # the targets of those, predicted but never trained on

    @property
    def bits_per_target(self) -> float:
        return self.bits / self.targets if self.targets else float("nan")


@dataclass(frozen=True)
class Scored:
    """One update's scored targets, for the watched streams among its streams (see
    Learner.scorer): stream by stream, each stream's targets in order."""
    streams: list             # (S,) stream ids
    first_offset: np.ndarray  # (S,) the offset in its stream of each one's first target
    counts: np.ndarray        # (S,) its targets in this update
    lines_before: np.ndarray  # (S,) line tokens in the stream before its first target
    tokens: np.ndarray        # (targets,) the target tokens
    previous: np.ndarray      # (targets,) the token before each
    bits: np.ndarray          # (targets,) -log2 p(target), under the weights before
    expected: np.ndarray      # (targets,) the most likely token there
    p_expected: np.ndarray    # (targets,) and its probability
    skipped: bool             # the update's step was skipped (not finite): not trained


@dataclass(frozen=True)
class _Watched:
    """What an update knew on the host about its watched streams (see Scored)."""
    scores: torch.Tensor   # (3, targets) on the device: engine.target_scores
    streams: list
    first_offset: np.ndarray
    counts: np.ndarray
    lines_before: np.ndarray
    order: np.ndarray      # the watched targets, in Scored's order, among the update's
    tokens: np.ndarray
    previous: np.ndarray


@dataclass(frozen=True)
class _Ran:
    """An update whose outcome is still on the device (see Learner.settle)."""
    nats: torch.Tensor     # summed cross-entropy of its targets
    skipped: torch.Tensor  # 1.0 if its step was skipped
    num_targets: int
    streams: np.ndarray  # their StreamTable.serial: rows move when streams are forgotten
    watched: _Watched | None = None


class Learner:
    def __init__(self, config: Config, ranks: Ranks | None = None):
        """`ranks`: several processes training one model (core/collective.py), each
        with its own streams; every rank then calls learn/train/flush at the same
        points, and each update is a global one. None: this process alone."""
        self.config = config
        self.ranks = ranks if ranks is not None else Ranks()
        train = config.train
        self.device = resolve_device(train.device)
        threads = torch_threads(train)
        if threads:  # process-wide: torch has one intra-op thread pool
            torch.set_num_threads(threads)
        dtype = torch.float64 if train.precision == "fp64" else torch.float32
        with torch.random.fork_rng(devices=[]):  # seed the weights, leave global RNG alone
            torch.manual_seed(train.seed)
            model = RecurrentLM(config.model)
        self.model = model.to(self.device, dtype)
        self.optimizer = make_optimizer(self.model, train)
        # the settings that may change between runs (learning rate and its schedule,
        # Adam's betas and eps, clipping): recovery replays logged updates with the
        # ones they ran with (see `tune`)
        self.tuning = train
        self.streams = StreamTable(
            train.k1, train.k2, (config.model.num_layers, config.model.hidden_size),
            self.model.num_state_tensors, self.device, dtype, train.max_resident_streams,
            line_token=config.scores.resolved_line_token(config.model.vocab_size))
        self.engine = Engine(self.model, self.optimizer, train.grad_clip, train.precision,
                             self.device, self.ranks)
        # batch width; recovery replays each logged update with the width it ran with
        self.max_batch_streams = train.max_batch_streams
        # lifetime totals, part of the learned state, added update by update in order
        # (settle), so they come out the same however updates were grouped (recovery)
        self.updates = 0          # updates run
        self._tokens_trained = 0  # targets of the updates whose step was taken
        self._bits = 0.0
        self._skipped_updates = 0
        self._unsettled: list[_Ran] = []  # ran, outcome not fetched from the device yet
        self._fetched: list[tuple[_Ran, float, bool]] = []  # fetched, not reported yet
        # who wants per-target scores (the daemon's score feed): `watched(ids)` says of
        # which streams (a bool array, or None: none of them), `scored(Scored)` takes
        # them, update by update in order, at the host sync (settle). None: no scores.
        self.scorer = None

    # ---- learning --------------------------------------------------------------------
    def learn(self, stream_id: StreamId, tokens: Any) -> LearnResult:
        """Append tokens to a stream and run every update that became possible."""
        return self.learn_many({stream_id: tokens})

    def learn_many(self, tokens_by_stream: Mapping[StreamId, Any]) -> LearnResult:
        """Append tokens to several streams, then train their ready windows together:
        each update takes the oldest ready window of up to train.max_batch_streams
        streams. All tokens are checked first, so a bad one changes nothing."""
        checked = {sid: self.check_tokens(t) for sid, t in tokens_by_stream.items()}
        ended = [sid for sid, t in checked.items() if len(t) and sid in self.streams.ended]
        if ended:
            raise ValueError(f"stream {ended[0]!r} has ended: it takes no more tokens")
        for sid, tokens in checked.items():
            self.streams.append(sid, tokens)
        return self.train()

    def add(self, stream_id: StreamId, tokens: Any) -> None:
        """Append tokens to a stream without training (see `train`)."""
        self.streams.append(stream_id, self.check_tokens(tokens))

    def train(self, max_updates: int | None = None) -> LearnResult:
        """Run ready updates, at most `max_updates` (None: until none is ready)."""
        self._run(max_updates)
        return self.settle()

    def next_update(self, group=None) -> Plan | None:
        """The update that would run next (see StreamTable.ready), without running it:
        a pure function of what the streams hold, so it can be logged first. `group`:
        see StreamTable.ready (a replay of several ranks' logs in one process)."""
        return self.streams.ready(self.max_batch_streams, group)

    def step(self, plan: Plan | None, num_targets: int | None = None) -> None:
        """Run one planned update. No host sync: its loss stays on the device until
        `settle` (once per call, or per turn of the daemon's loop). With several ranks
        every rank runs every global update: plan None where it has nothing ready, and
        `num_targets` the targets of all ranks' plans (Ranks.agree)."""
        batch = self.streams.batch(plan) if plan is not None else None
        for group in self.optimizer.param_groups:  # a float per step: no recompile
            group["lr"] = learning_rate(self.tuning, self.updates)
        watched = self._watched(plan, batch) if batch is not None else None
        nats, skipped, scores = self.engine.step(batch, self.streams.states.tensors,
                                                 num_targets, score=watched is not None)
        if watched is not None:
            watched = _Watched(scores, *watched)
        serials = self.streams.serial[plan.rows] if plan else np.zeros(0, np.int64)
        if plan is not None:
            # after the step: one that raised changed nothing
            self.streams.commit(plan, batch)
        self.updates += 1
        self._unsettled.append(_Ran(nats, skipped, plan.num_targets if plan else 0, serials,
                                    watched))

    def _watched(self, plan: Plan, batch) -> tuple | None:
        """What the scorer needs of this update's watched streams (all but the scores),
        or None where none is watched: then nothing more is computed."""
        if self.scorer is None or not self.scorer.active:
            return None
        ids = [self.streams.ids[row] for row in plan.rows.tolist()]
        mask = self.scorer.watched(ids)
        if mask is None or not mask.any():
            return None
        target_stream = batch.geometry.target_stream
        order = np.argsort(target_stream, kind="stable")  # stream by stream, in order
        order = order[mask[target_stream[order]]]
        rows = plan.rows[mask]
        return ([sid for sid, m in zip(ids, mask.tolist()) if m],
                self.streams.trained_end[rows] + 1, plan.n[mask],
                self.streams.lines[rows].copy(), order, batch.targets()[order],
                batch.previous()[order])

    def settle(self) -> LearnResult:
        """What the updates run since the last settle did (their outcomes fetched from
        the device and added to the lifetime totals). Note: a CPU-GPU sync, once per
        call of learn/train/flush, or per turn of the daemon's loop."""
        self._fetch()
        done, self._fetched = self._fetched, []
        if not done:
            return LearnResult()
        kept = [(r, nats) for r, nats, skipped in done if not skipped]
        dropped = [r for r, _, skipped in done if skipped]
        return LearnResult(
            streams=len(np.unique(np.concatenate([r.streams for r, _, _ in done]))),
            updates=len(done), targets=sum(r.num_targets for r, _ in kept),
            bits=sum(nats_to_bits(nats) for _, nats in kept),
            batch_streams=tuple(len(r.streams) for r, _, _ in done),
            skipped=len(dropped), skipped_targets=sum(r.num_targets for r in dropped))

    def _fetch(self) -> None:
        """Move the device outcomes of run updates into the totals, update by update in
        order (so they come out the same however updates were grouped: recovery), and
        keep them for `settle` to report."""
        ran, self._unsettled = self._unsettled, []
        if not ran:
            return
        outcomes = torch.stack([torch.stack([r.nats.double(), r.skipped.double()])
                                for r in ran]).tolist()
        watched = [r.watched for r in ran if r.watched is not None]
        if watched:  # the same sync: the device has finished these updates already
            host = torch.cat([w.scores for w in watched], 1).cpu().numpy()
            scores = iter(np.split(host, np.cumsum([w.scores.shape[1] for w in watched])[:-1],
                                   axis=1))
        for r, (nats, skipped) in zip(ran, outcomes):
            if skipped:
                self._skipped_updates += 1
            else:
                self._bits += nats_to_bits(nats)
                self._tokens_trained += r.num_targets
            self._fetched.append((r, nats, bool(skipped)))
            if r.watched is not None and self.scorer is not None:
                w, (bits, expected, p_expected) = r.watched, next(scores)
                self.scorer.scored(Scored(
                    w.streams, w.first_offset, w.counts, w.lines_before, w.tokens,
                    w.previous, bits[w.order], expected[w.order].astype(np.int64),
                    p_expected[w.order], bool(skipped)))

    def tune(self, train: TrainConfig) -> None:
        """Run the next updates with these learning settings (rate and schedule, Adam's
        betas and eps, clipping); the window geometry and model stay as they are."""
        self.tuning = train
        self.engine.grad_clip = train.grad_clip
        apply_settings(self.optimizer, train)

    def end(self, stream_id: StreamId) -> bool:
        """The stream gets no more tokens: its last targets train in the next updates,
        and then it is forgotten (tokens, state and id: the id may then start again from
        offset 0), so streams that come and go do not pile up. False if the stream is
        unknown."""
        return self.streams.end(stream_id)

    def flush(self, stream_id: StreamId | None = None) -> LearnResult:
        """Train the last r < k1 targets of one stream (None: of every stream) in a
        shorter update, so nothing received stays untrained. Streams continue
        afterwards, except ended ones (see `end`), forgotten once nothing is left to
        train. Any hashable is one stream id, a tuple too: several go to flush_many."""
        return self.flush_many(list(self.streams.ids) if stream_id is None else [stream_id])

    def flush_many(self, stream_ids: Iterable[StreamId]) -> LearnResult:
        """`flush` for each of these streams (each once), in shared updates with the
        full windows that are ready."""
        self.streams.flush(stream_ids)
        self._run(None)
        return self.settle()

    def _run(self, max_updates: int | None = None) -> None:
        done = 0
        while max_updates is None or done < max_updates:
            plan = self.next_update()
            num_targets = None
            if self.ranks.distributed:  # every rank steps while any rank has a window
                any_ready, num_targets = self.ranks.agree(
                    [plan is not None, plan.num_targets if plan is not None else 0])
                if not any_ready:
                    return
            elif plan is None:
                return
            self.step(plan, num_targets)
            done += 1

    @property
    def tokens_trained(self) -> int:
        """Lifetime targets trained (their update's step was taken)."""
        self._fetch()
        return self._tokens_trained

    @property
    def bits(self) -> float:
        """Lifetime prequential bits over all trained targets."""
        self._fetch()
        return self._bits

    @property
    def skipped_updates(self) -> int:
        """Lifetime updates skipped for a non-finite loss or gradient."""
        self._fetch()
        return self._skipped_updates

    @property
    def num_untrained(self) -> int:
        """Targets received but not trained yet, over all streams."""
        return self.streams.num_untrained

    # ---- prediction --------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, stream_id: StreamId) -> torch.Tensor:
        """Log-probabilities (vocab_size,) of the stream's next token, on the CPU. A
        stream with no tokens yet gets the uniform distribution."""
        vocab = self.config.model.vocab_size
        row = self.streams.row_of.get(stream_id)
        if row is None or self.streams.next_offset(stream_id) == 0:
            return torch.full((vocab,), -float(np.log(vocab)))
        tokens = torch.from_numpy(self.streams.tokens_from_start(row).astype(np.int64))
        state = self.streams.states.state(row)
        with self.engine.autocast():
            logits, _ = self.model(tokens.to(self.device)[:, None],
                                   self.model.from_tuple(state))
        return torch.log_softmax(logits[-1, 0].float(), dim=-1).cpu()  # float32 is plenty

    def generate(self, stream_id: StreamId, num_tokens: int, temperature: float = 1.0,
                 seed: int = 0) -> list[int]:
        """Sample a continuation of a stream from the model; the stream is unchanged."""
        generation = self.generation(stream_id, num_tokens, temperature, seed)
        generation.advance()
        return generation.tokens

    @torch.no_grad()
    def generation(self, stream_id: StreamId, num_tokens: int, temperature: float = 1.0,
                   seed: int = 0) -> Generation:
        """`generate` in slices (Generation.advance), from the model and the stream as
        they are now, whatever trains meanwhile."""
        row = self.streams.row_of.get(stream_id)
        history = state = None
        if row is not None and self.streams.next_offset(stream_id) > 0:
            history = torch.from_numpy(self.streams.tokens_from_start(row).astype(np.int64))
            # a copy: the pool's slot (a view) changes as the stream trains on
            state = self.model.from_tuple(tuple(
                t.clone() for t in self.streams.states.state(row)))
        return Generation(self.model, history, state, num_tokens, temperature, seed,
                          self.engine.autocast)

    def check_tokens(self, tokens: Any) -> np.ndarray:
        """tokens (bytes, list, numpy array or tensor of ints < vocab_size) -> int32."""
        if isinstance(tokens, (bytes, bytearray, memoryview)):
            tokens = np.frombuffer(tokens, np.uint8)  # bytes are byte tokens
        elif isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"tokens must be one-dimensional, got shape {array.shape}")
        if array.size == 0:
            return np.zeros(0, np.int32)
        if array.dtype.kind not in "iu":
            raise ValueError(f"tokens must be integers, got {array.dtype}")
        vocab = self.config.model.vocab_size
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside 0 .. {vocab - 1} "
                             "(model.vocab_size)")
        return array.astype(np.int32)

    # ---- state -------------------------------------------------------------------------
    # Plain tensors and containers, so torch.load(weights_only=True) reads them. With
    # several ranks the replicated part is the same on every rank (one copy is saved),
    # the rank's part holds its own streams and what they trained.
    def replicated_state(self) -> dict:
        """Weights, optimizer, config and the global counts: equal on every rank."""
        return {"format": FORMAT, "config": self.config.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "totals": {"updates": self.updates, "skipped_updates": self.skipped_updates}}

    def rank_state(self) -> dict:
        """This rank's streams, and the targets and bits they trained."""
        return {"streams": self.streams.state_dict(),
                "totals": {"tokens_trained": self.tokens_trained, "bits": self.bits}}

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (one process): both parts in one."""
        replicated, rank = self.replicated_state(), self.rank_state()
        return {**replicated, "streams": rank["streams"],
                "totals": {**replicated["totals"], **rank["totals"]}}

    def load_state_dict(self, state: dict) -> None:
        self.load_replicated(state)
        self.load_rank(state)

    def load_replicated(self, state: dict) -> None:
        if state.get("format") != FORMAT:
            raise ValueError(f"not a streamrnn learner state (format {state.get('format')!r},"
                             f" expected {FORMAT!r})")
        differing = incompatible_keys(self.config, config_from_dict(state["config"]))
        if differing:
            raise ValueError("saved state was learned with a different config: "
                             + ", ".join(differing))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        apply_settings(self.optimizer, self.tuning)  # the state brings its own betas
        totals = state["totals"]
        self.updates = int(totals["updates"])
        self._skipped_updates = int(totals.get("skipped_updates", 0))  # older checkpoints
        self._unsettled.clear()
        self._fetched.clear()

    def load_rank(self, state: dict) -> None:
        """A rank's part (rank_state), or the part of a whole state_dict."""
        self.streams.load_state_dict(state["streams"])
        self._tokens_trained = int(state["totals"]["tokens_trained"])
        self._bits = float(state["totals"]["bits"])


def incompatible_keys(ours: Config, saved: Config) -> list[str]:
    """Settings that must match to continue from a saved state: the model's shape and
    the window geometry. (Learning settings, batching, device may change.)"""
    return [f"{key} (saved {value!r}, now {now!r})"
            for key, value, now in _must_match(ours, saved) if value != now]


def settings_to_continue(ours: Config, saved: Config) -> str:
    """What to set to continue a saved state that incompatible_keys refuses, as --set
    arguments (the same keys go in the config file, in their [section])."""
    return " ".join(f"--set {key}={_toml(value)}"
                    for key, value, now in _must_match(ours, saved) if value != now)


def _must_match(ours: Config, saved: Config) -> list[tuple[str, object, object]]:
    keys = [("model", name) for name in ours.model.__dataclass_fields__]
    keys += [("train", "k1"), ("train", "k2"), ("train", "optimizer")]
    return [(f"{section}.{name}", getattr(getattr(saved, section), name),
             getattr(getattr(ours, section), name)) for section, name in keys]


def _toml(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


TUNING_KEYS = ("lr", "adam_beta1", "adam_beta2", "adam_eps", "warmup_updates",
               "lr_decay_updates", "lr_floor", "grad_clip")


def changed_settings(ours, saved) -> list[str]:
    """The learning settings (TUNING_KEYS of two TrainConfigs) that differ, as
    'train.lr 0.003 -> 0.01'."""
    return [f"train.{key} {getattr(ours, key)!r} -> {getattr(saved, key)!r}"
            for key in TUNING_KEYS if getattr(ours, key) != getattr(saved, key)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {name!r} but this torch sees no CUDA device "
                              f"(torch {torch.__version__}); use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device = {name!r} but only "
                              f"{torch.cuda.device_count()} CUDA device(s) exist")
    return device

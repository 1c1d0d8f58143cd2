"""`streamrnn bench`: the engine against the approaches it replaces, in one run.

Strategies, all training the same byte-level model on the same real text with
TBPTT(32, 128) by default, tokens trained per second:

  engine             streamrnn.Learner through its public API (learn_many)
  engine_bf16        the same with train.precision = bf16
  recompute          plain sliding-window recompute: per window two nn.LSTM calls from the
                     stored start state, head on every position; the usual hand-written
                     baseline (one stream set stepping in lockstep, no stream table)
  seed_chunk_cell    the seed question's last idea: TBPTT(k2, k2) with an LSTMCell loop in
                     Python, state carried and detached every k2 tokens
  seed_sliding_cell  the seed question's exact idea: every token, recompute k2 LSTMCell
                     steps from the state k2 tokens back, loss on the newest token

Figures compare inside one run only (same process, same machine): absolute numbers
differ 30% between runs and cards. Ratios to `recompute` and to the seed loops are the
result; on a GPU, the reference figures in ANCHORS (below) are printed alongside.
"""
from __future__ import annotations

import math
import platform
import time
from collections import deque
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..core.learner import Learner, resolve_device
from .feeding import widened, write_json
from .textdata import text_streams


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    embed: int
    streams: int


PRESETS = {  # the project's reference configs (byte vocabulary, k1 = 32, k2 = 128)
    "small": Preset(256, 1, 64, 1),
    "small_b64": Preset(256, 1, 64, 64),
    "small_b256": Preset(256, 1, 64, 256),
    "small_b1024": Preset(256, 1, 64, 1024),
    "large": Preset(1024, 2, 128, 1),
    "large_b4096": Preset(1024, 2, 128, 4096),
}
DEFAULT_CONFIGS = {"cpu": "small,small_b64",
                   "cuda": "small,small_b256,small_b1024,large,large_b4096"}
DEFAULT_STRATEGIES = {"cpu": "engine,recompute,seed_chunk_cell,seed_sliding_cell",
                      "cuda": "engine,engine_bf16,recompute,seed_chunk_cell,seed_sliding_cell"}
# reference figures measured for the project before streamrnn existed: a plain cuDNN
# recompute baseline in fp32 (tokens/s, SGD, torch 2.11), one per card and config
ANCHORS = {
    ("H200", "small"): 4_703, ("H200", "small_b256"): 1.0e6, ("H200", "small_b1024"): 2.67e6,
    ("H200", "large"): 2_739, ("H200", "large_b4096"): 0.57e6,
    ("H100", "small"): 4_741, ("H100", "small_b1024"): 3.53e6,
    ("H100", "large"): 2_619, ("H100", "large_b4096"): 0.55e6,
}
SEED_MAX_STREAMS = 256  # the seed loops are too slow to be worth timing beyond this


def run(configs: str | None, strategies: str | None, seconds: float, base: Config,
        json_path: str | None, rounds: int = 3, echo=print) -> dict:
    device = resolve_device(base.train.device)
    configs = configs or DEFAULT_CONFIGS[device.type]
    strategies = strategies or DEFAULT_STRATEGIES[device.type]
    info = machine_info(device)
    echo(f"# streamrnn bench on {info['device']} (torch {info['torch']}), "
         f"TBPTT({base.train.k1}, {base.train.k2}), {base.train.optimizer}, "
         f"{seconds:g} s per strategy in {rounds} interleaved rounds (median)")
    echo(f"{'config':12s} {'strategy':18s} {'tokens/s':>12s} {'bits/tok':>8s} "
         f"{'vs recompute':>12s}")
    rows = []
    for name in configs.split(","):
        preset = PRESETS[name]
        config = _config_for(base, preset)
        data = text_streams(preset.streams, _bytes_needed(config, preset, seconds))
        chosen = [s for s in strategies.split(",")
                  if not (s.startswith("seed") and preset.streams > SEED_MAX_STREAMS)]
        # interleave short runs and keep each strategy's median: a noisy machine then
        # slows every strategy alike instead of whichever happened to run at a bad time
        runs: dict[str, list[dict]] = {s: [] for s in chosen}
        for _ in range(rounds):
            for strategy in chosen:
                runs[strategy].append(measure(strategy, config, data, device,
                                              seconds / rounds))
        for strategy in chosen:
            ordered = sorted(runs[strategy], key=lambda r: r["tokens_per_s"])
            row = {"config": name, "strategy": strategy, **ordered[len(ordered) // 2],
                   "rounds_tokens_per_s": [r["tokens_per_s"] for r in runs[strategy]]}
            rows.append(row)
        baseline = next((r["tokens_per_s"] for r in rows
                         if r["config"] == name and r["strategy"] == "recompute"), 0)
        for row in rows[-len(chosen):]:
            ratio = f"{row['tokens_per_s'] / baseline:.2f}x" if baseline else ""
            echo(f"{name:12s} {row['strategy']:18s} {row['tokens_per_s']:12,.0f} "
                 f"{row['bits_per_token']:8.3f} {ratio:>12s} {row['error']}")
        result = {"info": info, "seconds": seconds, "rounds": rounds,
                  "config": base.to_dict(), "rows": rows, "ratios": ratios(rows, info)}
        write_json(result, json_path)  # after every config: a run cut short keeps it
    for line in ratio_lines(result["ratios"]):
        echo(line)
    if json_path:
        echo(f"# wrote {json_path}")
    return result


def measure(strategy: str, config: Config, data: list[bytes], device: torch.device,
            seconds: float) -> dict:
    fn = {"engine": _engine, "engine_bf16": _engine, "recompute": _recompute,
          "seed_chunk_cell": _seed_chunk, "seed_sliding_cell": _seed_sliding}[strategy]
    if strategy == "engine_bf16":
        config = replace(config, train=replace(config.train, precision="bf16"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    try:
        tokens, elapsed, bits, *_ = fn(config, data, device, seconds)
        error = ""
    except Exception as e:  # record it and carry on with the other strategies
        tokens, elapsed, bits, error = 0, 1.0, float("nan"), f"{type(e).__name__}: {e}"
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0
    return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed,
            "bits_per_token": bits, "peak_mib": peak,
            "wall_s": time.perf_counter() - started, "error": error}


def _engine(config: Config, data: list[bytes], device, seconds: float):
    learner = Learner(config)
    streams = np.stack([np.frombuffer(d, np.uint8) for d in data])
    chunk = 8 * config.train.k1  # 8 updates per call: one host sync per 8 steps
    warm = config.train.k2 // chunk + 2  # windows at full length, then one more call
    position, started, cpu_started, tokens = 0, None, 0.0, 0
    recent: deque = deque(maxlen=3)  # (targets, bits) of the last calls: ~20 updates
    while started is None or time.perf_counter() - started < seconds:
        if position + chunk > streams.shape[1]:
            break
        piece = streams[:, position:position + chunk]
        result = learner.learn_many({i: piece[i] for i in range(len(data))})
        position += chunk
        if position // chunk == warm:
            started = time.perf_counter()  # learn_many synced: the device is idle here
            cpu_started = time.process_time()
        elif started is not None:
            tokens += result.targets
            recent.append((result.targets, result.bits))
    bits = sum(b for _, b in recent) / max(1, sum(t for t, _ in recent))
    # the CPU seconds of this process (all its threads) over the timed part, too
    return tokens, time.perf_counter() - started, bits, time.process_time() - cpu_started


class _ByteLM(nn.Module):
    def __init__(self, config: Config, cells: bool):
        super().__init__()
        m = config.model
        self.embed = nn.Embedding(m.vocab_size, m.embed_dim)
        if cells:
            self.cells = nn.ModuleList(nn.LSTMCell(m.embed_dim if i == 0 else m.hidden_size,
                                                   m.hidden_size) for i in range(m.num_layers))
        else:
            self.rnn = nn.LSTM(m.embed_dim, m.hidden_size, m.num_layers)
        self.head = nn.Linear(m.hidden_size, m.vocab_size)

    def cell_step(self, x, state):  # x (B,), state [(h, c)] per layer
        inp, new = self.embed(x), []
        for cell, hc in zip(self.cells, state):
            h, c = cell(inp, hc)
            new.append((h, c))
            inp = h
        return self.head(inp), new


def _setup(config: Config, data: list[bytes], device, cells: bool):
    torch.manual_seed(config.train.seed)
    model = _ByteLM(config, cells).to(device)
    lr = config.train.lr
    opt = (torch.optim.Adam if config.train.optimizer == "adam" else torch.optim.SGD)(
        model.parameters(), lr=lr)
    x = torch.from_numpy(np.stack([np.frombuffer(d, np.uint8) for d in data]).T.copy())
    return model, opt, x.long().to(device)  # x: (N, B)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(model, opt, logits, targets, clip):
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.detach()


def _recompute(config: Config, data, device, seconds):
    """The plain baseline: keep h(start); every k1 tokens rerun the window in two calls."""
    model, opt, x = _setup(config, data, device, cells=False)
    k1, k2, clip = config.train.k1, config.train.k2, config.train.grad_clip
    m = config.model
    zeros = torch.zeros(m.num_layers, x.shape[1], m.hidden_size, device=device)
    start_state = (zeros, zeros.clone())
    losses, started, first = [], None, 0
    for end in range(k1, x.shape[0] - 1, k1):
        if end >= 2 * k2 and started is None:  # full windows for k2 / k1 updates first
            _sync(device)
            started, first = time.perf_counter(), end
        elif started is not None and time.perf_counter() - started >= seconds:
            break
        start = max(0, end - k2)
        split = start + min(k1, end - start)
        y1, at_split = model.rnn(model.embed(x[start:split]), start_state)
        ys = [y1]
        if end > split:
            ys.append(model.rnn(model.embed(x[split:end]), at_split)[0])
        logits = model.head(torch.cat(ys))[-k1:]
        loss = _train(model, opt, logits, x[end - k1 + 1:end + 1], clip)
        if started is not None:
            losses.append(loss)
        if end - start >= k2:
            start_state = tuple(s.detach() for s in at_split)
    _sync(device)
    elapsed = time.perf_counter() - started
    return (end - first) * x.shape[1], elapsed, _bits(losses)


def _seed_chunk(config: Config, data, device, seconds):
    """TBPTT(k2, k2) stepping LSTMCells in Python, state detached every k2 tokens."""
    model, opt, x = _setup(config, data, device, cells=True)
    k2, clip = config.train.k2, config.train.grad_clip
    state = _zero_cells(config, x.shape[1], device)
    losses, tokens, started = [], 0, None
    for begin in range(0, x.shape[0] - k2 - 1, k2):
        state = [(h.detach(), c.detach()) for h, c in state]
        logits = []
        for t in range(begin, begin + k2):
            out, state = model.cell_step(x[t], state)
            logits.append(out)
        loss = _train(model, opt, torch.stack(logits), x[begin + 1:begin + k2 + 1], clip)
        if started is None:  # the first chunk warms up kernels and the allocator
            _sync(device)
            started = time.perf_counter()
            continue
        losses.append(loss)
        tokens += k2 * x.shape[1]
        if time.perf_counter() - started >= seconds:
            break
    _sync(device)
    return tokens, time.perf_counter() - started, _bits(losses)


def _seed_sliding(config: Config, data, device, seconds):
    """TBPTT(1, k2): for every token, k2 LSTMCell steps from the state k2 tokens back."""
    model, opt, x = _setup(config, data, device, cells=True)
    k2, clip = config.train.k2, config.train.grad_clip
    state = _zero_cells(config, x.shape[1], device)
    past = deque(maxlen=k2)  # detached states, past[0] is the one k2 tokens back
    losses, tokens, started = [], 0, None
    for t in range(x.shape[0] - 1):
        past.append(state)
        with torch.no_grad():
            _, state = model.cell_step(x[t], state)
        if t < k2 - 1:
            continue
        if started is None:
            _sync(device)
            started = time.perf_counter()
        window_state = past[0]
        for j in range(t - k2 + 1, t + 1):
            out, window_state = model.cell_step(x[j], window_state)
        losses.append(_train(model, opt, out, x[t + 1], clip))
        tokens += x.shape[1]
        if time.perf_counter() - started >= seconds:
            break
    _sync(device)
    return tokens, time.perf_counter() - started, _bits(losses)


def _zero_cells(config: Config, batch: int, device):
    z = torch.zeros(batch, config.model.hidden_size, device=device)
    return [(z, z) for _ in range(config.model.num_layers)]


def _bits(losses: list[torch.Tensor]) -> float:
    recent = losses[-20:]  # the last 20 updates, as the engine's figure
    return float(torch.stack(recent).mean()) / math.log(2) if recent else float("nan")


def _config_for(base: Config, preset: Preset) -> Config:
    model = replace(base.model, hidden_size=preset.hidden, num_layers=preset.layers,
                    embed_dim=preset.embed, kind="lstm")
    return widened(replace(base, model=model), preset.streams)


def _bytes_needed(config: Config, preset: Preset, seconds: float) -> int:
    """Text per stream: enough that a fast engine does not run out within `seconds`
    (guessing at most 20k tokens/s per stream and 10M/s in all), capped by memory."""
    rate = min(20_000, 10_000_000 / preset.streams)
    budget = 400_000_000 // preset.streams
    return int(min(budget, 16 * config.train.k2 + rate * seconds))


def machine_info(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "machine": platform.machine()}


def ratios(rows: list[dict], info: dict) -> list[dict]:
    out = []
    by = {(r["config"], r["strategy"]): r["tokens_per_s"] for r in rows}
    for (config, strategy), tps in by.items():
        if not strategy.startswith("engine"):
            continue
        entry = {"config": config, "strategy": strategy}
        for other in ("recompute", "seed_chunk_cell", "seed_sliding_cell"):
            if by.get((config, other)):
                entry[f"vs_{other}"] = tps / by[(config, other)]
        card = next((c for c in ("H200", "H100") if c in info["device"]), None)
        if (card, config) in ANCHORS:
            entry["vs_design_anchor"] = tps / ANCHORS[(card, config)]
        out.append(entry)
    return out


def ratio_lines(entries: list[dict]) -> list[str]:
    lines = []
    for e in entries:
        parts = [f"{k[3:]} {v:,.2f}x" for k, v in e.items() if k.startswith("vs_")]
        lines.append(f"# {e['config']} {e['strategy']}: " + ", ".join(parts))
    return lines

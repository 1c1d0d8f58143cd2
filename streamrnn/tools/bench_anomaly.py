"""`streamrnn bench anomaly`: does the score feed find the unusual lines of real logs?

A real daemon, on the config `streamrnn serve` would run, is fed each log as one stream
(a daemon per log, in turn, as each baseline sees one log; `together`: every log to one
daemon, 4 KiB of each in turn, one model for all), over tcp loopback, with a subscriber
to its score feed (client.Scores: what `streamrnn watch --all --json` reads) taking every line
record. Each line then has the model's scores, and beside them the baselines' on the
same bytes (anomaly_data.py: zlib with 32 KiB of history, an order-3 byte model).
Ranked against the labels of the lines in each log's second half (the first half is
where every method learns what is normal), each gives AUC-ROC, AUC-PR (average
precision) and the best F1:

    BGL_2k            the alerts a BlueGene/L supercomputer logged, labelled per line
    NAME+injected     six other loghub logs with foreign lines and garbled spans put
                      into their second half at known places

The model's line scores: `bits_per_token` (what a line cost, per byte), `peak_bits` (the
mean of its 8 most surprising bytes) and `score` (its rank by peak_bits among its
stream's recent lines: what watch filters on by default).
Data: loghub (https://github.com/logpai/loghub; Zhu et al., ISSRE 2023), see
anomaly_data.py for the licence note.
"""
from __future__ import annotations

import tempfile
import time

import numpy as np

from ..config import Config, ConfigError
from . import anomaly_data
from .feeding import round_robin, wait_trained, widened, write_json
from .local import LocalDaemon

CHUNK = 4096
MODEL_SCORES = ("bits_per_token", "peak_bits", "score")
STALL_SECONDS = 300


def run(config: Config, json_path: str | None, names: list[str] | None = None,
        seed: int = 0, echo=print, separately: bool = True) -> dict:
    """`separately`: each log to a daemon of its own (one model per log), in turn;
    else every log to one daemon, a stream each (one model learns them all)."""
    from ..core.learner import resolve_device
    from .bench_engine import machine_info
    if config.model.vocab_size != 256:
        raise ConfigError(f"model.vocab_size = {config.model.vocab_size}: bench anomaly "
                          "feeds bytes and scores lines, which needs 256")
    folder = anomaly_data.loghub_folder()
    logs = [anomaly_data.bgl(folder), *anomaly_data.injected_logs(folder, seed)]
    if names:
        unknown = set(names) - {log.name for log in logs}
        if unknown:
            raise ConfigError(f"no log named {', '.join(sorted(unknown))}; "
                              f"logs: {', '.join(log.name for log in logs)}")
        logs = [log for log in logs if log.name in names]
    info = machine_info(resolve_device(config.train.device))
    m, t = config.model, config.train
    echo(f"# streamrnn bench anomaly on {info['device']}: {m.kind} {m.num_layers}x"
         f"{m.hidden_size}, TBPTT({t.k1}, {t.k2}); {len(logs)} logs, one stream each, "
         + ("each to a daemon of its own" if separately else "all to one daemon")
         + ", one pass; scores on each log's second half")
    if separately:
        scored, seconds = {}, 0.0
        for log in logs:
            one, took = line_scores(config, [log], echo)
            scored.update(one)
            seconds += took
    else:
        scored, seconds = line_scores(widened(config, len(logs)), logs, echo)
    rows = []
    for log in logs:
        half = anomaly_data.second_half(log.labels)
        row = {"log": log.name, "lines": int(len(log.labels)),
               "evaluated": int(half.stop - half.start),
               "anomalies": int(log.labels[half].sum())}
        for field in MODEL_SCORES:
            row[f"model_{field}"] = anomaly_data.evaluate(scored[log.name][field],
                                                          log.labels, half)
        for name, figures in anomaly_data.baselines(log, half).items():
            row[name] = figures
        rows.append(row)
        echo(row_line(row))
    total = sum(len(log.data) for log in logs)
    result = {"info": info, "separately": separately, "bytes": total, "seconds": seconds,
              "bytes_per_s": total / seconds, "logs": rows,
              "mean": {key: float(np.mean([r[key]["auc_roc"] for r in rows]))
                       for key in COLUMNS},
              "config": config.to_dict()}
    echo("")
    for line in table(rows):
        echo(line)
    echo(f"# {total:,} bytes in {seconds:.0f} s ({total / seconds:,.0f} bytes/s, "
         + ("one log at a time)" if separately else "every log at once)"))
    write_json(result, json_path, echo)
    return result


def line_scores(config: Config, logs, echo) -> tuple[dict, float]:
    """Feed the logs to a daemon of our own (a stream each) and read back, from its score
    feed, each line's scores: {log name: {field: array by line}}, and the seconds from
    the first byte sent to the last line record."""
    from ..client import Producer, Scores
    settings = ["checkpoint.dir=streamrnn-state", "metrics.port=0"]
    streams = {log.name: log.data for log in logs}
    wanted = {log.name: len(log.labels) for log in logs}
    scores = {log.name: {f: np.full(len(log.labels), np.nan) for f in MODEL_SCORES}
              for log in logs}
    seen = {log.name: 0 for log in logs}
    with tempfile.TemporaryDirectory(prefix="streamrnn-anomaly-") as state:
        daemon = LocalDaemon(state, settings, config)
        try:
            with Producer(daemon.endpoint, retry_seconds=120) as producer, \
                    Scores.of(daemon.endpoint) as feed:
                time.sleep(1.0)  # the subscription reaches the daemon before any line
                started = time.monotonic()
                round_robin(producer, streams, CHUNK, go_on=lambda: True)
                producer.flush()
                for name in streams:
                    producer.request({"type": "flush", "stream": name})
                last = time.monotonic()
                while any(seen[n] < wanted[n] for n in wanted):
                    record = feed.receive(timeout=5.0)
                    if record is None:
                        if time.monotonic() - last > STALL_SECONDS:
                            raise RuntimeError(f"no line record for {STALL_SECONDS} s; "
                                               f"daemon log:\n{daemon.log_tail()}")
                        continue
                    last = time.monotonic()
                    name, line = record["stream"], record["line"]
                    if name in scores and line < wanted[name]:
                        for field in MODEL_SCORES:
                            scores[name][field][line] = record[field]
                        seen[name] += 1
                        if seen[name] % 500 == 0:
                            echo(f"#   {name}: {seen[name]:,} of {wanted[name]:,} lines "
                                 f"scored ({time.monotonic() - started:.0f} s)")
                seconds = time.monotonic() - started
                wait_trained(producer, timeout=60)
        finally:
            daemon.stop()
    return scores, seconds


COLUMNS = ("model_bits_per_token", "model_peak_bits", "model_score", "zlib", "order3")


def row_line(row: dict) -> str:
    figures = "  ".join(f"{key} {row[key]['auc_roc']:.3f}" for key in COLUMNS)
    return f"# {row['log']}: AUC-ROC {figures} ({row['anomalies']} of {row['evaluated']})"


def table(rows: list[dict]) -> list[str]:
    """The README's table: AUC-ROC / AUC-PR / best F1 per log and method."""
    head = ("| log | anomalies | model bits/token | model peak bits | model score | zlib "
            "| order-3 |", "|---|---|---|---|---|---|---|")
    lines = list(head)
    for r in rows:
        cells = [f"{r[k]['auc_roc']:.3f} / {r[k]['auc_pr']:.3f} / {r[k]['best_f1']:.3f}"
                 for k in COLUMNS]
        lines.append(f"| {r['log']} | {r['anomalies']} of {r['evaluated']} | "
                     + " | ".join(cells) + " |")
    return lines

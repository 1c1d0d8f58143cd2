"""`streamrnn bench soak`: many producers, many streams, a long time, nothing lost.

A daemon (durable defaults: write-ahead log with fsync) is fed over tcp loopback by
producer processes, each pushing its share of the streams as fast as backpressure lets
it, for `seconds`. Meanwhile the daemon's resident memory is sampled. At the end every
producer flushes, the daemon trains everything, and the books are checked: every
stream's offset equals what was sent, tokens received equals the total sent (no
duplicates taken twice), tokens trained equals the total minus one per stream (none
lost, none trained twice). Memory must level off once the stream set is stable.
"""
from __future__ import annotations

import multiprocessing
import time

from ..config import Config
from .feeding import latency_summary, round_robin, wait_trained, widened, write_json
from .local import running
from .textdata import text_streams


def run(base: Config, num_streams: int, num_producers: int, seconds: float,
        json_path: str | None, echo=print) -> dict:
    config = widened(base, num_streams)
    echo(f"# streamrnn bench soak: {num_streams} streams, {num_producers} producer "
         f"processes, {seconds:g} s, wal {config.wal.mode}")
    with running("streamrnn-soak-", ["metrics.port=0"], config) as (daemon, control):
        endpoint = daemon.endpoint
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        names = [f"soak-{i}" for i in range(num_streams)]
        workers = [context.Process(target=_produce, args=(
            endpoint, names[i::num_producers], seconds, i, results))
            for i in range(num_producers)]
        started = time.monotonic()
        for w in workers:
            w.start()
        samples = _sample(control, daemon.process.pid, started, seconds, echo)
        reports = [results.get(timeout=600) for _ in workers]
        for w in workers:
            w.join(timeout=60)
        books = _check_books(control, reports)
    latencies = [x for r in reports for x in r["latencies"]]
    rss = [s["rss_bytes"] for s in samples]
    half = rss[len(rss) // 2:] or rss
    result = {
        "streams": num_streams, "producers": num_producers, "seconds": seconds,
        "tokens_sent": books["sent"], "tokens_trained": books["trained"],
        "trained_tokens_per_s": books["trained_during_run"] / seconds,
        "ack_latency_s": latency_summary(latencies),
        "lost_tokens": books["lost"], "duplicated_tokens": books["duplicated"],
        "mismatched_streams": books["mismatched_streams"],
        "rss_bytes_first_half_max": max(rss[:len(rss) // 2] or rss),
        "rss_bytes_second_half_min": min(half), "rss_bytes_second_half_max": max(half),
        "rss_growth_second_half_bytes": half[-1] - half[0],
        "samples": samples, "config": config.to_dict(),
    }
    lat = result["ack_latency_s"]
    echo(f"trained {books['trained']:,} tokens ({result['trained_tokens_per_s']:,.0f}/s "
         f"while fed); ack latency p50 {lat['p50'] * 1e3:.1f} ms, p99 {lat['p99'] * 1e3:.1f} "
         f"ms, max {lat['max'] * 1e3:.1f} ms over {lat['count']:,} acks")
    echo(f"lost {books['lost']}, duplicated {books['duplicated']}, streams off "
         f"{books['mismatched_streams']}; daemon memory {rss[0] / 2**20:.0f} -> "
         f"{rss[-1] / 2**20:.0f} MiB, second half {min(half) / 2**20:.0f}..."
         f"{max(half) / 2**20:.0f} MiB")
    write_json(result, json_path, echo)
    return result


def _sample(control, pid: int, started: float, seconds: float, echo) -> list[dict]:
    samples, last_echo = [], 0.0
    while (elapsed := time.monotonic() - started) < seconds:
        time.sleep(min(5.0, max(0.5, seconds / 60)))
        status = control.status()
        samples.append({"t": round(elapsed, 1), "rss_bytes": _rss(pid),
                        "tokens_trained": status["tokens_trained"],
                        "streams": status["streams"], "queued": status["queued_tokens"]})
        if elapsed - last_echo >= 60:
            last_echo = elapsed
            s = samples[-1]
            echo(f"  {elapsed:5.0f} s: {s['tokens_trained']:>12,} trained, {s['streams']} "
                 f"streams, queue {s['queued']:,}, daemon {s['rss_bytes'] / 2**20:.0f} MiB")
    return samples


def _check_books(control, reports: list[dict]) -> dict:
    sent = {name: n for r in reports for name, n in r["sent"].items()}
    trained_during_run = control.status()["tokens_trained"]
    control.request({"type": "flush"})
    status = wait_trained(control, poll=0.5)
    mismatched = lost = 0
    for name, count in sent.items():
        have = control.position(name)
        if have != count:
            mismatched += 1
            lost += max(0, count - have)
    duplicated = max(0, status["tokens_received"] - sum(sent.values()))
    lost += max(0, sum(n - 1 for n in sent.values() if n) - status["tokens_trained"])
    return {"sent": sum(sent.values()), "trained": status["tokens_trained"],
            "trained_during_run": trained_during_run, "lost": lost,
            "duplicated": duplicated, "mismatched_streams": mismatched}


def _produce(endpoint: str, names: list[str], seconds: float, seed: int, results) -> None:
    from ..client import Producer
    texts = text_streams(len(names) + seed, 50_000)[seed:]
    stop = time.monotonic() + seconds
    with Producer(endpoint, retry_seconds=300, keep_latencies=True) as producer:
        sent = round_robin(producer, dict(zip(names, texts)), 512,
                           go_on=lambda: time.monotonic() < stop, wrap=True)
        producer.flush(timeout=600)
        latencies = producer.stats.ack_latencies
        if len(latencies) > 20_000:  # keep the report small; an even sample is enough
            latencies = latencies[::len(latencies) // 20_000]
        results.put({"sent": sent, "latencies": latencies})


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

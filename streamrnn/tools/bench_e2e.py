"""`streamrnn bench e2e`: the daemon end to end against the engine alone, in one run.

1. engine: streamrnn.Learner in this process trains the streams' text (the upper bound).
2. daemon: `streamrnn serve` in a subprocess, fed over tcp loopback by producer
   processes (the real client), as fast as its backpressure lets them; every stream
   wraps around its text, so none runs dry during the window.
Reported: tokens trained per second of each and their ratio; and, since the producers
share the machine's cores with the daemon (so that ratio measures contention too), the
daemon's own CPU seconds per trained token (its process_cpu_seconds_total) against the
engine's in-process CPU seconds per token, and the share of the daemon's wall time
spent in updates (streamrnn_update_duration_seconds) and outside them (decoding,
logging, replies, housekeeping, waiting). The CPU ratio holds on a busy machine: the
daemon's goal is >= 0.9, within 10% of the engine. Plus the producers' ack latency,
and the messages acknowledged per second (with small messages, `--chunk 16`, the
daemon's intake while it trains).
3. `--watch`: the same daemon (first wal mode, one rank) with a subscriber to every
   stream's lines and tokens on its score feed, reading them in a process of its own
   (what `streamrnn watch --all` costs the daemon): its tokens/s against the unwatched
   daemon's, and the records received and dropped.
4. `--nproc 1,2`: the same daemon as N ranks (serve --nproc N), the producers routing
   each stream to its rank. Reported beside tokens/s: each rank's time per update in
   the two all-reduces (streamrnn_collective_seconds: agree and gradients). On one
   machine's CPU cores the ranks share the cores: this measures the collectives'
   overhead, not a speed-up (README, "Scale-out", works out what N GPUs would give).
"""
from __future__ import annotations

import multiprocessing
import time
from ..config import Config
from .feeding import latency_summary, round_robin, widened, write_json
from .local import free_port, running
from .textdata import text_streams


def run(base: Config, num_streams: int, num_producers: int, seconds: float,
        json_path: str | None, echo=print, wal_modes: tuple[str, ...] = ("fsync",),
        nprocs: tuple[int, ...] = (1,), chunk: int = 1024, watch: bool = False) -> dict:
    from .bench_engine import _engine, machine_info
    from ..core.learner import resolve_device
    config = widened(base, num_streams)
    device = resolve_device(config.train.device)
    data = text_streams(num_streams, int(max(200_000, 40_000 * seconds)))
    echo(f"# streamrnn bench e2e on {machine_info(device)['device']}: {num_streams} "
         f"streams, {num_producers} producer processes, {seconds:g} s each, {chunk} "
         "tokens a message")
    tokens, elapsed, _, engine_cpu = _engine(config, data, device, seconds)
    engine_tps = tokens / elapsed
    engine_cpu_per_token = engine_cpu / max(1, tokens)
    echo(f"engine (in process)   {engine_tps:12,.0f} tokens/s   "
         f"{engine_cpu_per_token * 1e6:8.1f} CPU us/token")
    daemons = {}
    for mode in wal_modes:  # the same daemon with each write-ahead-log mode, in turn
        daemon = daemons[mode] = _measure_daemon(config, data, num_producers, seconds,
                                                 (f"wal.mode={mode}",), chunk=chunk)
        _report(echo, f"daemon, wal {mode:6s}", daemon, engine_tps, engine_cpu_per_token)
    watched = None
    if watch:
        watched = _measure_daemon(config, data, num_producers, seconds,
                                  (f"wal.mode={wal_modes[0]}",), chunk=chunk, watch=True)
        _report(echo, "daemon, watched     ", watched, engine_tps, engine_cpu_per_token)
        plain = daemons[wal_modes[0]]["tokens_per_s"]
        watched["vs_unwatched"] = watched["tokens_per_s"] / plain if plain else None
        echo(f"watched: {watched['vs_unwatched']:.3f}x the unwatched daemon's tokens/s; "
             f"{watched['score_records']:,} score records received, "
             f"{watched['score_records_missed']:,} dropped")
    by_nproc = {}
    for nproc in nprocs:  # the first wal mode, as N ranks
        if nproc == 1 and wal_modes[0] in daemons:
            by_nproc[1] = daemons[wal_modes[0]]
            continue
        daemon = by_nproc[nproc] = _measure_daemon(
            config, data, num_producers, seconds, (f"wal.mode={wal_modes[0]}",), nproc,
            chunk)
        _report(echo, f"daemon, {nproc} ranks  ", daemon, engine_tps, engine_cpu_per_token)
    for nproc, daemon in by_nproc.items():
        one = by_nproc.get(1)
        daemon["vs_one_rank"] = (daemon["tokens_per_s"] / one["tokens_per_s"]
                                 if one and one["tokens_per_s"] else None)
        if nproc > 1:
            versus = (f"{daemon['vs_one_rank']:.2f}x the tokens/s of one; "
                      if daemon["vs_one_rank"] else "")  # (one rank measured too: 1,N)
            echo(f"{nproc} ranks: {versus}"
                 f"per update, agree {daemon['agree_ms_per_update']:.2f} ms, gradient sum "
                 f"{daemon['gradients_ms_per_update']:.2f} ms of "
                 f"{daemon['update_ms']:.2f} ms")
    result = {"info": machine_info(device), "streams": num_streams,
              "producers": num_producers, "seconds": seconds, "tokens_per_message": chunk,
              "engine_tokens_per_s": engine_tps,
              "engine_cpu_seconds_per_token": engine_cpu_per_token,
              "daemon": daemons[wal_modes[0]],
              "daemon_by_wal_mode": daemons, "daemon_by_nproc": by_nproc,
              "daemon_watched": watched,
              "config": config.to_dict()}
    write_json(result, json_path, echo)
    return result


def _report(echo, label: str, daemon: dict, engine_tps: float,
            engine_cpu_per_token: float) -> None:
    daemon["vs_engine"] = daemon["tokens_per_s"] / engine_tps if engine_tps else None
    per_token = daemon["cpu_seconds_per_token"]
    daemon["cpu_vs_engine"] = engine_cpu_per_token / per_token if per_token else None
    lat = daemon["ack_latency_s"]
    echo(f"{label}  {daemon['tokens_per_s']:12,.0f} tokens/s   "
         f"{per_token * 1e6:8.1f} CPU us/token: {daemon['cpu_vs_engine']:.2f}x the "
         f"engine's efficiency ({daemon['vs_engine']:.2f}x its tokens/s); in updates "
         f"{daemon['update_share']:.0%} of the time, outside "
         f"{1 - daemon['update_share']:.0%}; ack latency p50 {lat['p50'] * 1e3:.1f} "
         f"ms, p99 {lat['p99'] * 1e3:.1f} ms over {lat['count']:,} acks "
         f"({daemon['acks_per_s']:,.0f} a second)")


def _measure_daemon(config: Config, data: list[bytes], num_producers: int, seconds: float,
                    extra_settings: tuple[str, ...], nproc: int = 1,
                    chunk: int = 1024, watch: bool = False) -> dict:
    metrics_port = free_port(nproc)  # rank r serves on metrics_port + r
    settings = [f"metrics.port={metrics_port}", *extra_settings]
    scrape = lambda: [_daemon_counters(f"http://127.0.0.1:{metrics_port + r}/metrics")
                      for r in range(nproc)]
    with running("streamrnn-bench-", settings, config, nproc) as (daemon, control):
        totals = (lambda: control.cluster_status()["totals"]) if nproc > 1 else control.status
        endpoint = daemon.endpoint
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        shares = [list(range(i, len(data), num_producers)) for i in range(num_producers)]
        workers = [context.Process(target=_produce, args=(
            endpoint, {f"s{j}": data[j] for j in share}, seconds + 5, chunk, results))
            for share in shares if share]
        watcher = None
        if watch:  # subscribed before the first byte is sent
            watcher = context.Process(target=_subscribe, args=(endpoint, results))
            watcher.start()
            if results.get(timeout=60) != "subscribed":
                raise RuntimeError("the score feed subscriber did not start")
            time.sleep(1.0)  # the subscription reaches the daemon
        for w in workers:
            w.start()
        # measure the training rate once the queue is full, for `seconds`
        time.sleep(min(5.0, seconds / 2))
        first, first_counters, t0 = totals(), scrape(), time.monotonic()
        time.sleep(seconds)
        last, last_counters, t1 = totals(), scrape(), time.monotonic()
        reports = [results.get(timeout=seconds + 120) for _ in workers]
        for w in workers:
            w.join(timeout=30)
        received = None
        if watcher is not None:
            watcher.terminate()  # SIGTERM: it reports what it received, then exits
            received = results.get(timeout=30)
            watcher.join(timeout=30)
    latencies = [x for r in reports for x in r["latencies"]]
    trained = last["tokens_trained"] - first["tokens_trained"]
    # per rank: counters over the window; CPU adds up, the rest is each rank's own
    deltas = [{k: b[k] - a[k] for k in a} for a, b in zip(first_counters, last_counters)]
    cpu = sum(d["cpu"] for d in deltas)
    updates = max(1.0, deltas[0]["updates"])  # global updates: the same on every rank
    mean = lambda key: sum(d[key] for d in deltas) / len(deltas)
    return {"nproc": nproc, "tokens_per_s": trained / (t1 - t0),
            "cpu_seconds_per_token": cpu / trained if trained else None,
            "update_share": mean("in_updates") / (t1 - t0),
            "updates_per_s": deltas[0]["updates"] / (t1 - t0),
            "update_ms": 1e3 * mean("in_updates") / updates,
            "agree_ms_per_update": 1e3 * mean("agree") / updates,
            "gradients_ms_per_update": 1e3 * mean("gradients") / updates,
            "tokens_acked": sum(r["acked"] for r in reports),
            "busy_replies": sum(r["busy"] for r in reports),
            # every producer's acks over its sending time, summed
            "acks_per_s": sum(len(r["latencies"]) / r["elapsed"] for r in reports),
            "ack_latency_s": latency_summary(latencies),
            **({"score_records": received["records"],
                "score_records_missed": received["missed"]} if received else {})}


def _subscribe(endpoint: str, results) -> None:
    """A subscriber to every stream's line and tokens records, as fast as it can read;
    on SIGTERM it reports the records received and those it missed (dropped)."""
    import signal
    from ..client import Scores
    counts = {"records": 0, "missed": 0}

    def report(*_):
        results.put(counts)
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, report)
    with Scores.of(endpoint, kinds=("line", "tokens")) as scores:
        results.put("subscribed")
        for record in scores:
            counts["records"] += 1
            counts["missed"] += record["missed"]


def _produce(endpoint: str, streams: dict[str, bytes], seconds: float, chunk: int,
             results) -> None:
    """One producer process: send its streams round-robin for `seconds` (wrapping around
    their text, so none runs dry), then report."""
    from ..client import Producer, Unreachable
    started = time.monotonic()
    stop = started + seconds
    # a daemon that took a big backlog before it knew its training rate answers busy for
    # longer than the window measured: then this producer stops early (the daemon
    # trains what it holds meanwhile, which is what is measured)
    with Producer(endpoint, retry_seconds=seconds, keep_latencies=True) as producer:
        try:
            round_robin(producer, streams, chunk, go_on=lambda: time.monotonic() < stop,
                        wrap=True)
            producer.flush(timeout=60)  # the window is over: the tail adds ack latencies
        except Unreachable:
            pass
        results.put({"acked": producer.stats.tokens_acked, "busy": producer.stats.busy,
                     "elapsed": time.monotonic() - started,
                     "unacked": producer.unacked, "latencies": producer.stats.ack_latencies})


COUNTERS = {"process_cpu_seconds_total": "cpu",
            "streamrnn_update_duration_seconds_sum": "in_updates",
            "streamrnn_updates_total": "updates",
            'streamrnn_collective_seconds_sum{kind="agree"}': "agree",
            'streamrnn_collective_seconds_sum{kind="gradients"}': "gradients"}


def _daemon_counters(url: str) -> dict[str, float]:
    """A rank's CPU seconds, seconds in updates, updates and seconds in each kind of
    collective, from its /metrics."""
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in COUNTERS:
            values[COUNTERS[name]] = float(value)
    return values

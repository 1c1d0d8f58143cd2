"""The `streamrnn` command: one subcommand per job, each with its own --help."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import ConfigError, IngestConfig, endpoint_problem, format_config, load_config
from .wire import REQUEST_TYPES

DEFAULT_ENDPOINT = IngestConfig().endpoint
# the folder the systemd unit's StateDirectory= gives, for messages that suggest one
SERVICE_CHECKPOINTS = "/var/lib/streamrnn/checkpoints"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except ConfigError as e:
        print(f"streamrnn: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrnn",
        description="Learn recurrent language models online from live token streams.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    answered = [t for t in REQUEST_TYPES if t != "tokens"]
    p = sub.add_parser("serve", help="run the daemon (until SIGTERM/SIGINT)",
                       description="Bind the ZeroMQ ingest endpoint and the metrics endpoint, "
                       "learn from every stream producers send (tokens requests), and answer "
                       f"{', '.join(answered[:-1])} and {answered[-1]} requests. See README, "
                       "'Wire protocol'.")
    _config_options(p)
    p.add_argument("--fresh", action="store_true", help="start from scratch even though "
                   "checkpoint.dir holds state (it is moved aside, not deleted)")
    p.set_defaults(run=_serve)

    p = sub.add_parser("checkpoint", help="save, list or inspect checkpoints",
                       description="save: ask a running daemon to write a checkpoint now. "
                       "list: the checkpoints in a folder. inspect PATH: one checkpoint.")
    p.add_argument("action", choices=("save", "list", "inspect"))
    p.add_argument("path", nargs="?", help="inspect: the checkpoint file; list: the folder "
                   "(default: checkpoint.dir of --config, else $STATE_DIRECTORY, else "
                   f"./streamrnn-state, plus /checkpoints; the service's is "
                   f"{SERVICE_CHECKPOINTS})")
    _endpoint_option(p)
    p.add_argument("--config", metavar="FILE", help="list: take checkpoint.dir from here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=300, help="save: seconds to wait for "
                   "the daemon to write it (300)")
    p.set_defaults(run=_checkpoint)

    p = sub.add_parser("feed", help="send files or stdin to the daemon as byte streams",
                       description="Send each FILE as a stream of byte tokens (named by its "
                       "path, or all to --stream), appended at the stream's end, with "
                       "backpressure and resends; waits until the daemon acknowledged all of "
                       "it. '-' reads stdin (stream 'stdin'). Exits 1 with a message if the "
                       "daemon is unreachable or refuses the data.")
    p.add_argument("files", nargs="+", metavar="FILE", help="file to send, or - for stdin")
    _endpoint_option(p)
    p.add_argument("--stream", help="send everything to this one stream, in order")
    p.add_argument("--retry-seconds", type=float, default=60, help="keep retrying this long "
                   "without progress (daemon restarting, busy) before giving up (60)")
    p.add_argument("--chunk", type=_positive_int, default=4096, help="bytes per message, at "
                   "most (4096; from a pipe, whatever has arrived is sent at once)")
    p.add_argument("--no-flush", dest="flush", action="store_false", help="do not ask the "
                   "daemon to train the streams' last bytes right away at the end")
    p.set_defaults(run=_feed)

    p = sub.add_parser("status", help="ask a running daemon how it is doing",
                       description="Updates, streams, tokens received and trained, recent "
                       "bits/token and throughput, uptime.")
    _endpoint_option(p)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.add_argument("--timeout", type=float, default=5, help="seconds to wait for an "
                   "answer (5)")
    p.set_defaults(run=_status)

    p = sub.add_parser("keys", help="generate CURVE key pairs for the daemon and producers",
                       description="keys generate DIR --name NAME writes DIR/NAME.key (public: "
                       "give it to the other side) and DIR/NAME.key_secret (secret, mode 0600: "
                       "it stays here). The daemon's public key goes to its producers; each "
                       "producer's public key goes into the daemon's ingest.curve_allowed_keys "
                       "folder.")
    p.add_argument("action", choices=("generate",))
    p.add_argument("directory", help="where to write the two files")
    p.add_argument("--name", required=True, help="file name stem, e.g. server or producer-1")
    p.add_argument("--force", action="store_true", help="replace an existing NAME.key and "
                   "NAME.key_secret (whoever holds the old public key is locked out)")
    p.set_defaults(run=_keys)

    p = sub.add_parser("demo", help="the whole system live: daemon, producers, learning",
                       description="Start `streamrnn serve` on its defaults in a temporary "
                       "folder, feed Python standard library sources to it as parallel byte "
                       "streams through the producer client, show bits/byte falling, then a "
                       "summary and a text sampled from the learned model.")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   dest="overrides", help="a setting for the demo's daemon (repeatable)")
    p.add_argument("--seconds", type=float, default=120, help="how long to feed (120)")
    p.add_argument("--streams", type=_positive_int, default=8, help="source files fed in "
                   "parallel (8)")
    p.add_argument("--chunk", type=_positive_int, default=256, help="bytes per stream per "
                   "turn (256)")
    p.set_defaults(run=_demo)

    p = sub.add_parser("bench", help="time the engine against the baselines, JSON out",
                       description="Tokens trained per second of the engine (through the "
                       "public API) next to a plain recompute baseline and the seed "
                       "question's LSTMCell loops, measured in the same run. Defaults: "
                       "optimizer sgd, lr 0.05, the settings of the reference figures for "
                       "H100 and H200 cards (ANCHORS in streamrnn/bench.py) that a GPU run "
                       "prints alongside.")
    _config_options(p)
    p.add_argument("--configs", help="comma-separated presets (default: small,small_b64 on "
                   "CPU; small,small_b256,small_b1024,large,large_b4096 on a GPU); all: "
                   "small, small_b64, small_b256, small_b1024, large, large_b4096")
    p.add_argument("--strategies", help="comma-separated: engine, engine_bf16, recompute, "
                   "seed_chunk_cell, seed_sliding_cell (default: all, bf16 on GPU only)")
    p.add_argument("--seconds", type=float, default=None, help="time per strategy and "
                   "config (12); --e2e: feeding time (12); --soak: length of the run (600)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="interleaved rounds, the "
                   "median counts (3)")
    p.add_argument("--json", default="streamrnn-bench.json", help="where to write results "
                   "(streamrnn-bench.json)")
    p.add_argument("--e2e", action="store_true", help="instead: the daemon fed by producer "
                   "processes over tcp loopback, next to the engine alone, plus ack latency")
    p.add_argument("--streams", type=int, default=64, help="--e2e: streams (64)")
    p.add_argument("--producers", type=int, default=4, help="--e2e: producer processes (4)")
    p.add_argument("--soak", action="store_true", help="instead: many producers and streams "
                   "for --seconds (600 if not given: memory takes minutes to level off), "
                   "checking that nothing is lost or duplicated and that memory levels off")
    p.add_argument("--wal-modes", default="fsync", help="--e2e: comma-separated wal.mode "
                   "values to measure in turn, e.g. fsync,async,off (fsync)")
    p.set_defaults(run=_bench)

    p = sub.add_parser("config", help="check a config and print it resolved",
                       description="Load defaults, the file and overrides, validate, and "
                       "print the result as TOML with every key documented.")
    _config_options(p, print_flag=False)
    p.set_defaults(run=_config)
    return parser


def _config_options(p: argparse.ArgumentParser, print_flag: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   dest="overrides", help="override one setting (repeatable), "
                   "e.g. --set train.k1=16")
    if print_flag:
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _endpoint(text: str) -> str:
    """A daemon's endpoint, checked here: ZeroMQ would answer a typo with a traceback,
    and wrap a port past 65535 around to another one."""
    problem = endpoint_problem(text, bind=False)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} (from --endpoint or "
                                         f"$STREAMRNN_ENDPOINT): {problem}")
    return text


def _endpoint_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", type=_endpoint,
                   default=os.environ.get("STREAMRNN_ENDPOINT", DEFAULT_ENDPOINT),
                   help=f"the daemon's ingest endpoint (default $STREAMRNN_ENDPOINT or "
                   f"{DEFAULT_ENDPOINT})")
    p.add_argument("--server-key", default=os.environ.get("STREAMRNN_SERVER_KEY"),
                   metavar="FILE", help="CURVE: the daemon's public key file (NAME.key; "
                   "default $STREAMRNN_SERVER_KEY)")
    p.add_argument("--client-key", default=os.environ.get("STREAMRNN_CLIENT_KEY"),
                   metavar="FILE", help="CURVE: this producer's secret key file "
                   "(NAME.key_secret; default $STREAMRNN_CLIENT_KEY)")


def _producer(args, **options):
    from .client import Producer
    return Producer(args.endpoint, server_key=args.server_key, client_key=args.client_key,
                    **options)


def _load(args, defaults=()):
    config = load_config(args.config, [*defaults, *args.overrides])
    if getattr(args, "print_config", False):
        print(format_config(config), end="")
        return None
    return config


def _config(args) -> int:
    print(format_config(load_config(args.config, args.overrides)), end="")
    return 0


def _keys(args) -> int:
    from . import keys as auth
    try:
        public, secret = auth.generate(args.directory, args.name, force=args.force)
    except auth.KeyError_ as e:
        print(f"streamrnn keys: {e}", file=sys.stderr)
        return 2
    print(f"public key: {public}   (give this one to the other side)")
    print(f"secret key: {secret}   (mode 0600: keep it here)")
    return 0


def _serve(args) -> int:
    from .serve import daemon
    config = _load(args)
    return 0 if config is None else daemon.serve(config, fresh=args.fresh)


def _checkpoint(args) -> int:
    from .serve import checkpoint
    if args.action == "save":
        from .client import ProducerError
        try:
            # a daemon that is not there is reported within 10 s; one that is there gets
            # --timeout to write (a big model's checkpoint takes minutes)
            with _producer(args, retry_seconds=min(10.0, args.timeout),
                           reply_timeout=args.timeout) as producer:
                reply = producer.request({"type": "checkpoint"})
        except ProducerError as e:
            print(f"streamrnn checkpoint: {e}", file=sys.stderr)
            return 1
        if not reply.get("ok"):
            print(f"streamrnn checkpoint: {reply.get('error')}", file=sys.stderr)
            return 1
        print(json.dumps(reply) if args.json else f"saved {reply['path']} "
              f"(log position {reply['wal_seq']}, {reply['seconds']} s)")
        return 0
    if args.action == "inspect":
        if not args.path:
            print("streamrnn checkpoint inspect: which file? (PATH)", file=sys.stderr)
            return 2
        paths = [args.path]
    else:
        folder, origin = _checkpoint_folder(args)
        if not folder.is_dir():
            print(f"streamrnn checkpoint list: {folder.absolute()} does not exist" + (
                  f"{origin}. Name the folder, e.g. `streamrnn checkpoint list "
                  f"{SERVICE_CHECKPOINTS}` for the systemd service" if origin else ""),
                  file=sys.stderr)
            return 1
        paths = sorted(folder.glob("checkpoint-*.pt"), reverse=True)
        if not paths and not args.json:
            print(f"no checkpoints in {folder}")
    rows = []
    for path in paths:
        try:
            rows.append({"path": str(path), **checkpoint.summary(checkpoint.load(path))})
        except checkpoint.CheckpointError as e:
            rows.append({"path": str(path), "error": str(e)})
    if args.json:
        print(json.dumps(rows[0] if args.action == "inspect" else rows, indent=1))
    else:
        for row in rows:
            print(format_checkpoint(row, full=args.action == "inspect"))
    return 1 if any("error" in r for r in rows) else 0


def _checkpoint_folder(args):
    """The folder `checkpoint list` reads, and how it was chosen (for the message when it
    is not there: the default depends on the environment, so say which one applied)."""
    from pathlib import Path
    if args.path:
        return Path(args.path), ""
    checkpoint = load_config(args.config).checkpoint
    origin = checkpoint.resolved_dir_origin()
    if checkpoint.dir:
        origin += f" in {args.config}"
    folder = Path(checkpoint.resolved_dir()) / "checkpoints"
    return folder, f"; it is {origin} plus /checkpoints"


def format_checkpoint(row: dict, full: bool) -> str:
    if "error" in row:
        return f"{row['path']}: UNREADABLE: {row['error']}"
    import time as _time
    created = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(row["created"]))
    bpt = f"{row['bits_per_token']:.3f}" if row["bits_per_token"] is not None else "-"
    line = (f"{row['path']}: {created}, {row['updates']:,} updates, {row['streams']:,} "
            f"streams, {row['tokens_trained']:,} tokens trained, {bpt} bits/token, log "
            f"position {row['wal_seq']}")
    if not full:
        return line
    model, train = row["config"]["model"], row["config"]["train"]
    return "\n".join([line, f"  model: {model['kind']} {model['num_layers']}x"
                      f"{model['hidden_size']}, vocab {model['vocab_size']}, embed "
                      f"{model['embed_dim']}; TBPTT({train['k1']}, {train['k2']}), "
                      f"{train['optimizer']} lr {train['lr']}", f"  version {row['version']}"])


def _feed(args) -> int:
    from . import feed
    return feed.run(args.endpoint, args.files, args.stream, args.retry_seconds, args.chunk,
                    args.flush, keys=(args.server_key, args.client_key))


def _status(args) -> int:
    from .client import ProducerError
    try:
        with _producer(args, retry_seconds=args.timeout,
                       reply_timeout=args.timeout) as producer:
            status = producer.status()
    except ProducerError as e:
        print(f"streamrnn status: {e}", file=sys.stderr)
        return 1
    status.pop("type", None)
    status.pop("id", None)
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        print(format_status(status))
    return 0


def format_status(s: dict) -> str:
    bits = s.get("recent_bits_per_token")
    hours, rest = divmod(int(s["uptime_seconds"]), 3600)
    return "\n".join([
        f"streamrnn {s['version']} on {s['device']}, up {hours}h{rest // 60:02d}m"
        f"{rest % 60:02d}s: {s['model']}, TBPTT({s['tbptt'][0]}, {s['tbptt'][1]})",
        f"updates         {s['updates']:,}",
        f"streams         {s['streams']:,}",
        f"tokens received {s['tokens_received']:,}  (queued, not trained yet: "
        f"{s['queued_tokens']:,})",
        f"tokens trained  {s['tokens_trained']:,}  ({s['bits'] / max(1, s['tokens_trained']):.3f}"
        f" bits/token over the model's life)",
        f"recent          {s['recent_tokens_per_second']:,.0f} tokens/s, "
        + (f"{bits:.3f} bits/token" if bits is not None else "no training in the last minute"),
        f"last checkpoint {format_saved(s['last_checkpoint'])}",
    ])


def format_saved(saved: dict | None) -> str:
    """The status's last checkpoint: path, log position and how long ago it was written.
    The age comes from the daemon when it says (`created`), else from the file itself,
    which is found when status runs on the daemon's host (a relative path: in the
    daemon's working folder)."""
    if not saved:
        return "none yet"
    import time as _time
    created = saved.get("created")
    if created is None:
        try:
            created = os.stat(saved["path"]).st_mtime
        except OSError:
            pass
    age = ("age unknown: the file is not readable from here" if created is None
           else f"written {_duration(_time.time() - created)} ago")
    return f"{saved['path']} (log position {saved['wal_seq']:,}, {age})"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _demo(args) -> int:
    from .tools import demo
    load_config(None, args.overrides)  # a bad --set stops here, with its message
    return demo.run(args.overrides, args.seconds, args.streams, args.chunk)


def _bench(args) -> int:
    from .tools import bench_engine as bench
    config = _load(args, defaults=("train.optimizer=sgd", "train.lr=0.05"))
    if config is None:
        return 0
    seconds = bench_seconds(args)
    if args.soak:
        from .tools import bench_soak
        bench_soak.run(config, args.streams, args.producers, seconds, args.json)
    elif args.e2e:
        from .tools import bench_e2e
        bench_e2e.run(config, args.streams, args.producers, seconds, args.json,
                      wal_modes=tuple(args.wal_modes.split(",")))
    else:
        bench.run(args.configs, args.strategies, seconds, config, args.json,
                  rounds=args.rounds)
    return 0


def bench_seconds(args) -> float:
    """--seconds, else the default of the kind of run: a soak is about memory levelling
    off and rare losses (minutes), not the 12 s that time one strategy well enough."""
    if args.seconds is not None:
        return args.seconds
    return 600.0 if args.soak else 12.0

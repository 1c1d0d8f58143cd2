"""The `streamrnn` command: one subcommand per job, each with its own --help."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import ConfigError, IngestConfig, endpoint_problem, format_config, load_config
from .report import format_checkpoint, format_cluster_status, format_status
from .wire import REQUEST_TYPES

DEFAULT_ENDPOINT = IngestConfig().endpoint
# the folder the systemd unit's StateDirectory= gives, for messages that suggest one
SERVICE_CHECKPOINTS = "/var/lib/streamrnn"
BENCH_MODES = ("engine", "e2e", "soak", "quality", "contention", "anomaly")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(with_bench_mode(sys.argv[1:] if argv is None else argv))
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


def with_bench_mode(argv: list[str]) -> list[str]:
    """`streamrnn bench [options]` is `streamrnn bench engine [options]`: argparse has no
    default subcommand, so the mode is put in when none is named (nor --help asked)."""
    argv = list(argv)
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in (*BENCH_MODES, "-h",
                                                                   "--help")):
        argv.insert(1, "engine")
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrnn",
        description="Learn recurrent language models online from live token streams.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in (_add_serve, _add_checkpoint, _add_feed, _add_status, _add_watch, _add_keys,
                _add_demo, _add_bench, _add_config):
        add(sub)
    return parser


def _subcommands(p: argparse.ArgumentParser, what: str):
    """The subcommands of `p`, one of which must be named."""
    return p.add_subparsers(title=f"{what}s", metavar=what.upper(), dest=what,
                            required=True)


def _add_serve(sub) -> None:
    answered = [t for t in REQUEST_TYPES if t != "tokens"]
    p = sub.add_parser("serve", help="run the daemon (until SIGTERM/SIGINT)",
                       description="Bind the ZeroMQ ingest endpoint and the metrics endpoint, "
                       "learn from every stream producers send (tokens requests), and answer "
                       f"{', '.join(answered[:-1])} and {answered[-1]} requests. See README, "
                       "'Wire protocol'.")
    _config_options(p)
    p.add_argument("--fresh", action="store_true", help="start from scratch even though "
                   "checkpoint.dir holds state (it is moved aside, not deleted)")
    p.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                   help="run N ranks on this machine, one model, streams shared out by key "
                   "group (torchrun's launcher in this process; one per GPU). 1: one "
                   "process, no torchrun (1)")
    p.add_argument("--max-restarts", type=int, default=3, metavar="R",
                   help="with --nproc: when a rank dies, restart all ranks up to R times "
                   "(each machine counts its own); they recover from their logs (3)")
    p.add_argument("--nnodes", type=_positive_int, default=1, metavar="M",
                   help="run on M machines, --nproc ranks on each: start this same command "
                   "on every machine, checkpoint.dir on storage they share (1)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="with --nnodes: where the machines meet (torchrun's c10d "
                   "rendezvous): a port on one of them that the others reach")
    p.set_defaults(run=_serve)


def _add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="save, list or inspect checkpoints",
                       description="save: ask a running daemon to write a checkpoint now. "
                       "list: the checkpoints in a folder. inspect PATH: one checkpoint. "
                       "Each has its own --help.")
    actions = _subcommands(p, "action")
    p = actions.add_parser("save", help="ask a running daemon to write a checkpoint now",
                           description="Ask a running daemon (any rank) to write a "
                           "checkpoint now; answered once it is committed, or with the "
                           "last one when nothing changed since.")
    _endpoint_option(p)
    _json_flag(p)
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the "
                   "daemon to write it (300)")
    p.set_defaults(run=_checkpoint_save)
    p = actions.add_parser("list", help="the checkpoints in a state folder",
                           description="The committed checkpoints in a state folder, "
                           "newest first, whatever number of ranks wrote them; the one "
                           "the next start loads is marked.")
    p.add_argument("path", nargs="?", metavar="PATH", help="the state folder (default: "
                   "checkpoint.dir of --config, else $STATE_DIRECTORY, else "
                   f"./streamrnn-state; the service's is {SERVICE_CHECKPOINTS})")
    p.add_argument("--config", metavar="FILE", help="take checkpoint.dir from here")
    _json_flag(p)
    p.set_defaults(run=_checkpoint_list)
    p = actions.add_parser("inspect", help="one checkpoint",
                           description="One checkpoint, every file of it read: time, "
                           "ranks, log positions, updates, streams, bits/token, model and "
                           "training settings, version.")
    p.add_argument("path", metavar="PATH", help="its manifest, "
                   "STATE/checkpoints/checkpoint-C.json (what `status` and `checkpoint "
                   "save` name)")
    _json_flag(p)
    p.set_defaults(run=_checkpoint_inspect)


def _json_flag(p: argparse.ArgumentParser, what: str = "machine-readable output") -> None:
    p.add_argument("--json", action="store_true", help=what)


def _add_feed(sub) -> None:
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


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="ask a running daemon how it is doing",
                       description="Updates, streams, tokens received and trained, recent "
                       "bits/token and throughput, uptime. Given any rank of a cluster: a "
                       "line for every rank, then the cluster's totals; exits 1 if a rank "
                       "does not answer.")
    _endpoint_option(p)
    _json_flag(p, "print the raw status as JSON (of a cluster: every rank's, and the "
               "totals)")
    p.add_argument("--timeout", type=float, default=5, help="seconds to wait for an "
                   "answer (5)")
    p.set_defaults(run=_status)


def _add_watch(sub) -> None:
    p = sub.add_parser("watch", help="print the lines the model did not expect, as they "
                       "are trained", description="Subscribe to the daemon's score feed "
                       "(every rank's, found from the ingest endpoint) and print each line "
                       "that surprised the model: by default the lines that score at least "
                       "0.999, their rank among their stream's recent lines by bits per "
                       "token. On a terminal, the surprising bytes are highlighted. Runs "
                       "until Ctrl-C; reconnects by itself when the daemon restarts (lines "
                       "it replays may come again: the same stream, line and offset).")
    _endpoint_option(p)
    p.add_argument("--scores-endpoint", action="append", default=[], metavar="E",
                   help="the score feed itself (repeat for every rank), instead of asking "
                   "the daemon at --endpoint")
    p.add_argument("--stream", action="append", default=[], metavar="S",
                   help="this stream only (repeat for several; default: every stream)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every line")
    which.add_argument("--above", type=float, metavar="BITS_PER_TOKEN",
                       help="the lines above this many bits per token")
    which.add_argument("--top-quantile", type=_quantile, default=0.999, metavar="Q",
                       help="the lines scoring at least Q, in 0 .. 1 (0.999)")
    _json_flag(p, "one JSON object per line record (stream, line, offset, tokens, bits, "
               "bits_per_token, score, complete, worst, text, token_bits, seq, run, "
               "missed, restarted)")
    p.set_defaults(run=_watch)


def _quantile(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in 0 .. 1")
    return value


def _add_keys(sub) -> None:
    p = sub.add_parser("keys", help="generate CURVE key pairs for the daemon and producers",
                       description="keys generate DIR --name NAME: a CURVE key pair (see "
                       "streamrnn keys generate --help).")
    p = _subcommands(p, "action").add_parser(
        "generate", help="write one key pair",
        description="Write DIR/NAME.key (public: give it to the other side) and "
        "DIR/NAME.key_secret (secret, mode 0600: it stays here). The daemon's public key "
        "goes to its producers; each producer's public key goes into the daemon's "
        "ingest.curve_allowed_keys folder.")
    p.add_argument("directory", metavar="DIR", help="where to write the two files")
    p.add_argument("--name", required=True, help="file name stem, e.g. server or producer-1")
    p.add_argument("--force", action="store_true", help="replace an existing NAME.key and "
                   "NAME.key_secret (whoever holds the old public key is locked out)")
    p.set_defaults(run=_keys)


def _add_demo(sub) -> None:
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


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time the engine, the daemon end to end, a soak, or "
                       "a shared host; measure learning quality and anomaly detection",
                       description="Six modes, each with its own --help; plain `streamrnn "
                       "bench [options]` is `streamrnn bench engine [options]`. engine, "
                       "e2e, soak and contention time the reference config of the project's "
                       "figures (a 1x256 LSTM without skip connections, TBPTT(32, 128), sgd at a "
                       "constant lr 0.05) unless --set says otherwise; quality and anomaly "
                       "run the config `streamrnn serve` would.")
    modes = _subcommands(p, "mode")
    for add in (_add_bench_engine, _add_bench_e2e, _add_bench_soak, _add_bench_quality,
                _add_bench_contention, _add_bench_anomaly):
        add(modes)


def _add_bench_engine(modes) -> None:
    p = modes.add_parser("engine", help="the engine against the baselines, JSON out "
                         "(the default)",
                         description="Tokens trained per second of the engine (through the "
                         "public API) next to a plain recompute baseline and the seed "
                         "question's LSTMCell loops, measured in the same run. Defaults: "
                         "TBPTT(32, 128), no skip connections, optimizer sgd at a constant "
                         "lr 0.05, the settings of the reference figures for "
                         "H100 and H200 cards (ANCHORS in streamrnn/bench.py) that a GPU run "
                         "prints alongside.")
    _bench_options(p, 12, "time per strategy and config (12)")
    p.add_argument("--configs", help="comma-separated presets (default: small,small_b64 on "
                   "CPU; small,small_b256,small_b1024,large,large_b4096 on a GPU); all: "
                   "small, small_b64, small_b256, small_b1024, large, large_b4096")
    p.add_argument("--strategies", help="comma-separated: engine, engine_bf16, recompute, "
                   "seed_chunk_cell, seed_sliding_cell (default: all, bf16 on GPU only)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="interleaved rounds, the "
                   "median counts (3)")
    p.set_defaults(run=_bench_engine)


def _add_bench_e2e(modes) -> None:
    p = modes.add_parser("e2e", help="the daemon fed over tcp loopback, next to the engine",
                         description="Start a daemon (once per --wal-modes value), feed it "
                         "from producer processes over tcp loopback, and report its trained "
                         "tokens/s next to the engine alone on the same config and text, "
                         "plus ack latency p50/p99/max.")
    _bench_options(p, 12, "feeding time (12)")
    _load_options(p)
    p.add_argument("--wal-modes", default="fsync", help="comma-separated wal.mode values "
                   "to measure in turn, e.g. fsync,async,off (fsync)")
    p.add_argument("--nproc", default="1", metavar="N,M", help="comma-separated numbers "
                   "of ranks to measure in turn (serve --nproc; the first wal mode), e.g. "
                   "1,2: the cost of the collectives, and each one's time per update (1)")
    p.add_argument("--chunk", type=_positive_int, default=1024, metavar="TOKENS",
                   help="tokens per message; small ones (e.g. 16) measure how many "
                   "messages a second the daemon acknowledges while it trains (1024)")
    p.add_argument("--watch", action="store_true", help="also measure the daemon with a "
                   "subscriber to every stream's line and tokens scores (what `streamrnn "
                   "watch --all` costs it), beside the unwatched one")
    p.set_defaults(run=_bench_e2e)


def _add_bench_soak(modes) -> None:
    p = modes.add_parser("soak", help="many producers and streams for a long time, "
                         "nothing lost", description="Many producers and streams for "
                         "--seconds, then check the books (every stream's offset, tokens "
                         "received and trained: nothing lost or duplicated) and that the "
                         "daemon's memory levels off; reports throughput and ack latency.")
    _bench_options(p, 600, "length of the run (600): memory takes minutes to level off")
    _load_options(p)
    p.set_defaults(run=_bench_soak)


def _add_bench_contention(modes) -> None:
    p = modes.add_parser("contention", help="the engine alone and beside busy processes, "
                         "for each train.cpu_threads",
                         description="The engine's tokens/s (preset small, one stream) "
                         "alone and while other processes spin on the cores, once for each "
                         "--threads value, each in a process of its own: training on a "
                         "shared host should slow in proportion to the cores it loses, not "
                         "collapse.")
    _bench_options(p, 8, "time per measurement (8)")
    p.add_argument("--threads", default="0,1,2", help="comma-separated train.cpu_threads "
                   "values to measure in turn (0,1,2; 0 = what a daemon picks by "
                   "default)")
    p.add_argument("--hogs", type=_positive_int, help="busy processes beside it (half "
                   "the cores, at least 1)")
    p.set_defaults(run=_bench_contention)


def _add_bench_quality(modes) -> None:
    from .tools.corpora import CORPORA
    names = ", ".join(f"{c.name} ({c.kind}, {c.role})" for c in CORPORA.values())
    p = modes.add_parser("quality", help="how well the daemon learns, next to xz, bzip2, "
                         "gzip and PPMd",
                         description="For each corpus: start a daemon on the config "
                         "`streamrnn serve` would run (defaults, --config, --set), feed it "
                         "the corpus's first --bytes once, cut into --streams parallel byte "
                         "streams, over tcp loopback; report its prequential bits/byte (each "
                         "byte predicted before the model learned from it: what a coder "
                         "driven by the model would need) and its bytes/s, beside xz -9e, "
                         "bzip2 -9, gzip -9 and 7-Zip's PPMd (order 8) on the same bytes. "
                         "The corpora are real text found on this machine: source code, "
                         "prose, and structured records and logs, each once to tune the "
                         "defaults on and once held out, so a default fitted to one text "
                         "shows. The prose corpora need Debian's packages (apt-get install "
                         "python3.11-doc debian-handbook), PPMd needs a 7z binary (apt-get "
                         "install p7zip-full); a corpus that is not there is skipped, saying "
                         "what to install.")
    _config_options(p)
    p.add_argument("--corpora", default=",".join(CORPORA), metavar="NAMES",
                   help=f"comma-separated corpora (default: all): {names}; or path:FILE, "
                   "any file")
    p.add_argument("--bytes", type=_positive_int, default=1 << 20, dest="max_bytes",
                   metavar="N", help="the first this many bytes of each corpus, all of it "
                   "if shorter (1048576)")
    p.add_argument("--streams", type=_positive_int, default=16, help="parallel streams, "
                   "each a contiguous part of the bytes (16)")
    p.add_argument("--json", metavar="FILE", help="also write the results here, as JSON")
    p.add_argument("--in-process", action="store_true", help="feed a Learner in this "
                   "process the same way instead of a daemon: the engine's learning "
                   "without sockets (for a machine without pyzmq, such as a bare GPU box)")
    p.set_defaults(run=_bench_quality)


def _add_bench_anomaly(modes) -> None:
    p = modes.add_parser("anomaly", help="how well the score feed finds unusual log lines, "
                         "next to zlib and an order-3 model",
                         description="For each log, start a daemon on the config `streamrnn "
                         "serve` would run, subscribe to its score feed, and feed it a real "
                         "log from loghub as one stream (--together: every log to one "
                         "daemon at once): BGL_2k (alerts labelled per line) "
                         "and six logs with foreign lines and garbled spans injected into "
                         "their second half. Report, on each log's second half, AUC-ROC, "
                         "AUC-PR and the best F1 of the model's line scores (bits per token, "
                         "and the score watch filters on) beside zlib with 32 KiB of history "
                         "and an order-3 byte model on the same bytes. The logs are looked "
                         "for in $STREAMRNN_LOGHUB, else ../shared/data/loghub.")
    _config_options(p)
    p.add_argument("--logs", metavar="NAMES", help="comma-separated logs (default: all): "
                   "BGL, Linux+injected, Apache+injected, Hadoop+injected, HPC+injected, "
                   "Proxifier+injected, OpenStack+injected")
    p.add_argument("--seed", type=int, default=0, help="where the anomalies are injected (0)")
    p.add_argument("--together", action="store_true", help="every log to one daemon, a "
                   "stream each (one model learns them all), instead of each log to a daemon "
                   "of its own in turn (a model per log, as each baseline sees one log)")
    p.add_argument("--json", metavar="FILE", help="also write the results here, as JSON")
    p.set_defaults(run=_bench_anomaly)


def _bench_options(p: argparse.ArgumentParser, seconds: float, seconds_help: str) -> None:
    """What every bench mode takes: the config, --seconds (its own default) and --json;
    and a clear refusal of the old spellings of the modes."""
    _config_options(p)
    p.add_argument("--seconds", type=float, default=seconds, help=seconds_help)
    p.add_argument("--json", default="streamrnn-bench.json", help="where to write results "
                   "(streamrnn-bench.json)")
    for mode in ("e2e", "soak"):  # the old spellings, `bench --e2e` and `bench --soak`
        p.add_argument(f"--{mode}", nargs=0, action=_NowAMode, help=argparse.SUPPRESS)


def _load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", type=int, default=64, help="streams (64)")
    p.add_argument("--producers", type=int, default=4, help="producer processes (4)")


class _NowAMode(argparse.Action):
    """Refuses `bench --e2e` and `bench --soak`, naming the new spelling."""
    def __call__(self, parser, namespace, values, option_string=None):
        mode = option_string.lstrip("-")
        parser.exit(2, f"streamrnn bench: {option_string} is now a mode of its own: "
                    f"streamrnn bench {mode} ... (see streamrnn bench {mode} --help)\n")


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="check a config and print it resolved",
                       description="Load defaults, the file and overrides, validate, and "
                       "print the result as TOML with every key documented.")
    _config_options(p, print_flag=False)
    p.set_defaults(run=_config)


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
    from .serve import launch
    config = _load(args)
    if config is None:
        return 0
    if (args.nnodes > 1) != bool(args.rdzv_endpoint):
        print("streamrnn serve: --nnodes M (more than 1) and --rdzv-endpoint HOST:PORT, "
              "where the machines meet, go together", file=sys.stderr)
        return 2
    if args.nproc > 1 or args.nnodes > 1:
        return launch.launch(args.nproc, args.max_restarts, config.cluster,
                             (args.config, args.overrides, args.fresh),
                             nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint)
    return launch.serve(config, fresh=args.fresh)


def _checkpoint_save(args) -> int:
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


def _checkpoint_list(args) -> int:
    from .serve import statedir
    root, origin = _state_folder(args)
    if not root.is_dir():
        print(f"streamrnn checkpoint list: {root.absolute()} does not exist" + (
              f"{origin}. Name the folder, e.g. `streamrnn checkpoint list "
              f"{SERVICE_CHECKPOINTS}` for the systemd service" if origin else ""),
              file=sys.stderr)
        return 1
    rows = statedir.listing(root)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("\n".join(format_checkpoint(row, full=False) for row in rows) if rows
              else f"no checkpoints in {root}")
    return 1 if any("error" in row for row in rows) else 0


def _checkpoint_inspect(args) -> int:
    from .serve import statedir
    row = statedir.inspect(args.path)
    print(json.dumps(row, indent=1) if args.json else format_checkpoint(row, full=True))
    return 1 if "error" in row else 0


def _state_folder(args):
    """The state folder `checkpoint list` reads (PATH may also be its checkpoints/ folder),
    and how it was chosen (for the message when it is not there: the default depends on
    the environment, so say which one applied)."""
    from pathlib import Path
    if args.path:
        path = Path(args.path)
        return (path.parent if path.name == "checkpoints" else path), ""
    checkpoint = load_config(args.config).checkpoint
    origin = checkpoint.resolved_dir_origin()
    if checkpoint.dir:
        origin += f" in {args.config}"
    return Path(checkpoint.resolved_dir()), f"; it is {origin}"


def _feed(args) -> int:
    from . import feed
    return feed.run(args.endpoint, args.files, args.stream, args.retry_seconds, args.chunk,
                    args.flush, keys=(args.server_key, args.client_key))


def _status(args) -> int:
    from .client import ProducerError
    try:
        with _producer(args, retry_seconds=args.timeout,
                       reply_timeout=args.timeout) as producer:
            if producer.topology().world_size > 1:
                return _cluster_status(producer.cluster_status(), args.json)
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


def _watch(args) -> int:
    from . import watch
    return watch.run(args.endpoint, args.scores_endpoint, args.stream, args.all,
                     args.above, args.top_quantile, args.json,
                     (args.server_key, args.client_key))


def _cluster_status(cluster: dict, as_json: bool) -> int:
    print(json.dumps(cluster, indent=1) if as_json else format_cluster_status(cluster))
    return 1 if any("error" in rank for rank in cluster["ranks"]) else 0


def _demo(args) -> int:
    from .tools import demo
    load_config(None, args.overrides)  # a bad --set stops here, with its message
    return demo.run(args.overrides, args.seconds, args.streams, args.chunk)


def _bench_config(args):
    """The config of a timing run, or None when --print-config printed it: the reference
    config that the project's figures were measured with, whatever the defaults of the
    day (--set overrides it)."""
    return _load(args, defaults=REFERENCE_BENCH_CONFIG)


# engine, e2e and soak: the configs in README's Benchmarks tables (presets set the width)
REFERENCE_BENCH_CONFIG = (
    "model.hidden_size=256", "model.num_layers=1", "model.skip=false", "train.k1=32",
    "train.k2=128", "train.optimizer=sgd", "train.lr=0.05", "train.lr_decay_updates=0")


def _bench_engine(args) -> int:
    from .tools import bench_engine
    config = _bench_config(args)
    if config is not None:
        bench_engine.run(args.configs, args.strategies, args.seconds, config, args.json,
                         rounds=args.rounds)
    return 0


def _bench_e2e(args) -> int:
    from .tools import bench_e2e
    config = _bench_config(args)
    if config is not None:
        try:
            nprocs = tuple(int(n) for n in args.nproc.split(","))
        except ValueError:
            nprocs = ()
        if not nprocs or min(nprocs) < 1:
            print(f"streamrnn bench e2e: --nproc {args.nproc!r}: expected numbers of ranks "
                  "such as 1,2", file=sys.stderr)
            return 2
        bench_e2e.run(config, args.streams, args.producers, args.seconds, args.json,
                      wal_modes=tuple(args.wal_modes.split(",")), nprocs=nprocs,
                      chunk=args.chunk, watch=args.watch)
    return 0


def _bench_soak(args) -> int:
    from .tools import bench_soak
    config = _bench_config(args)
    if config is not None:
        bench_soak.run(config, args.streams, args.producers, args.seconds, args.json)
    return 0


def _bench_contention(args) -> int:
    from .tools import bench_contention
    if _bench_config(args) is not None:  # a bad --set stops here, with its message
        passed = ["--config", args.config] if args.config else []
        for item in args.overrides:  # to each `bench engine` run
            passed += ["--set", item]
        bench_contention.run(passed, args.threads.split(","),
                             args.hogs or bench_contention.default_hogs(), args.seconds,
                             args.json)
    return 0


def _bench_anomaly(args) -> int:
    from .tools import bench_anomaly
    config = _load(args)
    if config is None:
        return 0
    names = [n.strip() for n in (args.logs or "").split(",") if n.strip()] or None
    try:
        bench_anomaly.run(config, args.json, names, args.seed,
                          separately=not args.together)
    except (ConfigError, FileNotFoundError) as e:
        print(f"streamrnn bench anomaly: {e}", file=sys.stderr)
        return 2
    return 0


def _bench_quality(args) -> int:
    from .tools import bench_quality, corpora
    config = _load(args)  # what `serve` would run: no bench defaults
    if config is None:
        return 0
    names = [name.strip() for name in args.corpora.split(",") if name.strip()]
    for name in names:
        try:
            corpora.corpus(name)
        except ValueError as e:
            print(f"streamrnn bench quality: {e}", file=sys.stderr)
            return 2
    result = bench_quality.run(config, names, args.max_bytes, args.streams, args.json,
                               in_process=args.in_process)
    rows = result["corpora"]
    return 1 if any("failed" in r for r in rows) or not any("bits_per_byte" in r
                                                             for r in rows) else 0

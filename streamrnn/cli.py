"""The `streamrnn` command: one subcommand per job, each with its own --help."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, format_config, load_config


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

    p = sub.add_parser("demo", help="learn real text live and show bits/byte falling",
                       description="Feed Python standard library sources as parallel byte "
                       "streams to the engine, with live progress, then a summary and a "
                       "sample of generated text.")
    _config_options(p)
    p.add_argument("--seconds", type=float, default=120, help="how long to learn (120)")
    p.add_argument("--streams", type=int, default=8, help="source files fed in parallel (8)")
    p.add_argument("--chunk", type=int, default=256, help="bytes per stream per turn (256)")
    p.set_defaults(run=_demo)

    p = sub.add_parser("bench", help="time the engine against the baselines, JSON out",
                       description="Tokens trained per second of the engine (through the "
                       "public API) next to a plain recompute baseline and the seed "
                       "question's LSTMCell loops, measured in the same run. Defaults: "
                       "optimizer sgd, lr 0.05 (as DESIGN.md section 6 measured).")
    _config_options(p)
    p.add_argument("--configs", help="comma-separated presets (default: small,small_b64 on "
                   "CPU; small,small_b256,small_b1024,large,large_b4096 on a GPU); all: "
                   "small, small_b64, small_b256, small_b1024, large, large_b4096")
    p.add_argument("--strategies", help="comma-separated: engine, engine_bf16, recompute, "
                   "seed_chunk_cell, seed_sliding_cell (default: all, bf16 on GPU only)")
    p.add_argument("--seconds", type=float, default=12, help="time per strategy and config")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--json", default="streamrnn-bench.json", help="where to write results")
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


def _load(args, defaults=()):
    config = load_config(args.config, [*defaults, *args.overrides])
    if getattr(args, "print_config", False):
        print(format_config(config), end="")
        return None
    return config


def _config(args) -> int:
    print(format_config(load_config(args.config, args.overrides)), end="")
    return 0


def _demo(args) -> int:
    from . import demo
    config = _load(args)
    if config is not None:
        demo.run(config, args.seconds, args.streams, args.chunk)
    return 0


def _bench(args) -> int:
    from . import bench
    config = _load(args, defaults=("train.optimizer=sgd", "train.lr=0.05"))
    if config is not None:
        bench.run(args.configs, args.strategies, args.seconds, config, args.json,
                  rounds=args.rounds)
    return 0

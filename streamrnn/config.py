"""The typed config tree: defaults, a TOML file, `section.key=value` overrides.

Every setting lives in one small frozen dataclass per section. A bad value is refused
before anything starts, with one ConfigError that names the key:

    >>> load_config(overrides=["train.k2=8", "train.k1=16"])
    ConfigError: train.k2 = 8 must be >= train.k1 = 16 ...

Each field's `doc` metadata is its documentation: `--print-config` prints it next to
the value, so the printed config is also the reference.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


class StartupError(Exception):
    """The daemon cannot start as configured (a port in use, a folder it cannot use):
    `streamrnn serve` logs the message and exits 2, which systemd does not restart."""


def _opt(default: Any, doc: str, choices: tuple[str, ...] | None = None,
         before: Any = None) -> Any:
    """A setting. `before`: for a key added after the first release, the value that a
    config saved before the key existed had in effect (what the code did then), so an
    old checkpoint or log is read as what it was, not as today's default."""
    return field(default=default, metadata={"doc": doc, "choices": choices,
                                            "before": before})


@dataclass(frozen=True)
class ModelConfig:
    kind: str = _opt("lstm", "recurrent cell", choices=("lstm", "gru"))
    vocab_size: int = _opt(256, "number of token ids; tokens must be < vocab_size (256 = bytes)")
    embed_dim: int = _opt(64, "token embedding width")
    hidden_size: int = _opt(384, "recurrent state width per layer")
    num_layers: int = _opt(3, "stacked recurrent layers")
    skip: bool = _opt(True, "skip connections: layers above the first also see the "
                      "embedding, the head sees the embedding and every layer", before=False)

    def check(self) -> None:
        _positive(self, "vocab_size", "embed_dim", "hidden_size", "num_layers")


@dataclass(frozen=True)
class TrainConfig:
    k1: int = _opt(16, "an update every k1 new tokens of a stream, with loss on those k1 targets")
    k2: int = _opt(16, "each update backpropagates through the last k2 inputs (k2 >= k1)")
    optimizer: str = _opt("adam", "update rule", choices=("adam", "sgd"))
    lr: float = _opt(0.01, "peak learning rate, at most 10 (see warmup_updates, "
                     "lr_decay_updates)")
    adam_beta1: float = _opt(0.0, "Adam's momentum decay (0 = none, as in the online "
                             "compressors: on text seen once it learns fastest; torch's "
                             "default is 0.9)", before=0.9)
    adam_beta2: float = _opt(0.9999, "Adam's decay of the squared-gradient average (torch's "
                             "default is 0.999)",
                             before=0.999)
    adam_eps: float = _opt(1e-8, "Adam's epsilon", before=1e-8)
    warmup_updates: int = _opt(0, "the learning rate rises linearly from 0 to lr over "
                               "this many updates (0 = none)", before=0)
    lr_decay_updates: float = _opt(100.0, "then decays as lr / sqrt(1 + u / this), u "
                                   "the lifetime update count: lr / 2 at 3x this many "
                                   "updates, lr / 4 at 15x (0 = constant lr)", before=0.0)
    lr_floor: float = _opt(0.1, "the decay stops at this fraction of lr: after months of "
                           "traffic the model still adapts (0 = no floor)", before=0.0)
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = off)")
    max_batch_streams: int = _opt(256, "at most this many streams' windows in one update")
    max_resident_streams: int = _opt(16384, "window-start states kept on the device; the "
                                     "least recently used others wait in host memory")
    device: str = _opt("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    cpu_threads: int = _opt(0, "CPU threads for torch's kernels (0 = OMP_NUM_THREADS if "
                            "set, as torchrun sets 1 per rank, else half the cores, at least "
                            "1: on a shared host training then slows in proportion instead "
                            "of collapsing; 2 cores beside a busy process: 1 thread kept 99% "
                            "of its rate, 2 threads 17%; set it to the cores on a host of "
                            "its own, 20% faster there)")
    precision: str = _opt("fp32", "compute precision (bf16: embedding and output head in "
                          "bfloat16, the recurrence stays float32)",
                          choices=("fp32", "bf16", "fp64"))
    seed: int = _opt(0, "seed for the initial weights")
    flush_after_seconds: float = _opt(30.0, "daemon: a stream idle this long has its last "
                                      "r < k1 targets trained (0 = never)")
    forget_after_seconds: float = _opt(0.0, "daemon: a stream with no new tokens for this "
                                       "long ends, as by an end request: trained to its "
                                       "last token, then forgotten with its state (0 = "
                                       "never: streams keep their state for good)")
    updates_per_turn: int = _opt(8, "daemon: at most this many updates between two "
                                 "looks at the network, so intake never starves")

    def check(self) -> None:
        _positive(self, "k1", "k2", "max_batch_streams", "max_resident_streams")
        if self.max_resident_streams < self.max_batch_streams:
            raise ConfigError(f"train.max_resident_streams = {self.max_resident_streams} must "
                              f"be >= train.max_batch_streams = {self.max_batch_streams}: an "
                              "update's streams must all be on the device")
        if self.k2 < self.k1:
            raise ConfigError(f"train.k2 = {self.k2} must be >= train.k1 = {self.k1}: "
                              "each update backpropagates through the last k2 inputs and "
                              "trains the newest k1 targets")
        if not 0 < self.lr <= 10:
            # past that, a step wrecks the model: its forward overflows, and every later
            # update is skipped (a restart replays the logged steps with the rate they
            # ran with, so only --fresh would recover)
            raise ConfigError(f"train.lr = {self.lr} must be in (0, 10] (Adam learns "
                              "well near 0.01, SGD near 1)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} = {getattr(self, name)} must be in "
                                  "[0, 1)")
        if not self.adam_eps > 0:
            raise ConfigError(f"train.adam_eps = {self.adam_eps} must be > 0")
        if self.warmup_updates < 0 or not self.lr_decay_updates >= 0:
            raise ConfigError("train.warmup_updates and train.lr_decay_updates must "
                              "be >= 0 (0 = off)")
        if not 0 <= self.lr_floor <= 1:
            raise ConfigError(f"train.lr_floor = {self.lr_floor} must be in 0 .. 1 (a "
                              "fraction of train.lr)")
        if not self.grad_clip >= 0:
            raise ConfigError(f"train.grad_clip = {self.grad_clip} must be >= 0 (0 = off)")
        if not self.flush_after_seconds >= 0:
            raise ConfigError(f"train.flush_after_seconds = {self.flush_after_seconds} "
                              "must be >= 0 (0 = never)")
        if not self.forget_after_seconds >= 0:
            raise ConfigError(f"train.forget_after_seconds = {self.forget_after_seconds} "
                              "must be >= 0 (0 = never)")
        _positive(self, "updates_per_turn")
        if self.cpu_threads < 0:
            raise ConfigError(f"train.cpu_threads = {self.cpu_threads} must be >= 0 "
                              "(0 = torch's default, one per core)")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device = {self.device!r}: expected auto, cpu, cuda "
                              "or cuda:N")


@dataclass(frozen=True)
class IngestConfig:
    endpoint: str = _opt("tcp://127.0.0.1:5557", "ZeroMQ endpoint the daemon binds: "
                         "tcp://HOST:PORT or ipc:///PATH")
    max_message_bytes: int = _opt(1 << 20, "larger messages are refused (too_large); "
                                  "over twice this, the sender is disconnected")
    max_tokens_per_message: int = _opt(65536, "more tokens in one message are refused")
    max_stream_id_bytes: int = _opt(256, "longest stream id, in UTF-8 bytes")
    max_streams: int = _opt(100_000, "streams at most (an end request frees one); tokens for more are refused")
    max_queued_tokens: int = _opt(4_000_000, "received but untrained tokens at most; "
                                  "beyond it producers are told busy")
    max_queued_seconds: float = _opt(10.0, "and no more than this many seconds of training "
                                     "at the measured rate (never less than one message), "
                                     "so an ack means trained soon and predict is not "
                                     "backlogged for long (0 = no time bound)")
    busy_retry_ms: int = _opt(100, "retry hint sent with busy")
    max_messages_per_turn: int = _opt(1000, "messages handled between two training turns")
    curve_secret_key: str = _opt("", "CURVE on: the daemon's secret key file "
                                 "(NAME.key_secret; $CREDENTIALS_DIRECTORY may be used); "
                                 "empty: no encryption, anyone who reaches the endpoint may send")
    curve_allowed_keys: str = _opt("", "CURVE: folder of the public keys (*.key) of the "
                                   "producers allowed to send")

    def check(self) -> None:
        problem = endpoint_problem(self.endpoint, bind=True)
        if problem:
            raise ConfigError(f"ingest.endpoint = {self.endpoint!r}: {problem}")
        # one without the other would start without CURVE, open to anyone, while the
        # operator believes producers must authenticate: refuse rather than guess
        if bool(self.curve_secret_key) != bool(self.curve_allowed_keys):
            given, empty = (("curve_secret_key", "curve_allowed_keys")
                            if self.curve_secret_key else
                            ("curve_allowed_keys", "curve_secret_key"))
            raise ConfigError(f"ingest.{given} is set but ingest.{empty} is empty: CURVE "
                              "needs both (the daemon's secret key file and the folder of "
                              "allowed producer keys), or neither for no authentication")
        _positive(self, "max_message_bytes", "max_tokens_per_message", "max_stream_id_bytes",
                  "max_streams", "max_queued_tokens", "busy_retry_ms", "max_messages_per_turn")
        if not self.max_queued_seconds >= 0:
            raise ConfigError(f"ingest.max_queued_seconds = {self.max_queued_seconds} must "
                              "be >= 0 (0 = no time bound)")
        if self.max_queued_tokens < self.max_tokens_per_message:
            raise ConfigError(f"ingest.max_queued_tokens = {self.max_queued_tokens} must be "
                              f">= ingest.max_tokens_per_message = "
                              f"{self.max_tokens_per_message}: a full message must fit")


@dataclass(frozen=True)
class MetricsConfig:
    address: str = _opt("127.0.0.1", "Prometheus /metrics bind address (loopback: see "
                        "README before exposing it)")
    port: int = _opt(9108, "Prometheus /metrics port (0 = no metrics endpoint)")

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"metrics.port = {self.port} must be in 0 .. 65535 "
                              "(0 = no metrics endpoint)")
        if self.port and not self.address.strip():
            raise ConfigError("metrics.address is empty: name the address to bind, e.g. "
                              "127.0.0.1 (or set metrics.port = 0 for no metrics endpoint)")


@dataclass(frozen=True)
class LogConfig:
    format: str = _opt("auto", "auto: console on a terminal, JSON lines otherwise",
                       choices=("auto", "json", "console"))
    level: str = _opt("info", "least severe level logged",
                      choices=("debug", "info", "warning", "error"))
    summary_seconds: float = _opt(60.0, "a progress line this often (0 = none)")

    def check(self) -> None:
        if not self.summary_seconds >= 0:
            raise ConfigError(f"log.summary_seconds = {self.summary_seconds} must be >= 0")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = _opt("", "checkpoints and the write-ahead log live here; empty: "
                    "$STATE_DIRECTORY (systemd) if set, else ./streamrnn-state")
    interval_seconds: float = _opt(300.0, "a checkpoint this often (0 = only on stop or "
                                   "request)")
    interval_updates: int = _opt(0, "and every this many updates (0 = off)")
    keep: int = _opt(3, "newest checkpoints kept (>= 2: one may be half-written)")

    def check(self) -> None:
        if self.keep < 2:
            raise ConfigError(f"checkpoint.keep = {self.keep} must be >= 2: the newest may "
                              "be the one a crash interrupted")
        if not self.interval_seconds >= 0 or self.interval_updates < 0:
            raise ConfigError("checkpoint.interval_seconds and checkpoint.interval_updates "
                              "must be >= 0")

    def resolved_dir(self) -> str:
        import os
        return self.dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or \
            "streamrnn-state"

    def resolved_dir_origin(self) -> str:
        """How resolved_dir() was chosen, for messages about a folder that is not there."""
        import os
        if self.dir:
            return "checkpoint.dir"
        if os.environ.get("STATE_DIRECTORY", "").split(":")[0]:
            return "$STATE_DIRECTORY (checkpoint.dir is empty)"
        return ("the default, ./streamrnn-state (checkpoint.dir is empty, $STATE_DIRECTORY "
                "not set)")


@dataclass(frozen=True)
class WalConfig:
    mode: str = _opt("fsync", "fsync: ack once on disk; async: ack on receipt, fsync every "
                     "sync_ms (a crash may lose that much); off: no log, a crash loses "
                     "everything since the last checkpoint", choices=("fsync", "async", "off"))
    sync_ms: int = _opt(200, "async mode: fsync at least this often")
    segment_bytes: int = _opt(64 << 20, "start a new log file after this many bytes")

    def check(self) -> None:
        _positive(self, "sync_ms", "segment_bytes")


@dataclass(frozen=True)
class ClusterConfig:
    timeout_seconds: float = _opt(60.0, "several ranks: a collective that waits this long "
                                  "for a rank fails, and torchrun restarts every rank (a "
                                  "dead rank is noticed at once; this bounds a hung one)")
    shutdown_seconds: float = _opt(120.0, "serve --nproc: after SIGTERM, how long the ranks "
                                   "get for their final checkpoint before they are killed "
                                   "(the log keeps what a killed one did not write)")
    join_seconds: float = _opt(600.0, "serve --nnodes: how long the machines wait for each "
                               "other at the rendezvous, at start and after a restart")

    def check(self) -> None:
        _positive(self, "timeout_seconds", "shutdown_seconds", "join_seconds")


@dataclass(frozen=True)
class ScoresConfig:
    endpoint: str = _opt("tcp://127.0.0.1:5600", "the score feed: a ZeroMQ PUB endpoint "
                         "(XPUB) the daemon binds, publishing how surprising each line and "
                         "token of a watched stream was (streamrnn watch); several ranks: "
                         "port + rank. Loopback by default; CURVE when the ingest has it. "
                         "Empty: no feed")
    line_token: int = _opt(-1, "the token that ends a line (-1: newline, 10, for a byte "
                           "vocabulary, vocab_size 256; no line records for other "
                           "vocabularies unless set)")
    recent_lines: int = _opt(1000, "a line's score is its rank (0 .. 1) among this many "
                             "recent lines of its stream, by the bits of its 8 most "
                             "surprising tokens")
    warmup_lines: int = _opt(100, "lines a stream's subscribers have seen scored before "
                             "any of its lines gets a score above 0")
    alert_quantile: float = _opt(0.999, "lines scoring at least this count in "
                                 "streamrnn_surprising_lines_total (and are what streamrnn "
                                 "watch shows by default)")
    send_queue: int = _opt(10000, "records queued per subscriber; past it they are dropped "
                           "(streamrnn_scores_dropped_total), never waited for")
    all_streams: bool = _opt(False, "score every stream's lines, watched or not (the line "
                             "metrics then cover all streams; costs a little per update)")

    def check(self) -> None:
        if self.endpoint:
            problem = endpoint_problem(self.endpoint, bind=True)
            if problem:
                raise ConfigError(f"scores.endpoint = {self.endpoint!r}: {problem} (or "
                                  "empty for no score feed)")
        if self.line_token < -1:
            raise ConfigError(f"scores.line_token = {self.line_token} must be a token id, "
                              "or -1 for newline in a byte vocabulary")
        _positive(self, "recent_lines", "send_queue")
        if self.warmup_lines < 0:
            raise ConfigError(f"scores.warmup_lines = {self.warmup_lines} must be >= 0")
        if not 0 < self.alert_quantile <= 1:
            raise ConfigError(f"scores.alert_quantile = {self.alert_quantile} must be in "
                              "(0, 1]")

    def resolved_line_token(self, vocab_size: int) -> int:
        """The token that ends a line, or -1 for none."""
        if self.line_token >= 0:
            return self.line_token if self.line_token < vocab_size else -1
        return 10 if vocab_size == 256 else -1


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wal: WalConfig = field(default_factory=WalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    scores: ScoresConfig = field(default_factory=ScoresConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def endpoint_problem(endpoint: str, bind: bool) -> str | None:
    """What is wrong with a ZeroMQ endpoint, or None. ZeroMQ itself takes a port past
    65535 modulo 65536 and binds somewhere else without a word, so ports are checked
    here; a bind may also ask for any free port with `*`."""
    expected = "expected tcp://HOST:PORT or ipc:///PATH"
    transport, sep, address = endpoint.partition("://")
    if not sep or not address:
        return expected
    if transport in ("ipc", "inproc"):
        return None
    if transport != "tcp":
        return f"unknown transport {transport!r}: {expected}"
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        return f"{expected} (the host is missing)" if colon else \
            f"{expected} (the port is missing)"
    if bind and port == "*":
        return None
    if not re.fullmatch(r"[0-9]+", port) or not 1 <= int(port) <= 65535:
        return (f"port {port!r} must be in 1 .. 65535" + (" (or * for any free port)"
                                                           if bind else ""))
    return None


def _positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value < 1:
            raise ConfigError(f"{_section_name(section)}.{name} = {value} must be >= 1")


def _section_name(section: Any) -> str:
    return next(f.name for f in dataclasses.fields(Config)
                if f.default_factory is type(section))  # type: ignore[misc]


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the TOML file at `path` (if given), then `section.key=value`
    overrides; validated. Raises ConfigError naming the offending key."""
    values: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
    if path is not None:
        for section, table in _read_toml(Path(path)).items():
            _merge(values, section, table, where=str(path))
    for item in overrides:
        key, equals, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not (equals and dot and section and name):
            raise ConfigError(f"override {item!r}: expected SECTION.KEY=VALUE, "
                              "for example train.k1=16")
        _merge(values, section, {name: _parse_value(raw.strip())}, where="--set")
    return _build(values)


def config_from_dict(tree: dict[str, dict[str, Any]]) -> Config:
    """A Config from a nested dict such as `Config.to_dict()` gives: what a checkpoint or
    the log saved, to compare with the running config. Lenient on purpose: keys another
    version dropped are ignored and the value checks are not rerun (a rule added since
    must not make an old checkpoint unreadable); a key added since takes the value it
    had in effect before it existed (`before`), not today's default."""
    sections = _sections()
    values: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for section, table in tree.items():
        if section in sections and isinstance(table, dict):
            fields = dataclasses.fields(sections[section])
            known = {f.name for f in fields}
            missing = {f.name: f.metadata["before"] for f in fields
                       if f.name not in table and f.metadata["before"] is not None}
            _merge(values, section, {**{k: v for k, v in table.items() if k in known},
                                     **missing}, where="saved config")
    return Config(**{name: cls(**values[name]) for name, cls in sections.items()})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            tree = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for section, table in tree.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
    return tree


def _merge(values: dict[str, dict[str, Any]], section: str, table: dict[str, Any],
           where: str) -> None:
    if section not in values:
        raise ConfigError(f"{where}: unknown section [{section}]"
                          f"{_did_you_mean(section, values)}; sections: {', '.join(values)}")
    known = {f.name: f for f in dataclasses.fields(_sections()[section])}
    for name, value in table.items():
        if name not in known:
            raise ConfigError(f"{where}: unknown key {section}.{name}"
                              f"{_did_you_mean(name, known)}; keys in [{section}]: "
                              f"{', '.join(known)}")
        values[section][name] = _check_type(f"{section}.{name}", known[name], value)


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def torch_threads(train: TrainConfig) -> int | None:
    """The threads torch's CPU kernels should use: train.cpu_threads, else None where
    OMP_NUM_THREADS says already (yours, or torchrun's 1 per rank), else half the cores
    this process may run on, at least one. More threads than free cores do not slow
    training in proportion, they collapse it: each small parallel kernel waits at a
    barrier for a thread the scheduler has not run yet. On 2 cores beside one busy
    process (bench contention), 1 thread kept 99% of the rate it had alone and 2 threads
    fell to 17% of theirs; alone, 2 threads were 20% faster than 1."""
    if train.cpu_threads:
        return train.cpu_threads
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, len(os.sched_getaffinity(0)) // 2)


def _check_type(key: str, spec: dataclasses.Field, value: Any) -> Any:
    want = {"int": int, "float": float, "str": str, "bool": bool}[str(spec.type)]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{key} = {value!r}: expected {want.__name__}, "
                          f"got {type(value).__name__}")
    if want is float and not math.isfinite(value):  # inf, nan, or 1e400 read as inf
        raise ConfigError(f"{key} = {value!r}: expected a finite number")
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(choices)}")
    return value


def _parse_value(raw: str) -> Any:
    """A TOML value (`16`, `3e-4`, `true`, `"x"`); anything else is taken as a string,
    so `train.device=cuda` needs no quotes."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _build(values: dict[str, dict[str, Any]]) -> Config:
    sections = {name: cls(**values[name]) for name, cls in _sections().items()}
    for section in sections.values():
        section.check()
    vocab, line_token = sections["model"].vocab_size, sections["scores"].line_token
    if line_token >= vocab:
        raise ConfigError(f"scores.line_token = {line_token} must be < model.vocab_size = "
                          f"{vocab}: it is a token")
    return Config(**sections)


def format_config(config: Config) -> str:
    """The resolved config as TOML, each key with its documentation; loadable again."""
    lines: list[str] = []
    for section_field in dataclasses.fields(config):
        section = getattr(config, section_field.name)
        lines.append(f"[{section_field.name}]")
        for f in dataclasses.fields(section):
            setting = f"{f.name} = {_toml_value(getattr(section, f.name))}"
            doc = f.metadata["doc"]
            if f.metadata["choices"]:
                doc += ": " + " | ".join(f.metadata["choices"])
            lines.append(f"{setting:<28} # {doc}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)

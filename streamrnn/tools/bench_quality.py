"""`streamrnn bench quality`: how well the daemon learns, next to the compressors.

For each corpus (tools/corpora.py): its first `max_bytes` are cut into `num_streams`
equal contiguous parts (the few bytes that do not divide evenly are dropped), and a
real daemon, on the config `streamrnn serve` would run, is fed them once through the
producer client over tcp loopback, 4 KiB of each stream in turn, as `streamrnn feed`
does; the streams are flushed at the end, so every target is trained. The daemon's
lifetime totals then give the prequential bits/byte: every byte was predicted before
the model trained on it, so this is the size an arithmetic coder driven by the model
would need, as a compressor's output is. Each stream's first byte is never a target:
it is charged log2(vocab_size) bits.

    bits/byte = (bits + num_streams * log2(vocab_size)) / bytes

Beside it, on the same bytes as one buffer: xz -9e, bzip2 -9 and zlib -9 (gzip's
format less its header) from Python's own modules, and 7-Zip's PPMd order 8 where a 7z
binary is on PATH. Also the wall time from the first byte sent to the last trained.
"""
from __future__ import annotations

import bz2
import lzma
import math
import shutil
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

from ..config import Config, ConfigError
from . import corpora
from .feeding import round_robin, write_json
from .local import LocalDaemon

CHUNK = 4096            # bytes per message, as `streamrnn feed` sends them
STALL_SECONDS = 300     # no training progress this long: the daemon is stuck
SEVEN_ZIPS = ("7z", "7za", "7zz")
PPMD_INSTALL = "apt-get install p7zip-full"


class DaemonFailed(Exception):
    """The daemon or the feeding failed; the message ends with the daemon's log."""


def run(config: Config, names: list[str], max_bytes: int, num_streams: int,
        json_path: str | None, echo=print, in_process: bool = False) -> dict:
    """in_process: feed a Learner in this process the same way instead of a daemon
    (the engine's own learning, without sockets: for a machine without pyzmq)."""
    from ..core.learner import resolve_device
    from .bench_engine import machine_info
    if config.model.vocab_size < 256:
        raise ConfigError(f"model.vocab_size = {config.model.vocab_size}: bench quality "
                          "feeds bytes, which need a vocab_size of at least 256")
    info = machine_info(resolve_device(config.train.device))
    model, train = config.model, config.train
    echo(f"# streamrnn bench quality on {info['device']}: {model.kind} "
         f"{model.num_layers}x{model.hidden_size}, TBPTT({train.k1}, {train.k2}), "
         f"{train.optimizer} lr {train.lr:g}; the first {max_bytes:,} bytes of each "
         f"corpus in {num_streams} streams, one pass")
    rows = []
    for name in names:
        row = measure(config, name, max_bytes, num_streams,
                      learn_in_process if in_process else learn)
        rows.append(row)
        echo(corpus_line(row))
    echo("")
    for line in table(rows):
        echo(line)
    result = {"info": info, "max_bytes": max_bytes, "streams": num_streams,
              "through": "learner in process" if in_process else "daemon over tcp",
              "corpora": rows, "config": config.to_dict()}
    write_json(result, json_path, echo)
    return result


def measure(config: Config, name: str, max_bytes: int, num_streams: int,
            learner=None) -> dict:
    """One corpus's row: the daemon's figures and the compressors', or why it was
    skipped (not on this machine, too short) or failed (the daemon did)."""
    corpus = corpora.corpus(name)
    row = {"name": name, "kind": corpus.kind, "role": corpus.role}
    try:
        data = corpora.corpus_bytes(name, max_bytes)
    except corpora.CorpusMissing as e:
        return {**row, "skipped": str(e)}
    part = len(data) // num_streams
    if part < 2:  # a stream needs two bytes for one target
        return {**row, "skipped": f"only {len(data):,} bytes: fewer than 2 for each of "
                f"{num_streams} streams"}
    used = data[:part * num_streams]
    row.update(bytes_read=len(data), bytes=len(used), streams=num_streams)
    try:
        learned = (learner or learn)(config, [used[i * part:(i + 1) * part]
                                              for i in range(num_streams)])
    except DaemonFailed as e:
        return {**row, "failed": str(e)}
    bits_per_byte = (learned["bits"] + num_streams * math.log2(config.model.vocab_size)) \
        / len(used)
    row.update(bits_per_byte=bits_per_byte, seconds=learned["seconds"],
               bytes_per_s=len(used) / learned["seconds"],
               tokens_trained=learned["tokens_trained"], bits=learned["bits"],
               targets=len(used) - num_streams)
    row.update(compressed_bits_per_byte(used))
    row.update(vs_xz=bits_per_byte / row["xz"], vs_bzip2=bits_per_byte / row["bzip2"])
    return row


def learn_in_process(config: Config, parts: list[bytes]) -> dict:
    """The same feeding into a Learner in this process: CHUNK bytes of each stream in
    turn, then a flush; its totals, and the seconds from the first byte to the last
    trained."""
    from ..core.learner import Learner
    learner = Learner(config)
    started = time.monotonic()
    for offset in range(0, max(map(len, parts)), CHUNK):
        learner.learn_many({f"quality-{i}": part[offset:offset + CHUNK]
                            for i, part in enumerate(parts) if offset < len(part)})
    learner.flush()
    return {"seconds": time.monotonic() - started,
            "tokens_trained": learner.tokens_trained, "bits": learner.bits}


def learn(config: Config, parts: list[bytes]) -> dict:
    """Feed the parts once to a fresh daemon, one stream each, and wait until it trained
    every target; its lifetime totals then, and the seconds from first send to that."""
    from ..client import Producer, ProducerError  # pyzmq: here, not for learn_in_process
    # its own checkpoint folder and no metrics port, whatever the config says: the
    # state of this run goes with its temporary folder, and no port can be taken
    settings = ["checkpoint.dir=streamrnn-state", "metrics.port=0"]
    streams = {f"quality-{i}": part for i, part in enumerate(parts)}
    targets = sum(len(part) - 1 for part in parts)
    with tempfile.TemporaryDirectory(prefix="streamrnn-quality-") as state:
        daemon = LocalDaemon(state, settings, config)
        try:
            with Producer(daemon.endpoint, retry_seconds=120) as producer:
                producer.status()  # waits until it answers
                started = time.monotonic()
                round_robin(producer, streams, CHUNK, go_on=lambda: True)
                producer.flush()  # all acknowledged; now train the last < k1 of each
                for stream in streams:
                    producer.request({"type": "flush", "stream": stream})
                status = _wait_trained(producer, targets)
                seconds = time.monotonic() - started
        except ProducerError as e:
            raise DaemonFailed(f"{e}; the daemon's log ends:\n{daemon.log_tail()}") from None
        finally:
            daemon.stop()
    return {"seconds": seconds, "tokens_trained": status["tokens_trained"],
            "bits": status["bits"]}


def _wait_trained(control, targets: int) -> dict:
    """The daemon's status once it trained `targets` and holds nothing more; or as soon
    as it stops making progress (then its figures say what is missing)."""
    progress, since = -1, time.monotonic()
    while True:
        status = control.status()
        trained, queued = status["tokens_trained"], status["queued_tokens"]
        if trained >= targets and queued == 0:
            return status
        if trained != progress:
            progress, since = trained, time.monotonic()
        elif time.monotonic() - since > (5 if queued == 0 else STALL_SECONDS):
            return status
        time.sleep(0.05)


def compressed_bits_per_byte(data: bytes) -> dict:
    """Bits/byte of the compressors on `data`, and 7-Zip's PPMd (None, with the reason in
    ppmd_missing, where there is no 7z binary)."""
    def per_byte(compressed: bytes) -> float:
        return 8 * len(compressed) / len(data)

    out = {"xz": per_byte(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
           "bzip2": per_byte(bz2.compress(data, 9)), "gzip": per_byte(zlib.compress(data, 9))}
    ppmd, why = ppmd_bits_per_byte(data)
    out["ppmd"] = ppmd
    if why:
        out["ppmd_missing"] = why
    return out


def ppmd_bits_per_byte(data: bytes) -> tuple[float | None, str | None]:
    """`7z a -m0=PPMd:o=8` on the bytes: (bits/byte of the archive, None), or (None, why)."""
    binary = next(filter(None, map(shutil.which, SEVEN_ZIPS)), None)
    if binary is None:
        return None, f"no {', '.join(SEVEN_ZIPS)} on PATH ({PPMD_INSTALL})"
    with tempfile.TemporaryDirectory(prefix="streamrnn-ppmd-") as folder:
        source, archive = Path(folder) / "data", Path(folder) / "data.7z"
        source.write_bytes(data)
        done = subprocess.run([binary, "a", "-bd", "-y", "-m0=PPMd:o=8", str(archive),
                               str(source)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not archive.is_file():
            return None, f"{binary} failed (exit {done.returncode}): " \
                f"{(done.stderr or done.stdout).strip()[-300:]}"
        return 8 * archive.stat().st_size / len(data), None


# ---- reporting --------------------------------------------------------------------------
def corpus_line(row: dict) -> str:
    head = f"{row['name']} ({row['kind']}, {row['role']})"
    if "skipped" in row:
        return f"{head}: skipped: {row['skipped']}"
    if "failed" in row:
        return f"{head}: FAILED: {row['failed']}"
    ppmd = f"{row['ppmd']:.3f}" if row["ppmd"] is not None else "-"
    missing = row["targets"] - row["tokens_trained"]
    return (f"{head}: {row['bytes']:,} bytes in {row['streams']} streams, "
            f"{row['bits_per_byte']:.3f} bits/byte in {row['seconds']:.1f} s "
            f"({row['bytes_per_s']:,.0f} B/s); xz {row['xz']:.3f}, bzip2 "
            f"{row['bzip2']:.3f}, gzip {row['gzip']:.3f}, ppmd {ppmd}: "
            f"{row['vs_xz']:.2f}x xz, {row['vs_bzip2']:.2f}x bzip2"
            + (f"; {missing:,} TARGETS NOT TRAINED" if missing else ""))


def table(rows: list[dict]) -> list[str]:
    """bits/byte per corpus: the daemon's, the compressors', and its ratio to xz's."""
    lines = [f"{'corpus':18s} {'kind':10s} {'role':8s} {'bytes':>10s} {'streamrnn':>9s} "
             f"{'xz':>6s} {'bzip2':>6s} {'gzip':>6s} {'ppmd':>6s} {'/xz':>5s} "
             f"{'seconds':>7s} {'B/s':>8s}"]
    for r in rows:
        start = f"{r['name'][:18]:18s} {r['kind']:10s} {r['role']:8s}"
        if "bits_per_byte" not in r:
            lines.append(f"{start} {'skipped' if 'skipped' in r else 'FAILED':>10s}")
            continue
        figures = " ".join(f"{r[k]:6.3f}" if r[k] is not None else f"{'-':>6s}"
                           for k in ("xz", "bzip2", "gzip", "ppmd"))
        lines.append(f"{start} {r['bytes']:10,} {r['bits_per_byte']:9.3f} {figures} "
                     f"{r['vs_xz']:5.2f} {r['seconds']:7.0f} {r['bytes_per_s']:8,.0f}")
    lines.append("(bits/byte; streamrnn: prequential, one pass, every byte predicted "
                 "before it was learned)")
    return lines

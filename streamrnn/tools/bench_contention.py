"""`streamrnn bench contention`: the engine's tokens/s alone and beside busy processes,
for each value of train.cpu_threads asked for.

A daemon shares its host: other daemons, producers, whatever else runs there. Training
should then slow in proportion to the cores it loses, not collapse. Each measurement is
`streamrnn bench engine` in a process of its own (torch's thread pool is per process and
is set once), first alone, then while `hogs` processes spin on the other cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .feeding import write_json

HOG = "while True: pass"


def run(bench_args: list[str], threads: list[str], hogs: int, seconds: float,
        json_path: str | None, echo=print) -> dict:
    """`bench_args`: --config and --set options for every `bench engine` run."""
    cores = len(os.sched_getaffinity(0))
    echo(f"# streamrnn bench contention: {cores} cores, engine preset 'small' "
         f"(1 stream), {seconds:g} s each, alone and beside {hogs} busy "
         f"process{'es' if hogs != 1 else ''}")
    echo(f"{'cpu_threads':>12s} {'alone tok/s':>12s} {'beside tok/s':>13s} {'ratio':>7s}")
    rows = []
    for value in threads:
        engine_args = [*bench_args, "--set", f"train.cpu_threads={value}"]
        alone = _engine_tokens_per_s(engine_args, seconds, hogs=0)
        beside = _engine_tokens_per_s(engine_args, seconds, hogs=hogs)
        ratio = beside / alone if alone else 0.0
        rows.append({"cpu_threads": value, "alone_tokens_per_s": alone,
                     "beside_tokens_per_s": beside, "ratio": ratio})
        echo(f"{value:>12s} {alone:12,.0f} {beside:13,.0f} {ratio:6.2f}x")
    echo(f"# a fair share beside {hogs} busy process{'es' if hogs != 1 else ''} on "
         f"{cores} cores is about {min(1.0, cores / (hogs + 1)):.2f}x")
    result = {"cores": cores, "hogs": hogs, "seconds": seconds, "rows": rows}
    write_json(result, json_path, echo)
    return result


def _engine_tokens_per_s(engine_args: list[str], seconds: float, hogs: int) -> float:
    spinning = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
    try:
        time.sleep(0.5 if hogs else 0)  # the hogs are running before the clock starts
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "engine.json"
            command = [sys.executable, "-m", "streamrnn", "bench", "engine", "--configs",
                       "small", "--strategies", "engine", "--rounds", "1", "--seconds",
                       str(seconds), "--json", str(out), *engine_args]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            rows = json.loads(out.read_text())["rows"]
    finally:
        for hog in spinning:
            hog.kill()
            hog.wait()
    return rows[0]["tokens_per_s"]


def default_hogs() -> int:
    """Half the cores busy (at least one): what a second daemon on the host takes."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


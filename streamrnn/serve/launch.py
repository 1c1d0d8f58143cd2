"""`streamrnn serve --nproc N`: torchrun's launcher, in this process, on one machine.

It is `torchrun --standalone --nproc-per-node N --max-restarts R -m streamrnn serve ...`
without a second command to learn: this process is the agent (systemd's main process),
the N ranks are its children. When a rank dies, torchrun stops the others and starts
all N again, up to R times; they recover in lockstep from their logs. SIGTERM is passed
on to every rank, which stop at the same tick and write a final checkpoint; the agent
waits `shutdown_seconds` for that before it kills them.

Several machines: run torchrun itself on each, with its c10d rendezvous (README).
"""
from __future__ import annotations

import sys


def launch(nproc: int, max_restarts: int, shutdown_seconds: int,
           serve_args: list[str]) -> int:
    """Run `streamrnn serve SERVE_ARGS` as `nproc` ranks; the exit status to return."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.get_args_parser().parse_args([
        "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        f"--shutdown_timeout={shutdown_seconds}", "--module", "streamrnn", "serve",
        *serve_args])
    try:
        torchrun.run(args)
    except SignalException:
        return 0  # SIGTERM/SIGINT: the ranks were told and made their final checkpoints
    except ChildFailedError as e:
        failures = "; ".join(f"rank {rank} exited {f.exitcode}" for rank, f in
                             sorted(e.failures.items()))
        print(f"streamrnn serve --nproc {nproc}: the ranks failed after {max_restarts} "
              f"restarts ({failures}); their log lines above say why", file=sys.stderr)
        return 2 if any(f.exitcode == 2 for f in e.failures.values()) else 1
    return 0


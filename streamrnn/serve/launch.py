"""How a process becomes the daemon: alone, or as one of N ranks (`serve --nproc N`).

`serve` runs the daemon in this process: one process, or the rank torchrun started it
as (its environment says which). `launch` is `serve --nproc N`: torchrun's launcher, in
this process, on one machine.

It is `torchrun --standalone --nproc-per-node N --max-restarts R -m streamrnn serve ...`
without a second command to learn: this process is the agent (systemd's main process).
The N ranks are forked, with torch already imported, from a forkserver that imported it
once (multiprocessing's: one clean process, no threads), not started as N fresh
interpreters: `import torch` is ~2 CPU-s a process, and a restart after a crash forks
again at once. When a rank dies, torchrun stops the others and starts all N again, up to
R times; they recover in lockstep from their logs. SIGTERM is passed on to every rank,
which stop at the same tick and write a final checkpoint; the agent waits
`shutdown_seconds` for that before it kills them.

Several machines: the same with --nnodes M --rdzv-endpoint HOST:PORT on each (torchrun's
c10d rendezvous), or torchrun itself (README).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import uuid

import prometheus_client
import torch
import torch.distributed

from ..config import ClusterConfig, Config, ConfigError, StartupError, load_config
from ..core.collective import Ranks
from ..core.learner import resolve_device
from ..keys import KeyError_
from . import logs
from .cluster import ClusterFault
from .daemon import Daemon
from .journal import IncompatibleState


def launch(nproc: int, max_restarts: int, cluster: ClusterConfig,
           serve_args: tuple[str | None, list[str], bool],
           nnodes: int = 1, rdzv_endpoint: str | None = None) -> int:
    """Run `streamrnn serve` as `nproc` ranks on this machine, of `nnodes` machines that
    meet at `rdzv_endpoint`; the exit status to return. `serve_args`: the config file,
    the overrides and --fresh, which every rank loads at each (re)start."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    if serve_args[2]:  # --fresh: once for this launch, not at every restart
        os.environ["STREAMRNN_FRESH_ID"] = uuid.uuid4().hex  # (recovery.py)
    where = ["--standalone"]
    if nnodes > 1:
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=streamrnn",
                 f"--rdzv-conf=join_timeout={int(cluster.join_seconds)}"]
        # a store of its own for each attempt (collective._attempt_prefix says why);
        # read by this process's agent, and passed on to the ranks
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    grace = [f"--shutdown_timeout={int(cluster.shutdown_seconds)}"]
    # torchrun's own command line (its defaults, its checks); the ranks run _rank, not
    # the module named last
    command = [*where, f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
               *grace, "--start-method=forkserver", "--module", "streamrnn", "serve"]
    args, unknown = torchrun.get_args_parser().parse_known_args(command)
    if unknown == grace:  # torch before 2.11: torchrun kills ranks 30 s after SIGTERM
        print(f"streamrnn serve --nproc: this torch ({torch.__version__}) has no torchrun "
              f"--shutdown_timeout: on stop, the ranks get torchrun's 30 s for their final "
              f"checkpoint, not cluster.shutdown_seconds ({cluster.shutdown_seconds:g}); "
              "what they do not write, their logs hold", file=sys.stderr)
        args = torchrun.get_args_parser().parse_args([a for a in command if a not in grace])
    if args.standalone:  # as torchrun.run: a rendezvous of this machine's own
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = \
            "c10d", "localhost:0", uuid.uuid4().hex
    config, _, _ = torchrun.config_from_args(args)  # (sets OMP_NUM_THREADS=1 if unset)
    multiprocessing.set_forkserver_preload([__name__])  # torch, the daemon, this file
    try:
        elastic_launch(config, entrypoint=_rank)(*serve_args)
    except SignalException:
        return 0  # SIGTERM/SIGINT: the ranks were told and made their final checkpoints
    except ChildFailedError as e:
        failures = "; ".join(f"rank {rank} exited {f.exitcode}" for rank, f in
                             sorted(e.failures.items()))
        print(f"streamrnn serve --nproc {nproc}: the ranks failed after {max_restarts} "
              f"restarts ({failures}); their log lines above say why", file=sys.stderr)
        return 2 if any(f.exitcode == 2 for f in e.failures.values()) else 1
    except RendezvousError as e:
        print(f"streamrnn serve --nnodes {nnodes}: the machines did not all meet at "
              f"{rdzv_endpoint} within {cluster.join_seconds:g} s (cluster.join_seconds): "
              f"start the same command on each of the {nnodes} machines, and let each "
              f"reach that address ({type(e).__name__}{': ' + str(e) if str(e) else ''})",
              file=sys.stderr)
        return 1
    return 0


def _rank(config_file: str | None, overrides: list[str], fresh: bool) -> int:
    """A rank: `streamrnn serve` in a process torchrun forked (its environment says
    which rank), on the config as the file and overrides give it now. A failure ends the
    process with its exit status, which torchrun reports; returning is success."""
    os.setsid()  # as torchrun starts a command: a terminal's Ctrl-C reaches the agent
    #              alone, which passes SIGTERM on (a rank signalled twice stops at once)
    # multiprocessing hands every forked process the write end of the pipe that keeps
    # the forkserver alive; a rank that kept it would keep the forkserver, its parent,
    # alive after the agent died, and so itself (_end_with_launcher): let it go
    from multiprocessing import forkserver
    alive = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_alive_fd", None)
    if alive is not None:
        os.close(alive)
    sys.stdout.reconfigure(line_buffering=True)  # its lines as they come (python -u)
    sys.stderr.reconfigure(line_buffering=True)
    try:
        code = serve(load_config(config_file, overrides), fresh)
    except ConfigError as e:  # the file changed into a bad one before a restart
        print(f"streamrnn: config error: {e}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)
    # torchrun's worker posts this return to the agent, then waits until the agent has
    # read every rank's. An agent told to stop never reads them: it waits for the ranks
    # to exit, and would kill them after shutdown_seconds. What is posted stays in the
    # pipe after the rank is gone, so the rank ends a moment after posting it.
    ending = threading.Timer(1.0, os._exit, args=(0,))
    ending.daemon = True
    ending.start()
    return 0


def serve(config: Config, fresh: bool = False) -> int:
    """One process, or the rank torchrun started this process as (its environment)."""
    logs.configure(config.log.format, config.log.level)
    prometheus_client.disable_created_metrics()  # no *_created series: noise for dashboards
    try:
        device = resolve_device(config.train.device)
        if device.type == "cuda" and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # a GPU per rank
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _end_with_launcher()
        ranks = Ranks.from_environment(os.environ, config.cluster, device)
    except (StartupError, ConfigError) as e:
        logs.get().error("refusing to start", reason=str(e))
        return 2
    code = _run(config, fresh, ranks)
    if ranks.distributed:
        if code != 0:
            # the other ranks may still be inside a collective: tearing the process
            # group down now can hang, or abort in gloo's threads at exit, turning a
            # refusal's status 2 into a SIGABRT (seen under load). Nothing is left to
            # write (the daemon closed its log and locks); the OS frees the rest.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        torch.distributed.destroy_process_group()
    return code


def _run(config: Config, fresh: bool, ranks: Ranks) -> int:
    try:
        # a restart by torchrun after a crash must recover, not start afresh again
        fresh = fresh and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        return Daemon(config, fresh, ranks=ranks).run()
    except (IncompatibleState, StartupError, KeyError_) as e:
        logs.get().error("refusing to start", reason=str(e))
        return 2
    except ClusterFault as e:
        logs.get().error("stopping this rank; torchrun restarts every rank", reason=str(e))
        return 1
    except Exception as e:
        if not ranks.distributed:
            raise
        # usually a rank died or hangs, and a collective failed or timed out
        # (cluster.timeout_seconds); the traceback tells another error from that
        logs.get().exception("stopping this rank (a collective failed: a rank stopped or "
                             "hangs; or an error here); torchrun restarts every rank",
                             error=f"{type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}"[:300])
        return 1


def _end_with_launcher() -> None:
    """A rank ends when its parent dies: the forkserver it was forked from, which ends
    with torchrun's agent (SIGKILL'd, or the OOM killer). A rank has a session of its
    own, so nothing else would stop it, and it would hold its state folder and port
    against the restarted ones. What it acknowledged is in its log. (Linux; elsewhere
    nothing.)"""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before that took hold
        os._exit(1)

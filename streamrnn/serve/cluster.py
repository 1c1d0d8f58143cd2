"""Several daemon ranks, one model: what the ranks agree on, and who owns which stream.

    start    ranks compare their configs (refused unless equal), rank 0 draws the
             generation, every rank binds its own endpoint, and they swap endpoints
    tick     every turn of every rank's loop, also when idle: one all_reduce of the
             named fields its components give (the daemon: stop, log blocked, weights
             check; the checkpointer: its progress), each summed over the ranks
    update   all_reduce [has a window, its targets, log blocked] before each one
             (Ranks.agree); the update itself is Engine.step's gradient sum

One process is a cluster of one: every agreement is then the process's own values, so
the daemon runs the same loop either way. The tick runs every turn (at most 50 ms
apart when idle), so no rank waits in a collective for long unless a rank is gone or
hung, and then the collective fails after cluster.timeout_seconds and torchrun
restarts every rank.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import time
from typing import Callable, Mapping

from ..config import Config, StartupError
from ..core.collective import Ranks, weights_checksum
from ..keygroups import DEFAULT_NUM_GROUPS, owner

CHECK_SECONDS = 60.0  # the ranks' weights are compared this often (a device sync)


WILDCARD_HOSTS = ("0.0.0.0", "[::]")  # how ZeroMQ reports a tcp://*:PORT it bound


def advertised(bound: str, environ: Mapping[str, str],
               hostname: Callable[[], str] = socket.getfqdn) -> str:
    """The endpoint a rank lists in `topology` for producers: the one it bound, but
    bound to every interface (tcp://*:PORT), with STREAMRNN_ADVERTISE_HOST as its host
    when set (per machine: the configs must be equal). Else, on a cluster of several
    machines, where a producer could not tell which machine a wildcard means: this
    machine's name, as Kafka's brokers advertise theirs (refused if it names this
    machine's loopback only). Else the wildcard stays, and the Producer puts in the
    host it reached the cluster at."""
    head, _, port = bound.rpartition(":")
    if not head.startswith("tcp://") or head[len("tcp://"):] not in WILDCARD_HOSTS:
        return bound
    host = environ.get("STREAMRNN_ADVERTISE_HOST")
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if not host and int(environ.get("LOCAL_WORLD_SIZE", world_size)) < world_size:
        host = hostname()
        if _loopback_only(host):
            raise StartupError(
                f"this machine's name {host!r} resolves to loopback only, so producers on "
                "other machines could not reach this rank: set STREAMRNN_ADVERTISE_HOST "
                "in its environment to a name or address they reach")
    if not host:
        return bound
    return f"tcp://[{host}]:{port}" if ":" in host and not host.startswith("[") \
        else f"tcp://{host}:{port}"


def _loopback_only(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False  # it may resolve where the producers are
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                   for a in addresses)


class ClusterFault(Exception):
    """This rank cannot go on in step with the others (it could not log a global step
    the others take): it ends, and torchrun restarts every rank, which recover the
    same state from their logs."""


class Cluster:
    def __init__(self, config: Config, ranks: Ranks):
        self.config, self.ranks = config, ranks
        self.rank, self.world_size = ranks.rank, ranks.world_size
        self.num_groups = DEFAULT_NUM_GROUPS
        self.generation = 0
        self.endpoints: list[str] = []
        self.score_endpoints: list[str] = []  # each rank's score feed ("" where none)
        self.next_check = time.monotonic() + CHECK_SECONDS

    @property
    def distributed(self) -> bool:
        return self.ranks.distributed

    # ---- start -------------------------------------------------------------------------
    def check_configs(self) -> None:
        """Ranks started with different configs are refused, naming the keys."""
        mine = self.config.to_dict()
        theirs = self.ranks.gather(mine)
        for rank, other in enumerate(theirs):
            if other != mine:
                keys = [f"{section}.{key}" for section in mine for key in mine[section]
                        if other.get(section, {}).get(key) != mine[section][key]]
                raise StartupError(
                    f"rank {rank} was started with a different config than rank "
                    f"{self.rank}: {', '.join(keys[:8])} differ. Every rank must run the "
                    "same config file and --set arguments")

    def agree_generation(self) -> int:
        """A number every rank shares and every start changes: rank 0's clock in ms."""
        mine = time.time_ns() // 1_000_000 if self.rank == 0 else 0
        self.generation = self.ranks.agree([mine])[0]
        return self.generation

    def bind_endpoint(self, endpoint: str | None = None) -> str:
        """This rank's ingest endpoint (or score feed's, `endpoint`): ingest.endpoint's
        port + rank (any free port stays any free port; ipc paths get .RANK appended)."""
        endpoint = self.config.ingest.endpoint if endpoint is None else endpoint
        if not self.distributed:
            return endpoint
        if endpoint.startswith("tcp://"):
            host, _, port = endpoint.rpartition(":")
            return endpoint if port == "*" else f"{host}:{int(port) + self.rank}"
        return f"{endpoint}.{self.rank}"

    def metrics_port(self) -> int:
        port = self.config.metrics.port
        return port + self.rank if port else 0

    def share_endpoints(self, bound: str, scores_bound: str = "") -> None:
        listed = self.ranks.gather((advertised(bound, os.environ), advertised(
            scores_bound, os.environ) if scores_bound else ""))
        self.endpoints = [ingest for ingest, _ in listed]
        self.score_endpoints = [scores for _, scores in listed]

    # ---- ownership ---------------------------------------------------------------------
    def owner(self, stream: str) -> int:
        return owner(stream, self.world_size, self.num_groups) if self.distributed else 0

    def topology(self) -> dict:
        return {"type": "topology", "rank": self.rank, "world_size": self.world_size,
                "num_groups": self.num_groups, "generation": self.generation,
                "endpoints": list(self.endpoints),
                "score_endpoints": list(self.score_endpoints)}

    # ---- agreements ----------------------------------------------------------------------
    def tick(self, fields: dict[str, int]) -> dict[str, int]:
        """One small all-reduce of these named fields, each summed over the ranks (every
        rank gives the same names: the same components at the same point)."""
        names = sorted(fields)
        return dict(zip(names, self.ranks.agree([int(fields[name]) for name in names])))

    def agree_update(self, has_window: bool, num_targets: int,
                     log_blocked: bool) -> tuple[bool, int]:
        """Whether a global update runs now (some rank has a window, and every rank's
        log can record it), and its targets over all ranks."""
        if not self.distributed:
            return has_window and not log_blocked, num_targets
        windows, targets, blocked = self.ranks.agree(
            [int(has_window), num_targets, int(log_blocked)])
        return windows > 0 and blocked == 0, targets

    def all_logged(self, logged: bool) -> bool:
        """Whether every rank logged the step it is about to take (one more small
        all-reduce per step: a disk fills between the agreement and the record)."""
        return self.ranks.agree([int(not logged)])[0] == 0

    def check_due(self) -> bool:
        """Rank 0 asks for a weights check every CHECK_SECONDS (one clock, so every rank
        checks at the same tick)."""
        if not self.distributed or self.rank or time.monotonic() < self.next_check:
            return False
        self.next_check = time.monotonic() + CHECK_SECONDS
        return True

    def check_weights(self, model) -> None:
        """The ranks' weights must be bitwise equal (they take the same steps from the
        same state); a mismatch is a bug, and training on would fork the model, so the
        rank stops with the evidence. Note: a device sync."""
        checksum = weights_checksum(list(model.parameters()))
        highest, negated_lowest = self.ranks.agree([checksum, -checksum], "max")
        if highest != -negated_lowest:
            raise ClusterFault(
                f"the ranks' weights differ (checksums {-negated_lowest} .. {highest}, "
                f"rank {self.rank}: {checksum}): they no longer hold one model. Stopping; "
                "the logs replay the same steps at the next start")

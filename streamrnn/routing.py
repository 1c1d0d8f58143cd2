"""Which daemon rank a producer talks to: a cluster's topology, as the client sees it.

Every rank of a cluster answers `topology` (README.md, "Wire protocol") with the world
size, the number of key groups, the generation and each rank's endpoint. A request
about a stream goes to the stream's owner (keygroups.owner); status, checkpoint and a
flush of all streams go to the rank asked. A single daemon is a cluster of one. Links
holds the producer's sockets, one per rank; the rest are pure functions. No torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import zmq

from .keygroups import DEFAULT_NUM_GROUPS, owner

WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]")  # a rank bound to every interface lists these

# requests about one stream: they go to its owner (any other to the rank asked)
STREAM_REQUESTS = ("tokens", "position", "predict", "generate", "flush", "end")
# status fields that add up over the ranks (counts, and rates of separate queues)
SUMMED = ("streams", "tokens_received", "tokens_trained", "bits", "queued_tokens",
          "queue_limit_tokens", "recent_tokens_per_second", "training_tokens_per_second")


@dataclass(frozen=True)
class Topology:
    world_size: int
    num_groups: int
    generation: int | None      # changes on every restart; None: a daemon before clusters
    endpoints: tuple[str, ...]  # by rank, as this client reaches them

    def owner(self, stream: str) -> int:
        return owner(stream, self.world_size, self.num_groups)

    def rank_for(self, message: dict, home: int) -> int:
        """Where a request goes: a stream's owner, or `home`, the rank asked (status,
        checkpoint, a flush of all streams: each rank answers about itself)."""
        stream = message.get("stream")
        if message.get("type") in STREAM_REQUESTS and isinstance(stream, str):
            return self.owner(stream)
        return home


def one_process(endpoint: str) -> Topology:
    """A daemon from before clusters, which answers `topology` with `unknown_type`."""
    return Topology(1, DEFAULT_NUM_GROUPS, None, (endpoint,))


def parse_topology(reply: dict, reached: str) -> Topology:
    """A `topology` reply that came over the endpoint `reached`, checked (ValueError says
    what is wrong). The rank that answered keeps `reached`: the way this client got to
    it works from here, whatever name the rank lists for itself."""
    world_size, num_groups = reply.get("world_size"), reply.get("num_groups")
    rank, endpoints = reply.get("rank"), reply.get("endpoints")
    _check(_is_int(world_size) and world_size >= 1,
           f"world_size is {world_size!r}, not a positive integer")
    _check(_is_int(num_groups) and num_groups >= world_size,
           f"num_groups is {num_groups!r}, not an integer >= world_size {world_size}")
    _check(_is_int(rank) and 0 <= rank < world_size,
           f"rank is {rank!r}, not one of 0 .. {world_size - 1}")
    _check(_is_int(reply.get("generation")),
           f"generation is {reply.get('generation')!r}, not an integer")
    _check(isinstance(endpoints, list) and len(endpoints) == world_size and
           all(isinstance(e, str) for e in endpoints),
           f"endpoints is {endpoints!r}, not {world_size} strings")
    listed = [reachable(endpoint, reached) for endpoint in endpoints]
    listed[rank] = reached
    return Topology(world_size, num_groups, reply["generation"], tuple(listed))


def reachable(endpoint: str, reached: str) -> str:
    """A rank's endpoint as it lists it, with a wildcard host (the rank binds every
    interface) replaced by the host of `reached`, an endpoint that works from here."""
    head, _, port = endpoint.rpartition(":")
    if not head.startswith("tcp://") or head[len("tcp://"):] not in WILDCARD_HOSTS:
        return endpoint
    # reached over ipc: the ranks run on this host
    host = reached.rpartition(":")[0][len("tcp://"):] if reached.startswith("tcp://") \
        else "127.0.0.1"
    return f"tcp://{host}:{port}"


class Links:
    """A socket to each rank, by rank, and one poller over them. `connect` opens a
    socket to an endpoint (with the producer's options and keys)."""

    def __init__(self, connect: Callable[[str], zmq.Socket], endpoint: str):
        self.connect = connect
        self.sockets, self.endpoints = [connect(endpoint)], [endpoint]
        self.poller = zmq.Poller()
        self.poller.register(self.sockets[0], zmq.POLLIN)

    def send(self, payload: bytes, rank: int) -> bool:
        try:
            self.sockets[rank].send(payload, zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected (immediate) or the pipe is full: try later
            return False

    def receive(self, timeout: float) -> list[tuple[bytes, int]]:
        """The replies that come within `timeout` seconds, each with its rank. All are
        read before any is handled: handling one may replace the sockets."""
        ready = dict(self.poller.poll(int(timeout * 1000)))
        replies = []
        for rank, socket in enumerate(self.sockets):
            if socket not in ready:
                continue
            while True:
                try:
                    replies.append((socket.recv(zmq.NOBLOCK), rank))
                except zmq.Again:
                    break
        return replies

    def rebuild(self, endpoints: tuple[str, ...], keep: bool) -> None:
        """Sockets to `endpoints`, by rank; with `keep`, one already connected to an
        endpoint stays (no reply on its way over it is lost)."""
        reusable = dict(zip(self.endpoints, self.sockets)) if keep else {}
        sockets = [reusable.pop(e) if e in reusable else self.connect(e) for e in endpoints]
        for socket in self.sockets:
            if socket not in sockets:
                self.poller.unregister(socket)
                socket.close(linger=0)
        for socket in sockets:
            if socket not in self.sockets:
                self.poller.register(socket, zmq.POLLIN)
        self.sockets, self.endpoints = sockets, list(endpoints)

    def close(self) -> None:
        for socket in self.sockets:
            socket.close(linger=0)


def cluster_totals(statuses: list[dict]) -> dict:
    """The cluster's numbers from the statuses of the ranks that answered: counts and
    rates add up; `updates` are global steps that every rank takes, so the largest is
    the cluster's; recent bits/token is weighted by each rank's recent throughput."""
    answered = [s for s in statuses if "error" not in s]
    totals: dict[str, Any] = {}
    for name in SUMMED:
        values = [s[name] for s in answered if s.get(name) is not None]
        totals[name] = sum(values) if values else None
    totals["updates"] = max((s["updates"] for s in answered), default=0)
    recent = [(s["recent_bits_per_token"], s["recent_tokens_per_second"])
              for s in answered if s.get("recent_bits_per_token") is not None]
    weight = sum(tokens for _, tokens in recent)
    totals["recent_bits_per_token"] = (sum(bits * tokens for bits, tokens in recent) / weight
                                       if weight else None)
    return totals


def _is_int(value: Any) -> bool:
    return type(value) is int  # not a bool


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)

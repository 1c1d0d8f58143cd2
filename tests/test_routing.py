"""The producer against a cluster of ranks, given any one of them: fake ranks (real
ROUTER sockets on loopback, a thread each) that own streams as keygroups.owner says."""
from __future__ import annotations

import io
import json
import threading
from collections import Counter

import msgpack
import numpy as np
import pytest
import zmq

from streamrnn import cli, feed, keygroups, report
from streamrnn.client import Producer
from streamrnn.routing import cluster_totals, parse_topology, reachable
from streamrnn.wire import WIDTHS

WILDCARDS = ("0.0.0.0", "*", "[::]")  # how the fake ranks list their hosts, by rank


class FakeCluster:
    """Ranks that answer like a cluster's: each acks tokens for the streams it owns (a
    bytearray each; a gap past a stream's end), says `moved` for the others and answers
    topology, position, flush and status. A restart (after `restart_at` tokens messages)
    starts generation 2 with the ranks in the other order (or, to `shrink`, with socket 0
    alone and socket 1 silent), each stream's bytes carried to its new owner, as a real
    cluster recovers them. `knows_topology=False` is one daemon from before clusters."""

    def __init__(self, world_size: int = 2, knows_topology: bool = True,
                 restart_at: int | None = None, shrink: bool = False):
        self.world_size, self.knows_topology = world_size, knows_topology
        self.restart_at, self.shrink, self.generation = restart_at, shrink, 1
        self.sockets = []
        for _ in range(world_size):
            socket = zmq.Context.instance().socket(zmq.ROUTER)
            socket.linger = 0
            socket.bind("tcp://127.0.0.1:*")
            self.sockets.append(socket)
        self.bound = [s.getsockopt_string(zmq.LAST_ENDPOINT) for s in self.sockets]
        self.order = list(range(world_size))  # rank r answers on socket order[r]
        self.held: list[dict[str, bytearray]] = [{} for _ in self.sockets]  # by socket
        self.flushed: list[list[str]] = [[] for _ in self.sockets]
        self.accepted: Counter[str] = Counter()  # tokens appended, over all acks
        self.tokens_messages = self.moved = 0
        self.silent: set[int] = set()  # sockets that do not answer status
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._serve, args=(i,), daemon=True)
                        for i in range(world_size)]
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)
        for socket in self.sockets:
            socket.close(linger=0)

    def listed(self) -> list[str]:
        """The endpoints a topology reply lists, by rank: wildcard hosts."""
        return [f"tcp://{WILDCARDS[r % 3]}:{self.bound[i].rpartition(':')[2]}"
                for r, i in enumerate(self.order)]

    def owner_socket(self, stream: str) -> int:
        return self.order[keygroups.owner(stream, self.world_size)]

    def _serve(self, index: int) -> None:
        socket = self.sockets[index]
        while not self.stop.is_set():
            if not socket.poll(20):
                continue
            identity, payload = socket.recv_multipart()
            request = msgpack.unpackb(payload, raw=False)
            with self.lock:
                reply = self._answer(index, request)
            if reply is not None:
                socket.send_multipart([identity, msgpack.packb(
                    {**reply, "id": request.get("id")}, use_bin_type=True)])

    def _answer(self, index: int, r: dict) -> dict | None:
        kind, stream = r["type"], r.get("stream")
        if kind == "tokens":
            self.tokens_messages += 1
            if self.tokens_messages == self.restart_at:
                self._restart()
        if index not in self.order:
            return None  # a rank the cluster restarted without
        rank = self.order.index(index)
        if kind == "topology":
            if not self.knows_topology:
                return {"type": "nack", "reason": "unknown_type", "message": "no topology"}
            return {"type": "topology", "rank": rank, "world_size": self.world_size,
                    "num_groups": keygroups.DEFAULT_NUM_GROUPS,
                    "generation": self.generation, "endpoints": self.listed()}
        if kind == "status":
            return None if index in self.silent else self._status(index)
        if kind == "flush" and stream is None:
            return {"type": "flush", "stream": None, "scheduled": len(self.held[index])}
        owner = keygroups.owner(stream, self.world_size)
        if owner != rank:
            self.moved += 1
            return {"type": "nack", "reason": "moved", "message": "another rank's",
                    "stream": stream, "rank": owner, "endpoint": self.listed()[owner],
                    "generation": self.generation}
        data = self.held[index].setdefault(stream, bytearray())
        if kind == "position":
            return {"type": "position", "stream": stream, "next_offset": len(data)}
        if kind == "flush":
            self.flushed[index].append(stream)
            return {"type": "flush", "stream": stream, "scheduled": 1}
        if r["offset"] > len(data):
            return {"type": "nack", "reason": "gap", "message": "gap", "stream": stream,
                    "next_offset": len(data)}
        tokens = np.frombuffer(r["tokens"], WIDTHS[r["width"]])
        new = tokens[len(data) - r["offset"]:].astype(np.uint8)
        data.extend(new.tobytes())
        self.accepted[stream] += len(new)
        return {"type": "ack", "stream": stream, "next_offset": len(data),
                "accepted": len(new), "duplicates": len(tokens) - len(new)}

    def restart(self) -> None:
        """A restart now, between the producer's requests, not at a tokens message."""
        with self.lock:
            self._restart()

    def _restart(self) -> None:
        self.generation += 1
        if self.shrink:
            self.world_size, self.order = 1, [0]
        else:
            self.order.reverse()
        everything = [item for held in self.held for item in held.items()]
        self.held = [{} for _ in self.sockets]
        for stream, data in everything:
            self.held[self.owner_socket(stream)][stream] = data

    def _status(self, index: int) -> dict:
        received = sum(len(d) for d in self.held[index].values())
        return {"type": "status", "version": "0.2.0", "uptime_seconds": 3725.0,
                "device": "cpu", "model": "lstm 1x16", "vocab_size": 256, "tbptt": [4, 8],
                "updates": 10 + index, "tokens_trained": received, "bits": 2.0 * received,
                "tokens_received": received, "streams": len(self.held[index]),
                "queued_tokens": index, "queue_limit_tokens": 1000,
                "recent_bits_per_token": 1.0 + index,
                "recent_tokens_per_second": 100.0 * (index + 1),
                "training_tokens_per_second": None, "last_checkpoint": None}


@pytest.fixture
def make_cluster():
    made = []

    def make(*args, **kwargs) -> FakeCluster:
        made.append(FakeCluster(*args, **kwargs))
        return made[-1]

    yield make
    for cluster in made:
        cluster.close()


def streams_of_both_ranks(count: int = 8) -> list[str]:
    streams = [f"sensor-{i}" for i in range(count)]
    assert {keygroups.owner(s, 2) for s in streams} == {0, 1}
    return streams


def send_all(producer: Producer, streams: list[str], size: int, seed: int) -> dict:
    data = {s: np.random.default_rng([seed, i]).integers(0, 256, size, np.uint8)
            for i, s in enumerate(streams)}
    for begin in range(0, size, 100):  # interleaved, as feed does
        for stream in streams:
            producer.send(stream, data[stream][begin:begin + 100])
    producer.flush(timeout=10)
    return data


def assert_landed_once(cluster: FakeCluster, sent: dict[str, bytes]) -> None:
    """Each stream's bytes, all of them in order, on its owner and nowhere else; no
    byte appended twice."""
    for stream, data in sent.items():
        holders = [i for i, held in enumerate(cluster.held) if held.get(stream)]
        assert holders == [cluster.owner_socket(stream)], (stream, holders)
        assert bytes(cluster.held[holders[0]][stream]) == data, stream
        assert cluster.accepted[stream] == len(data), stream


def test_a_producer_given_one_rank_feeds_streams_of_every_rank(make_cluster):
    cluster = make_cluster()
    streams = streams_of_both_ranks()
    with Producer(cluster.bound[1], max_tokens_per_message=30) as producer:
        sent = send_all(producer, streams, 1000, seed=1)
        assert_landed_once(cluster, {s: d.tobytes() for s, d in sent.items()})
        assert cluster.moved == 0  # every message went to its owner at once
        assert producer.stats.tokens_acked == 8 * 1000
        topology = producer.topology()
        assert (topology.world_size, topology.generation) == (2, 1)
        assert list(topology.endpoints) == cluster.bound  # wildcard hosts replaced
        assert [producer.position(s) for s in streams] == [1000] * 8
        assert producer.request({"type": "flush"})["scheduled"] == \
            len(cluster.held[1])  # a flush of all streams: the rank asked, only
        assert cluster.moved == 0


def test_a_stale_topology_is_followed_through_moved(make_cluster):
    # the cluster restarts in the middle of the feed, its ranks in the other order: the
    # producer's unacked messages (and later requests) meet `moved`, learn the new
    # topology and go to the new owners, which hold the streams' bytes so far
    cluster = make_cluster(restart_at=12)
    streams = streams_of_both_ranks()
    with Producer(cluster.bound[1], max_tokens_per_message=30, reply_timeout=1) as producer:
        sent = send_all(producer, streams, 1000, seed=2)
        assert cluster.generation == 2 and cluster.moved > 0
        assert producer.topology().generation == 2
        assert producer.topology().endpoints == tuple(reversed(cluster.bound))
        assert producer.stats.tokens_acked == 8 * 1000  # moved is no ack: none twice
        more = send_all(producer, streams, 300, seed=3)
        assert_landed_once(cluster, {s: sent[s].tobytes() + more[s].tobytes()
                                     for s in streams})
        assert producer.stats.tokens_acked == 8 * 1300


def test_a_rank_gone_silent_makes_the_producer_ask_another(make_cluster):
    # the cluster restarts with one rank: rank 1's endpoint never answers again, and no
    # rank says `moved` for its streams; the producer asks rank 0 for the topology
    cluster = make_cluster(restart_at=12, shrink=True)
    streams = streams_of_both_ranks()
    with Producer(cluster.bound[0], max_tokens_per_message=30,
                  reply_timeout=0.3) as producer:
        sent = send_all(producer, streams, 1000, seed=7)
        assert producer.topology().endpoints == (cluster.bound[0],)
        assert_landed_once(cluster, {s: d.tobytes() for s, d in sent.items()})
        assert producer.stats.tokens_acked == 8 * 1000


def test_a_request_to_a_rank_gone_silent_makes_the_producer_ask_another(make_cluster):
    # the same restart, but after every message was acked: nothing in the window waits
    # on rank 1, so only a request's own silence can tell the producer it is gone
    cluster = make_cluster(shrink=True)
    streams = streams_of_both_ranks()
    with Producer(cluster.bound[0], max_tokens_per_message=30, reply_timeout=0.3,
                  retry_seconds=5) as producer:
        sent = send_all(producer, streams, 200, seed=8)
        cluster.restart()
        of_rank_1 = next(s for s in streams if keygroups.owner(s, 2) == 1)
        assert producer.position(of_rank_1) == 200  # asked of its new owner, rank 0
        assert producer.topology().endpoints == (cluster.bound[0],)
        more = send_all(producer, streams, 100, seed=9)
        assert_landed_once(cluster, {s: sent[s].tobytes() + more[s].tobytes()
                                     for s in streams})


def test_a_daemon_from_before_clusters_is_one_process(make_cluster):
    cluster = make_cluster(world_size=1, knows_topology=False)
    with Producer(cluster.bound[0]) as producer:
        sent = send_all(producer, ["a", "b"], 500, seed=4)
        assert_landed_once(cluster, {s: d.tobytes() for s, d in sent.items()})
        topology = producer.topology()
        assert (topology.world_size, topology.generation) == (1, None)
        assert topology.endpoints == (cluster.bound[0],)
        status = producer.cluster_status()
        assert status["world_size"] == 1 and status["totals"]["tokens_received"] == 1000


def test_cluster_status_sums_the_ranks(make_cluster):
    cluster = make_cluster()
    with Producer(cluster.bound[0], reply_timeout=0.5) as producer:
        send_all(producer, streams_of_both_ranks(), 200, seed=5)
        status = producer.cluster_status()
        assert status["world_size"] == 2 and status["generation"] == 1
        assert [(r["rank"], r["endpoint"]) for r in status["ranks"]] == \
            list(enumerate(cluster.bound))
        held = [sum(len(d) for d in h.values()) for h in cluster.held]
        assert [r["tokens_received"] for r in status["ranks"]] == held
        totals = status["totals"]
        assert totals["tokens_received"] == totals["tokens_trained"] == 8 * 200
        assert totals["bits"] == 2.0 * 8 * 200 and totals["streams"] == 8
        assert totals["queued_tokens"] == 1 and totals["queue_limit_tokens"] == 2000
        assert totals["recent_tokens_per_second"] == 300.0
        assert totals["updates"] == 11  # global steps: the largest, not the sum
        assert totals["recent_bits_per_token"] == pytest.approx((1 * 100 + 2 * 200) / 300)
        assert totals["training_tokens_per_second"] is None
        cluster.silent.add(1)
        status = producer.cluster_status()
        assert status["ranks"][1] == {"rank": 1, "endpoint": cluster.bound[1],
                                      "error": "no answer"}
        assert status["totals"]["tokens_received"] == held[0]


def test_streamrnn_status_prints_every_rank_and_the_totals(make_cluster, capsys):
    cluster = make_cluster()
    with Producer(cluster.bound[0]) as producer:
        send_all(producer, streams_of_both_ranks(), 200, seed=6)
    cluster.silent.add(1)
    # a rank that does not answer is shown, and the exit status says so
    assert cli.main(["status", "--endpoint", cluster.bound[0], "--timeout", "0.5"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("streamrnn 0.2.0, a cluster of 2 ranks (generation 1): lstm 1x16, "
                        "TBPTT(4, 8)")
    assert lines[1].startswith(f"rank 0  {cluster.bound[0]}  cpu, up 1h02m05s, ")
    assert lines[2] == f"rank 1  {cluster.bound[1]}  no answer"
    received = sum(len(d) for d in cluster.held[0].values())
    assert f"tokens received {received:,}  (queued, not trained yet: 0)" in lines
    assert cli.main(["status", "--endpoint", cluster.bound[1], "--timeout", "0.5",
                     "--json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["world_size"] == 2 and printed["ranks"][1]["error"] == "no answer"
    cluster.silent.clear()
    assert cli.main(["status", "--endpoint", cluster.bound[1], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["tokens_received"] == 8 * 200


def test_streamrnn_status_of_one_daemon_prints_what_it_always_did(make_cluster, capsys):
    cluster = make_cluster(world_size=1, knows_topology=False)
    assert cli.main(["status", "--endpoint", cluster.bound[0]]) == 0
    status = {k: v for k, v in cluster._status(0).items() if k != "type"}
    assert capsys.readouterr().out == report.format_status(status) + "\n"
    assert cli.main(["status", "--endpoint", cluster.bound[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == status


def test_feed_flushes_each_stream_at_its_owner(make_cluster, tmp_path):
    cluster = make_cluster()
    paths = {}  # owner -> a file whose path (its stream's name) that rank owns
    for i in range(64):
        path = tmp_path / f"log-{i}.txt"
        paths.setdefault(keygroups.owner(str(path), 2), path)
    for owner, path in paths.items():
        path.write_bytes(bytes(range(256)) * (owner + 2))
    files = [str(paths[0]), str(paths[1])]
    assert feed.run(cluster.bound[1], files, None, retry_seconds=5, chunk=100,
                    flush=True, out=io.StringIO()) == 0
    for owner, path in paths.items():
        assert cluster.flushed[owner] == [str(path)]
        assert bytes(cluster.held[owner][str(path)]) == path.read_bytes()


@pytest.mark.parametrize("listed,reached,expected", [
    ("tcp://0.0.0.0:5558", "tcp://node-1:5557", "tcp://node-1:5558"),
    ("tcp://*:5558", "tcp://10.1.2.3:5557", "tcp://10.1.2.3:5558"),
    ("tcp://[::]:5558", "tcp://[::1]:5557", "tcp://[::1]:5558"),
    ("tcp://node-2:5558", "tcp://node-1:5557", "tcp://node-2:5558"),  # a real host stays
    ("tcp://0.0.0.0:5558", "ipc:///run/streamrnn.0", "tcp://127.0.0.1:5558"),
    ("ipc:///run/streamrnn.1", "ipc:///run/streamrnn.0", "ipc:///run/streamrnn.1"),
])
def test_a_wildcard_host_becomes_the_host_given(listed, reached, expected):
    assert reachable(listed, reached) == expected


@pytest.mark.parametrize("change,words", [
    ({"world_size": 0}, "world_size is 0"),
    ({"rank": 2}, "rank is 2, not one of 0 .. 1"),
    ({"num_groups": 1}, "num_groups is 1"),
    ({"generation": None}, "generation is None"),
    ({"endpoints": ["tcp://a:1"]}, "not 2 strings"),
])
def test_a_topology_reply_is_checked(change, words):
    reply = {"type": "topology", "rank": 1, "world_size": 2, "num_groups": 256,
             "generation": 7, "endpoints": ["tcp://*:5557", "tcp://*:5558"], **change}
    with pytest.raises(ValueError, match=words):
        parse_topology(reply, "tcp://node:5558")


def test_the_rank_reached_keeps_the_endpoint_it_was_reached_by():
    reply = {"type": "topology", "rank": 1, "world_size": 2, "num_groups": 256,
             "generation": 7, "endpoints": ["tcp://*:5557", "tcp://node.lan:5558"]}
    assert parse_topology(reply, "tcp://node:5558").endpoints == \
        ("tcp://node:5557", "tcp://node:5558")


def test_totals_skip_ranks_that_did_not_answer():
    totals = cluster_totals([{"rank": 0, "error": "no answer"}])
    assert totals["streams"] is None and totals["updates"] == 0
    assert totals["recent_bits_per_token"] is None


def test_a_rank_bound_to_every_interface_lists_a_host_producers_can_reach():
    from streamrnn.config import StartupError
    from streamrnn.serve.cluster import advertised
    one_machine = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    two_machines = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
    hostname = lambda: "node-7.example"  # noqa: E731
    # one machine: the wildcard stays; the Producer puts in the host it reached
    assert advertised("tcp://0.0.0.0:5558", one_machine, hostname) == "tcp://0.0.0.0:5558"
    assert advertised("tcp://0.0.0.0:5558", two_machines, hostname) == \
        "tcp://node-7.example:5558"
    assert advertised("tcp://[::]:5558", two_machines, hostname) == \
        "tcp://node-7.example:5558"
    named = {**two_machines, "STREAMRNN_ADVERTISE_HOST": "10.0.0.7"}
    assert advertised("tcp://0.0.0.0:5558", named, hostname) == "tcp://10.0.0.7:5558"
    assert advertised("tcp://0.0.0.0:5558", {**named, "STREAMRNN_ADVERTISE_HOST": "fd00::7"},
                      hostname) == "tcp://[fd00::7]:5558"
    with pytest.raises(StartupError, match="STREAMRNN_ADVERTISE_HOST"):
        advertised("tcp://0.0.0.0:5558", two_machines, lambda: "localhost")
    # a host of its own, or ipc: listed as bound
    assert advertised("tcp://10.1.2.3:5558", two_machines, hostname) == "tcp://10.1.2.3:5558"
    assert advertised("ipc:///run/s.1", named, hostname) == "ipc:///run/s.1"


def test_ranks_on_several_machines_refuse_torchruns_shared_store():
    """torchrun's agents keep one store across restarts and count restarts apart, so
    ranks on several machines could not find each other's attempt: they say what to
    set instead of hanging."""
    from streamrnn.config import StartupError
    from streamrnn.core.collective import _attempt_prefix
    assert _attempt_prefix({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                            "TORCHELASTIC_RESTART_COUNT": "3"}) == "streamrnn/attempt-3/"
    with pytest.raises(StartupError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        _attempt_prefix({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
                         "TORCHELASTIC_RESTART_COUNT": "0"})


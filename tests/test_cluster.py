"""`streamrnn serve --nproc 2`: two real ranks (gloo, loopback), real sockets and files.

Each test starts torchrun's launcher in a subprocess, as the systemd unit does; the
ranks' own endpoints are the base port and the one after it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import TINY, ClusterProcess, RawClient, load_checkpoint
from streamrnn.keygroups import owner

pytestmark = [pytest.mark.slow,  # every test starts ranks under torchrun
              pytest.mark.usefixtures("long_windows"),
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="this torch build has no torch.distributed")]

TEXT = (Path(__file__).parent.parent / "README.md").read_bytes()


def streams_on_both(count: int) -> list[str]:
    """Stream ids, half of them owned by each of two ranks."""
    ids = [f"stream-{i}" for i in range(200)]
    by_rank = [[s for s in ids if owner(s, 2) == r][:count // 2] for r in (0, 1)]
    return by_rank[0] + by_rank[1]


def send(cluster: ClusterProcess, stream: str, offset: int, data: bytes,
         timeout: float = 30) -> dict:
    return cluster.ask(owner(stream, 2), {"type": "tokens", "stream": stream,
                                          "offset": offset, "tokens": data, "width": 1},
                       timeout=timeout)


def statuses(cluster: ClusterProcess) -> list[dict]:
    return [cluster.ask(r, {"type": "status"}) for r in range(cluster.world_size)]


def wait_trained(cluster: ClusterProcess, stall_seconds: float = 45) -> list[dict]:
    """Until every rank's queue is empty and every rank has run the same updates (the
    ranks are asked one after another: a flush's update may fall between two answers).
    A slow machine may take minutes; what fails is a cluster that stops training, or
    whose ranks disagree on their updates, for `stall_seconds`."""
    import time
    trained, last_progress = -1, time.monotonic()
    while time.monotonic() - last_progress < stall_seconds:
        s = statuses(cluster)
        if all(r["queued_tokens"] == 0 for r in s) and len({r["updates"] for r in s}) == 1:
            return s
        if sum(r["tokens_trained"] for r in s) > trained:
            trained, last_progress = sum(r["tokens_trained"] for r in s), time.monotonic()
        for r in range(cluster.world_size):
            cluster.ask(r, {"type": "flush"})
        time.sleep(0.3)
    raise TimeoutError(f"training stalled for {stall_seconds} s: {statuses(cluster)}")


def committed_totals(state: Path) -> dict:
    """Lifetime totals of the newest committed checkpoint, summed over its parts."""
    files = load_checkpoint(sorted((state / "checkpoints").glob("checkpoint-*.json"))[-1])
    parts, replicated = files["parts"], files["replicated"]
    return {"step": files["manifest"]["step"], "ranks": files["manifest"]["world_size"],
            "updates": replicated["learner"]["totals"]["updates"],
            "tokens_trained": sum(p["totals"]["tokens_trained"] for p in parts),
            "streams": sum(len(p["streams"]["ids"]) for p in parts),
            "model": replicated["learner"]["model"]}


def test_two_ranks_share_streams_route_checkpoint_and_recover(tmp_path):
    cluster = ClusterProcess(tmp_path, [f"checkpoint.dir={tmp_path / 'state'}"]).start()
    topologies = [cluster.topology(r) for r in (0, 1)]
    assert [t["rank"] for t in topologies] == [0, 1]
    assert all(t["world_size"] == 2 and t["num_groups"] == 256 and
               t["endpoints"] == cluster.endpoints for t in topologies)
    streams = streams_on_both(6)
    sizes = {s: 600 + 100 * i for i, s in enumerate(streams)}
    for stream in streams:
        wrong = 1 - owner(stream, 2)
        moved = cluster.ask(wrong, {"type": "tokens", "stream": stream, "offset": 0,
                                    "tokens": TEXT[:50], "width": 1})
        assert moved["type"] == "nack" and moved["reason"] == "moved"
        assert moved["rank"] == owner(stream, 2)
        assert moved["endpoint"] == cluster.endpoints[owner(stream, 2)]
        assert moved["generation"] == topologies[0]["generation"]
        for offset in range(0, sizes[stream], 100):
            reply = send(cluster, stream, offset, TEXT[offset:offset + 100])
            assert reply["type"] == "ack", reply
    for stream in streams:  # the moved nack acknowledged nothing on the wrong rank
        assert cluster.ask(1 - owner(stream, 2), {"type": "position", "stream": stream}
                           )["reason"] == "moved"
    ranks = wait_trained(cluster)
    assert ranks[0]["updates"] == ranks[1]["updates"] > 0  # every update is global
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]  # one model
    assert [r["streams"] for r in ranks] == [3, 3]
    trained = sum(r["tokens_trained"] for r in ranks)
    assert trained == sum(sizes.values()) - len(streams)  # every target, exactly once
    from streamrnn.client import Producer
    with Producer(cluster.endpoints[0]) as producer:  # given rank 0, asked of the owner
        for stream in (streams[0], streams[-1]):  # owned by rank 0, by rank 1
            top = producer.predict(stream, top_k=3)
            assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] > 0
            sampled = producer.generate(stream, 30, seed=7)
            assert len(sampled) == 30 and sampled == producer.generate(stream, 30, seed=7)
    saved = cluster.ask(1, {"type": "checkpoint"})  # asked of any rank: the cluster's
    assert saved["ok"] and saved["path"].endswith(".json")
    assert cluster.stop() == 0
    stopped = [e for e in cluster.events() if e.get("event") == "stopped"]
    assert sorted(e["rank"] for e in stopped) == [0, 1]
    totals = committed_totals(tmp_path / "state")
    assert totals["tokens_trained"] == trained and totals["streams"] == 6
    assert totals["updates"] == ranks[0]["updates"]
    listed = subprocess.run([sys.executable, "-m", "streamrnn", "checkpoint", "list",
                             str(tmp_path / "state")], capture_output=True, text=True)
    assert listed.returncode == 0 and "checkpoints/checkpoint-" in listed.stdout
    assert f"2 ranks, {totals['updates']:,} updates" in listed.stdout.splitlines()[0]

    again = ClusterProcess(tmp_path, [f"checkpoint.dir={tmp_path / 'state'}"]).start()
    ranks_after = statuses(again)
    assert [r["tokens_trained"] for r in ranks_after] == [r["tokens_trained"] for r in ranks]
    assert ranks_after[0]["weights_checksum"] == ranks[0]["weights_checksum"]
    assert ranks_after[0]["generation"] != ranks[0]["generation"]
    for stream in streams:
        position = again.ask(owner(stream, 2), {"type": "position", "stream": stream})
        assert position["next_offset"] == sizes[stream]
    assert again.stop() == 0


@pytest.mark.slow
def test_sigkill_ranks_twice_loses_nothing_and_recovery_is_deterministic(tmp_path):
    """torchrun restarts both ranks each time one is killed; `streamrnn feed`, given
    rank 1's endpoint, rides through. Afterwards every target was trained exactly
    once, the ranks hold one model, and a cluster started on a copy of the state
    (after killing everything at once) rebuilds that model bit for bit."""
    import random
    import time
    state = tmp_path / "state"
    cluster = ClusterProcess(tmp_path, [f"checkpoint.dir={state}",
                                        "checkpoint.interval_seconds=2",
                                        "cluster.timeout_seconds=15"], max_restarts=2).start()
    names = [f"file-{i}.txt" for i in range(60)]
    names = [n for n in names if owner(n, 2) == 0][:3] + [n for n in names if owner(n, 2) == 1][:3]
    sources = sorted(Path(__file__).parent.glob("*.py"))
    sizes = {}
    for i, name in enumerate(names):
        data = b"".join(p.read_bytes() for p in sources[i::6])[:12_000 + 2_000 * i]
        (tmp_path / name).write_bytes(data)
        sizes[name] = len(data)
    feed = subprocess.Popen(
        [sys.executable, "-m", "streamrnn", "feed", "--endpoint", cluster.endpoints[1],
         "--retry-seconds", "180", "--chunk", "1000", *names], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rng = random.Random(7)
    generation = cluster.wait_ready()
    for _ in range(2):
        time.sleep(rng.uniform(1.0, 3.0))
        victim = rng.choice(cluster.rank_pids())
        os.kill(victim, signal.SIGKILL)
        generation = cluster.wait_ready(after_generation=generation)
    output = feed.communicate(timeout=300)[0].decode()
    assert feed.returncode == 0, output
    ranks = wait_trained(cluster)
    for name, size in sizes.items():
        assert cluster.ask(owner(name, 2), {"type": "position", "stream": name}
                           )["next_offset"] == size
    assert sum(r["tokens_trained"] for r in ranks) == sum(sizes.values()) - len(names)
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    starts = [e for e in cluster.events() if e.get("event") == "listening"]
    assert len(starts) == 6, "three starts of two ranks"  # two restarts

    cluster.kill_all()  # no final checkpoint: the copy must replay its logs
    shutil.copytree(state, tmp_path / "copy")
    (tmp_path / "copy" / "lock").unlink(missing_ok=True)
    again = ClusterProcess(tmp_path, [f"checkpoint.dir={tmp_path / 'copy'}"]).start()
    rebuilt = statuses(again)
    assert [r["weights_checksum"] for r in rebuilt] == [ranks[0]["weights_checksum"]] * 2
    assert [r["tokens_trained"] for r in rebuilt] == [r["tokens_trained"] for r in ranks]
    assert [r["updates"] for r in rebuilt] == [r["updates"] for r in ranks]
    assert again.stop() == 0
    totals = committed_totals(tmp_path / "copy")
    assert totals["tokens_trained"] == sum(sizes.values()) - len(names)


def test_two_machines_meet_at_a_rendezvous_and_recover_together(tmp_path):
    """`serve --nnodes 2 --rdzv-endpoint HOST:PORT` on each of two machines (here two
    launchers on loopback, one rank each, one state folder). Ranks bound to every
    interface list the host STREAMRNN_ADVERTISE_HOST names. A rank killed on one
    machine makes both launchers restart their ranks (one of them may count no restart:
    it restarts for the new rendezvous round): they must still meet, and `--fresh`,
    passed to both again, must not set anything aside."""
    import time
    state = tmp_path / "state"
    cluster = ClusterProcess(tmp_path, [f"checkpoint.dir={state}",
                                        "checkpoint.interval_seconds=2",
                                        "cluster.timeout_seconds=15"],
                             nproc=1, nnodes=2, max_restarts=2)
    cluster.overrides.append(f"ingest.endpoint=tcp://*:{cluster.port}")
    cluster.start(args=("--fresh",), env={"STREAMRNN_ADVERTISE_HOST": "127.0.0.1"})
    topologies = [cluster.topology(r) for r in (0, 1)]
    assert all(t["world_size"] == 2 and t["endpoints"] == cluster.endpoints
               for t in topologies)
    names = [f"file-{i}.txt" for i in range(40)]
    names = [n for n in names if owner(n, 2) == 0][:2] + [n for n in names if owner(n, 2) == 1][:2]
    sizes = {}
    for i, name in enumerate(names):
        data = TEXT[i * 1000:][:8_000 + 1_000 * i]
        (tmp_path / name).write_bytes(data)
        sizes[name] = len(data)
    feed = subprocess.Popen(
        [sys.executable, "-m", "streamrnn", "feed", "--endpoint", cluster.endpoints[1],
         "--retry-seconds", "180", "--chunk", "1000", *names], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    generation = cluster.wait_ready()
    time.sleep(1.5)
    os.kill(cluster.rank_pids(node=1)[0], signal.SIGKILL)
    cluster.wait_ready(after_generation=generation)
    output = feed.communicate(timeout=300)[0].decode()
    assert feed.returncode == 0, output
    ranks = wait_trained(cluster)
    for name, size in sizes.items():
        assert cluster.ask(owner(name, 2), {"type": "position", "stream": name}
                           )["next_offset"] == size
    assert sum(r["tokens_trained"] for r in ranks) == sum(sizes.values()) - len(names)
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    # both ranks started again (torchrun may take more than one round for it)
    assert len([e for e in cluster.events() if e.get("event") == "listening"]) >= 4
    assert len(list(state.joinpath("fresh-done").read_text().split())) == 2  # its ids
    assert not [e for e in cluster.events() if e.get("event", "").startswith("fresh start")]
    assert cluster.stop() == 0
    assert committed_totals(state)["tokens_trained"] == sum(sizes.values()) - len(names)


def test_a_machine_that_never_joins_is_named_after_join_seconds(tmp_path):
    """One launcher of two: it waits cluster.join_seconds at the rendezvous, then says
    where it waited and for what, and starts no rank."""
    from harness import free_ports
    port = free_ports(2)
    command = [sys.executable, "-m", "streamrnn", "serve", "--nproc", "1", "--nnodes", "2",
               "--rdzv-endpoint", f"127.0.0.1:{port + 1}"]
    for item in [*TINY, f"checkpoint.dir={tmp_path / 'state'}", "cluster.join_seconds=3",
                 f"ingest.endpoint=tcp://127.0.0.1:{port}", "metrics.port=0"]:
        command += ["--set", item]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"did not all meet at 127.0.0.1:{port + 1} within 3 s" in done.stderr
    assert not (tmp_path / "state").exists()


def positions(cluster: ClusterProcess, streams: list[str]) -> dict[str, int]:
    return {s: cluster.ask(owner(s, cluster.world_size), {"type": "position", "stream": s}
                           )["next_offset"] for s in streams}


@pytest.mark.slow
def test_the_number_of_ranks_changes_after_a_clean_stop_and_after_a_crash(tmp_path):
    """1 process -> 2 ranks -> 3 ranks (clean stops) -> 2 ranks (after a crash) -> 1
    process (after a crash): key groups move with their streams' state, every stream
    continues where it was, every acknowledged token is trained once, totals carry
    over. Refused, touching nothing: a layout whose rank still runs."""
    import time
    from harness import DaemonProcess
    state = tmp_path / "state"
    streams = [f"stream-{i}" for i in range(8)]
    single = DaemonProcess(tmp_path, [f"checkpoint.dir={state}", "train.cpu_threads=1"]).start()
    with RawClient(single.endpoint) as client:
        for i, stream in enumerate(streams):
            reply = client.ask({"type": "tokens", "stream": stream, "offset": 0,
                                "tokens": TEXT[:300 + 50 * i], "width": 1})
            assert reply["type"] == "ack", reply
        before = client.ask({"type": "status"})
        while before["queued_tokens"]:  # trained to the end: the weights stand still
            client.ask({"type": "flush"})
            time.sleep(0.2)
            before = client.ask({"type": "status"})
    assert single.stop() == 0
    sent = {s: 300 + 50 * i for i, s in enumerate(streams)}

    for nproc in (2, 3):
        cluster = ClusterProcess(tmp_path, [f"checkpoint.dir={state}"], nproc=nproc).start()
        assert positions(cluster, streams) == sent
        ranks = statuses(cluster)
        assert sum(r["streams"] for r in ranks) == len(streams)
        assert all(r["streams"] > 0 for r in ranks)
        assert len({r["weights_checksum"] for r in ranks} | {before["weights_checksum"]}) == 1
        assert all(r["updates"] == before["updates"] for r in ranks)
        for stream in streams:  # more for every stream, from where it stands
            offset = sent[stream]
            reply = cluster.ask(owner(stream, nproc), {
                "type": "tokens", "stream": stream, "offset": offset,
                "tokens": TEXT[offset:offset + 200], "width": 1})
            assert reply["type"] == "ack", reply
            sent[stream] += 200
        wait_trained(cluster)
        before = statuses(cluster)[0]
        assert cluster.stop() == 0
    totals = committed_totals(state)
    assert totals["tokens_trained"] == sum(sent.values()) - len(streams)
    assert totals["ranks"] == 3 and not list((state / "logs").glob("rank-*-of-2"))

    # a crash, and another number of ranks: every old rank's log is replayed
    crashed = ClusterProcess(tmp_path, [f"checkpoint.dir={state}"], nproc=3).start()
    for stream in [*streams, "late"]:
        offset = sent.get(stream, 0)
        assert crashed.ask(owner(stream, 3), {
            "type": "tokens", "stream": stream, "offset": offset,
            "tokens": TEXT[offset:offset + 130], "width": 1})["type"] == "ack"
        sent[stream] = offset + 130
    crashed.kill_all()
    two = ClusterProcess(tmp_path, [f"checkpoint.dir={state}"], nproc=2).start()
    assert positions(two, list(sent)) == sent
    assert "took over the state of another layout" in two.log()
    ranks = wait_trained(two)
    assert sum(r["tokens_trained"] for r in ranks) == sum(sent.values()) - len(sent)
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    for stream in sent:  # and a little more, acknowledged by the two ranks only
        offset = sent[stream]
        assert two.ask(owner(stream, 2), {"type": "tokens", "stream": stream,
                                          "offset": offset, "tokens": TEXT[:40],
                                          "width": 1})["type"] == "ack"
        sent[stream] += 40
    two.kill_all()

    # refused with a message, touching nothing: a rank of that layout still runs (it
    # holds its log's lock)
    running = tmp_path / "running"
    shutil.copytree(state, running)
    (running / "lock").unlink()
    set_aside = sorted(running.glob("previous-*"))
    import fcntl
    with open(running / "logs" / "rank-1-of-2.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = DaemonProcess(tmp_path, [f"checkpoint.dir={running}"]).start(wait=False)
        assert refused.proc.wait(timeout=60) == 2
        assert "is in use" in refused.log(), refused.log()[-2000:]
        assert list((running / "logs").glob("rank-*-of-2/wal-*.log"))
        assert sorted(running.glob("previous-*")) == set_aside

    single = DaemonProcess(tmp_path, [f"checkpoint.dir={state}", "train.cpu_threads=1"]).start()
    with RawClient(single.endpoint) as client:
        assert {s: client.ask({"type": "position", "stream": s})["next_offset"]
                for s in sent} == sent
        client.ask({"type": "flush"})
        deadline = time.monotonic() + 120
        while (status := client.ask({"type": "status"}))["queued_tokens"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
    assert status["streams"] == len(sent)
    assert status["tokens_trained"] == sum(sent.values()) - len(sent)
    assert single.stop() == 0
    assert not list((state / "logs").glob("rank-*-of-[23]"))
    assert list(state.glob("previous-*/logs/rank-1-of-2"))  # set aside, not deleted


def test_ranks_started_with_different_configs_are_refused(tmp_path):
    cluster = ClusterProcess(tmp_path, [f"checkpoint.dir={tmp_path / 'state'}"])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(Path(__file__).parent / "serve_rank.py")]
    for item in cluster.overrides:
        command += ["--set", item]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RANK1_SET": "train.lr=0.02"})
    assert done.returncode != 0
    refusals = [json.loads(line) for line in done.stdout.splitlines() + done.stderr.splitlines()
                if line.startswith("{") and "refusing to start" in line]
    assert len(refusals) == 2, done.stdout + done.stderr  # both ranks, before any state
    assert all("different config" in r["reason"] and "train.lr" in r["reason"]
               for r in refusals)
    assert not (tmp_path / "state").exists()


def test_a_step_one_rank_logged_and_the_other_did_not_is_void(tmp_path):
    """Rank 1 dies after the ranks agreed on an update and before it logged it; rank 0
    logged it and waits in the gradient sum. After the restart that step is void on
    rank 0 (the other rank never took it): its windows train in a later step, every
    target exactly once, one model."""
    cluster = ClusterProcess(tmp_path, [f"checkpoint.dir={tmp_path / 'state'}"],
                             max_restarts=1)
    cluster.start(env={"STREAMRNN_CRASH_AT": "global_step:30@1"})
    generation = cluster.wait_ready()
    streams = streams_on_both(4)
    for stream in streams:  # until the crash: what was acked is in the ranks' logs
        for offset in range(0, 1200, 100):
            try:
                if send(cluster, stream, offset, TEXT[offset:offset + 100],
                        timeout=2)["type"] != "ack":
                    break
            except TimeoutError:
                break
    cluster.wait_ready(after_generation=generation)  # the crash, and torchrun's restart
    for stream in streams:  # the producer's resend: from where each rank stands
        offset = cluster.ask(owner(stream, 2), {"type": "position", "stream": stream}
                             )["next_offset"]
        for start in range(offset, 1200, 100):
            assert send(cluster, stream, start, TEXT[start:start + 100])["type"] == "ack"
    ranks = wait_trained(cluster)
    assert sum(r["tokens_trained"] for r in ranks) == 1200 * len(streams) - len(streams)
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    replays = [e for e in cluster.events() if e.get("event") == "replayed the log"]
    assert {e["rank"]: e["steps_voided"] for e in replays} == {0: 1, 1: 0}
    assert cluster.stop() == 0


def test_a_rank_whose_disk_fills_pauses_the_cluster_then_it_resumes(tmp_path):
    """Rank 1's log takes no records for a while (ENOSPC): it answers busy, every rank
    stops training (no step can be logged there), and once it has room again training
    resumes; nothing is lost, every target is trained once."""
    import time
    cluster = ClusterProcess(tmp_path, [f"checkpoint.dir={tmp_path / 'state'}"])
    cluster.start(env={"STREAMRNN_FAIL_AT": "wal_write:40-60@1"})
    streams = streams_on_both(4)
    busy = 0
    for stream in streams:
        offset = 0
        while offset < 2000:
            reply = send(cluster, stream, offset, TEXT[offset:offset + 100])
            if reply["type"] == "busy":
                busy += 1
                time.sleep(reply["retry_after_ms"] / 1000)
                continue
            assert reply["type"] == "ack", reply
            offset += 100
    assert busy > 0
    ranks = wait_trained(cluster)
    assert sum(r["tokens_trained"] for r in ranks) == 2000 * len(streams) - len(streams)
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    events = [(e.get("rank"), e.get("event")) for e in cluster.events()]
    assert (0, "training paused: a rank's write-ahead log is full") in events
    assert (0, "training resumes: every rank's log has room") in events
    assert cluster.stop() == 0


@pytest.mark.slow
def test_the_ranks_end_when_their_launcher_is_killed(tmp_path):
    """SIGKILL to torchrun's launcher alone (the OOM killer, say): its ranks must end
    too, not hold the state folder and the ports against the next start, which then
    recovers what they acknowledged."""
    import time
    from harness import _alive
    settings = [f"checkpoint.dir={tmp_path / 'state'}"]
    cluster = ClusterProcess(tmp_path, settings).start()
    ranks = cluster.rank_pids()
    assert len(ranks) == 2, ranks
    streams = streams_on_both(2)
    for stream in streams:
        assert send(cluster, stream, 0, TEXT[:300])["type"] == "ack"
    os.kill(cluster.proc.pid, signal.SIGKILL)
    cluster.proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in ranks):
        assert time.monotonic() < deadline, "the ranks outlived their launcher"
        time.sleep(0.1)
    again = ClusterProcess(tmp_path, settings)
    again.port, again.endpoints = cluster.port, cluster.endpoints  # the same ports, free
    again.overrides = cluster.overrides
    again.start()
    for stream in streams:
        assert again.ask(owner(stream, 2), {"type": "position", "stream": stream}
                         )["next_offset"] == 300
    assert again.stop() == 0


def test_a_hung_rank_times_out_and_torchrun_restarts_every_rank(tmp_path):
    """Rank 1's loop stops forever: rank 0's next collective fails after
    cluster.timeout_seconds, torchrun stops both (the hung one killed after
    cluster.shutdown_seconds) and starts both again, which recover from their logs."""
    cluster = ClusterProcess(tmp_path, [f"checkpoint.dir={tmp_path / 'state'}",
                                        "cluster.timeout_seconds=5",
                                        "cluster.shutdown_seconds=5"], max_restarts=1)
    cluster.start(env={"STREAMRNN_HANG_AT": "turn:100@1"})
    generation = cluster.wait_ready()
    streams = streams_on_both(4)
    for stream in streams:
        assert send(cluster, stream, 0, TEXT[:500])["type"] == "ack"
    restarted = cluster.wait_ready(timeout=120, after_generation=generation)
    assert restarted > generation
    for stream in streams:
        assert send(cluster, stream, 500, TEXT[500:1000])["type"] == "ack"
    ranks = wait_trained(cluster)
    assert sum(r["tokens_trained"] for r in ranks) == 1000 * len(streams) - len(streams)
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    failed = [e for e in cluster.events() if e.get("event", "").startswith("stopping this rank")]
    assert failed, "rank 0's collective should have failed"
    # torchrun gives a rank 30 s after SIGTERM when it restarts them all: the hung one
    # ended itself at cluster.shutdown_seconds
    assert "not stopped cluster.shutdown_seconds (5 s) after SIGTERM" in cluster.log()
    assert cluster.stop() == 0


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1), (2, 3)])
@pytest.mark.parametrize("checkpointed", [False, True],
                         ids=["before the first checkpoint", "after a checkpoint"])
def test_a_crash_then_another_number_of_ranks_trains_every_acknowledged_token_once(
        tmp_path, before, after, checkpointed):
    """SIGKILL, then a start with another number of ranks, with and without a checkpoint
    before the crash: every old rank's log is replayed, every acknowledged token is
    there and is trained exactly once, the ranks hold one model."""
    import time
    from harness import serve
    from streamrnn.client import Producer
    state = [f"checkpoint.dir={tmp_path / 'state'}", "checkpoint.interval_seconds=0"]
    streams = [f"stream-{i}" for i in range(6)]
    old = serve(tmp_path, state, before).start()
    acked = {}
    with Producer(old.endpoint) as producer:
        for i, stream in enumerate(streams):
            producer.send(stream, TEXT[:200 + 30 * i])
            acked[stream] = 200 + 30 * i
        producer.flush(timeout=60)
        if checkpointed:
            assert producer.request({"type": "checkpoint"})["ok"]
        for stream in streams:
            producer.send(stream, TEXT[:77])
            acked[stream] += 77
        producer.flush(timeout=60)
    old.kill()
    new = serve(tmp_path, state, after).start()
    assert "took over the state of another layout" in new.log()
    with Producer(new.endpoint) as producer:
        assert {s: producer.position(s) for s in streams} == acked
        for stream in streams:
            producer.request({"type": "flush", "stream": stream})
        deadline = time.monotonic() + 120
        while True:
            ranks = [producer.status()] if after == 1 else \
                [r for r in producer.cluster_status()["ranks"]]
            # (the ranks answer one after another: the last update may fall between)
            if not sum(r["queued_tokens"] for r in ranks) and \
                    len({r["updates"] for r in ranks}) == 1:
                break
            assert time.monotonic() < deadline, ranks
            time.sleep(0.2)
    assert sum(r["tokens_trained"] for r in ranks) == sum(acked.values()) - len(acked)
    assert len({r["weights_checksum"] for r in ranks}) == 1
    assert new.stop() == 0


def one_process_stopped_cleanly(tmp_path: Path, state: Path, stream: str,
                                size: int) -> list[str]:
    """One process on `state` took `size` bytes of `stream`, then stopped (SIGTERM);
    the settings it ran with."""
    from harness import DaemonProcess
    settings = [f"checkpoint.dir={state}", "checkpoint.interval_seconds=0"]
    single = DaemonProcess(tmp_path, settings).start()
    with RawClient(single.endpoint) as client:
        assert client.ask({"type": "tokens", "stream": stream, "offset": 0,
                           "tokens": TEXT[:size], "width": 1})["type"] == "ack"
    assert single.stop() == 0
    return settings


def test_fresh_list_inspect_and_checkpoint_requests_mean_the_same_for_every_layout(tmp_path):
    """After one process stopped cleanly: two ranks with --fresh set aside everything
    of it; `checkpoint list` marks the ranks' checkpoint as the one the next start
    loads, and `checkpoint inspect` reads the path `status` names; a checkpoint asked of
    rank 0 when only rank 1's streams changed is a new one."""
    state = tmp_path / "state"
    settings = one_process_stopped_cleanly(tmp_path, state, "old", 500)
    cluster = ClusterProcess(tmp_path, settings).start(args=("--fresh",))
    assert cluster.ask(owner("old", 2), {"type": "position", "stream": "old"}
                       )["next_offset"] == 0
    assert list(state.glob("previous-*/checkpoints/checkpoint-*.json"))
    assert list(state.glob("previous-*/logs/rank-0-of-1/wal-*.log"))
    one = streams_on_both(2)[1]  # a stream of rank 1
    assert send(cluster, one, 0, TEXT[:300])["type"] == "ack"
    first = cluster.ask(0, {"type": "checkpoint"})
    assert send(cluster, one, 300, TEXT[300:400])["type"] == "ack"
    wait_trained(cluster)
    second = cluster.ask(0, {"type": "checkpoint"})
    assert first["ok"] and second["ok"] and second["number"] == first["number"] + 1
    assert cluster.ask(0, {"type": "checkpoint"})["number"] == second["number"]  # no news
    two = [s for s in (f"new-{i}" for i in range(40)) if owner(s, 2) == 1][0]
    assert send(cluster, two, 0, TEXT[:3])["type"] == "ack"  # no update: rank 1 alone
    third = cluster.ask(0, {"type": "checkpoint"})  # changed
    assert third["number"] == second["number"] + 1
    status_path = cluster.ask(0, {"type": "status"})["last_checkpoint"]["path"]
    assert status_path == third["path"]
    cli = [sys.executable, "-m", "streamrnn", "checkpoint"]
    listed = subprocess.run([*cli, "list", str(state)], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    newest = listed.stdout.splitlines()[0]
    assert newest.startswith(third["path"]) and ", 2 ranks, " in newest
    assert newest.endswith("<- the next start loads this one")
    inspected = subprocess.run([*cli, "inspect", status_path], capture_output=True,
                               text=True)
    assert inspected.returncode == 0 and ", 2 ranks, " in inspected.stdout, \
        inspected.stdout + inspected.stderr
    assert cluster.stop() == 0


def test_a_fall_back_past_the_layout_that_acknowledged_input_is_refused(tmp_path):
    """One process, then two ranks (they take over its state and commit a checkpoint),
    which acknowledge more and crash; the ranks' newest checkpoint is then unreadable.
    The checkpoint before it is the one process's, whose log was set aside: loading it
    would silently drop what the ranks acknowledged, so the start is refused."""
    from harness import DaemonProcess
    state = tmp_path / "state"
    settings = one_process_stopped_cleanly(tmp_path, state, "a", 100)
    cluster = ClusterProcess(tmp_path, settings).start()
    assert send(cluster, "a", 100, TEXT[100:200])["type"] == "ack"
    cluster.kill_all()
    newest = sorted((state / "checkpoints").glob("replicated-*.pt"))[-1]
    newest.write_bytes(b"torn")
    for nproc in (1, 2):
        again = ClusterProcess(tmp_path, settings, nproc=nproc) if nproc > 1 else \
            DaemonProcess(tmp_path, settings)
        again.start(wait=False)
        assert again.proc.wait(timeout=120) == 2
        assert "hold acknowledged input, but the state to load is checkpoint" in again.log()
    assert list((state / "logs").glob("rank-*-of-2/wal-*.log"))  # nothing moved

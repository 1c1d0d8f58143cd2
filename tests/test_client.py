"""The producer client against real daemons: it waits for them, rides out restarts."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from harness import DaemonProcess, free_port
from streamrnn.client import Producer, ProducerError, Unreachable


def test_producer_waits_for_a_daemon_that_starts_late(tmp_path):
    port = free_port()
    d = DaemonProcess(tmp_path, [], port=port)
    done = threading.Event()
    errors = []

    def produce():
        try:
            with Producer(d.endpoint, retry_seconds=60) as producer:
                producer.send("late", np.arange(500) % 256)
                producer.flush(timeout=60)
        except Exception as e:
            errors.append(e)
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    time.sleep(1.5)
    assert not done.is_set()  # still trying: nobody listens yet
    d.start()
    try:
        thread.join(timeout=90)
        assert done.is_set() and not errors, errors
        with Producer(d.endpoint) as p:
            assert p.position("late") == 500
    finally:
        assert d.stop() == 0


def test_producer_rides_out_a_restart(tmp_path):
    d = DaemonProcess(tmp_path, []).start()
    with Producer(d.endpoint, retry_seconds=60, reply_timeout=0.5) as producer:
        producer.send("before", np.arange(300) % 256)
        producer.flush(timeout=30)
        assert d.stop() == 0
        errors = []

        def produce():
            try:  # a new stream while the daemon is down: blocks, resends, then gets in
                producer.send("during", np.arange(700) % 256, offset=0)
                producer.flush(timeout=60)
            except Exception as e:
                errors.append(e)

        thread = threading.Thread(target=produce)
        thread.start()
        time.sleep(1.0)
        d.start()
        thread.join(timeout=90)
        assert not thread.is_alive() and not errors, errors
        assert producer.position("during") == 700
        assert producer.stats.resends > 0
    assert d.stop() == 0


def test_gives_up_with_a_clear_error(tmp_path):
    with Producer(f"tcp://127.0.0.1:{free_port()}", retry_seconds=1) as producer:
        with pytest.raises(Unreachable, match="is `streamrnn serve` running"):
            producer.send("x", [1, 2, 3])


def test_refusals_surface_as_errors(tmp_path):
    d = DaemonProcess(tmp_path, ["model.vocab_size=10"]).start()
    try:
        with Producer(d.endpoint) as producer:
            producer.send("ok", [1, 2, 3])
            producer.send("bad", [1, 20])
            with pytest.raises(ProducerError, match="token_out_of_range"):
                producer.flush(timeout=30)
            assert producer.position("ok") == 3 and producer.position("bad") == 0
    finally:
        assert d.stop() == 0

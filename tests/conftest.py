import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import reference.py, harness.py


def pytest_configure(config):
    """Under pytest-xdist the workers share the cores: one torch thread each, for them
    and the processes they start (more threads than free cores collapse torch's CPU
    kernels: train.cpu_threads in config.py). A test that sets threads still does."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items):
    """The tests marked slow first: under pytest-xdist (./scripts/test runs a worker per
    core) a long test that starts last keeps every other worker waiting for it."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def _reap_daemons():
    """A test that fails half-way must not leave its daemon running."""
    yield
    harness = sys.modules.get("harness")  # imported only by tests that start daemons
    for proc in harness.STARTED if harness else ():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for proc in harness.STARTED_GROUPS if harness else ():  # a cluster: its ranks too
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
    if harness and harness.Zygote._instance:
        harness.Zygote._instance.close()


@pytest.fixture
def long_windows(monkeypatch):
    """Daemons started by this test train with harness.LONG_WINDOWS."""
    import harness
    monkeypatch.setattr(harness, "TINY", [*harness.TINY, *harness.LONG_WINDOWS])


@pytest.fixture
def make_daemon(tmp_path, monkeypatch):
    """A daemon in this process on a clock the test moves (tests/inprocess.py)."""
    from inprocess import daemon_maker  # pyzmq: imported only by the tests that use it
    yield from daemon_maker(tmp_path, monkeypatch)

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import reference.py, harness.py


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


@pytest.fixture
def make_daemon(tmp_path, monkeypatch):
    """A daemon in this process on a clock the test moves (tests/inprocess.py)."""
    from inprocess import daemon_maker  # pyzmq: imported only by the tests that use it
    yield from daemon_maker(tmp_path, monkeypatch)

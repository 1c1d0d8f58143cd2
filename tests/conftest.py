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

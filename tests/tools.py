"""External tools some tests need (promtool, ...): found, or the test says why not.

CI installs them (.ci/run) and sets STREAMRNN_REQUIRE_TOOLS=1, so there a missing tool
fails the run instead of skipping."""
from __future__ import annotations

import os
import shutil

import pytest


def require(name: str, package: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found: install the Debian package {package!r} (.ci/run does)"
    if os.environ.get("STREAMRNN_REQUIRE_TOOLS"):
        pytest.fail(message)
    pytest.skip(message)


def promtool() -> str:
    return require("promtool", "prometheus")

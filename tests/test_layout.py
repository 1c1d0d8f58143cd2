"""The package's layout is its architecture: what each group may import.

    streamrnn/        the public surface (cli, config, wire, client, feed, keys): a
                      producer imports it without paying for torch
    streamrnn/core/   the learning (model, streams, engine, learner): torch and numpy,
                      no sockets, files or clock
    streamrnn/serve/  the daemon: core plus the network, the disk and the clock
    streamrnn/tools/  demo and benchmarks: anything
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "streamrnn"
# what a group may import, of the project and from outside it
ALLOWED = {
    "": ({""}, None),  # cli reaches serve and tools only inside its command functions
    "core": ({"", "core"}, {"torch", "numpy"}),
    "serve": ({"", "core", "serve"}, None),
    "tools": ({"", "core", "serve", "tools"}, None),
}
FORBIDDEN_IN_CORE = {"zmq", "socket", "msgpack", "prometheus_client", "structlog", "time",
                     "os", "pathlib", "threading"}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at top level) for every import in the file, resolved to absolute names."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        top = node in tree.body or any(node in getattr(n, "body", ()) for n in tree.body
                                       if isinstance(n, (ast.If, ast.Try)))
        if isinstance(node, ast.Import):
            found += [(alias.name, top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x: x is a module of that package
                    found += [(f"{module}.{alias.name}", top) for alias in node.names]
                    continue
            else:
                module = node.module
            found.append((module, top))
    return found


def group_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "streamrnn":
        return None
    return parts[1] if len(parts) > 2 and parts[1] in ("core", "serve", "tools") else ""


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(
    p.relative_to(PACKAGE)))
def test_each_group_imports_only_what_it_may(path: Path):
    group = "" if path.parent == PACKAGE else path.parent.name
    project, outside = ALLOWED[group]
    for module, top in imports(path):
        target = group_of(module)
        if target is not None:
            if group == "" and not top:
                continue  # a command function of cli.py: the subcommand pays for it
            assert target in project, f"{path.name} imports {module}"
        elif group == "core":
            root = module.split(".")[0]
            assert root not in FORBIDDEN_IN_CORE, f"core/{path.name} imports {module}"
            assert root in outside or root in sys.stdlib_module_names, module


@pytest.mark.parametrize("module,absent", [
    ("streamrnn.client", ("torch", "streamrnn.core", "streamrnn.serve")),
    ("streamrnn.feed", ("torch", "streamrnn.core", "streamrnn.serve")),
    ("streamrnn.cli", ("torch", "zmq", "streamrnn.core", "streamrnn.serve")),
    ("streamrnn.core.learner", ("zmq", "msgpack", "prometheus_client", "streamrnn.serve")),
    ("streamrnn.serve.daemon", ("streamrnn.tools",)),
    # what scripts/device-check runs on a GPU machine whose python has torch, not pyzmq
    ("streamrnn.tools.bench_engine", ("zmq", "msgpack", "streamrnn.client")),
    ("streamrnn.tools.bench_quality", ("zmq", "msgpack", "streamrnn.client")),
])
def test_importing_pays_only_for_what_it_uses(module, absent):
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split()
    for name in absent:
        assert not [m for m in loaded if m == name or m.startswith(name + ".")], \
            f"importing {module} loads {name}"

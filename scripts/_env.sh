# Sourced by scripts/test and scripts/demo: make sure .venv exists and is current.
#
# torch is chosen here, visibly: with an NVIDIA GPU (nvidia-smi works) pip resolves
# pyproject's range to the CUDA build from PyPI; without one we install the CPU-only
# build torch==2.13.0+cpu first (a few hundred MB instead of several GB): from pip's
# configured indexes/wheel folders if they have it, else from PyTorch's CPU index.
# Set STREAMRNN_TORCH to a pip requirement to choose yourself, e.g.
#   STREAMRNN_TORCH="torch==2.13.0" ./scripts/test
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STREAMRNN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.streamrnn-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) torch:${STREAMRNN_TORCH:-auto}"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "streamrnn needs Python 3.11+; $("$PY" --version 2>&1) found (set PYTHON=...)" >&2
    exit 1; }
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
  if [ -n "${STREAMRNN_TORCH:-}" ]; then
    echo "streamrnn: installing $STREAMRNN_TORCH (from STREAMRNN_TORCH)" >&2
    pip_install "$STREAMRNN_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "streamrnn: NVIDIA GPU found: torch with CUDA (pyproject's range)" >&2
  else
    echo "streamrnn: no NVIDIA GPU found: installing the CPU-only build," \
         "torch==2.13.0+cpu (set STREAMRNN_TORCH to choose another)" >&2
    pip_install "torch==2.13.0+cpu" 2>/dev/null ||
      pip_install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
  fi
  echo "streamrnn: installing streamrnn and its dependencies into $VENV" >&2
  pip_install -e "$ROOT[dev]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"

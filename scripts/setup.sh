#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs fp4kv-jax (editable) with its dev
# extras. Safe to run again: it reuses .venv. Set FP4KV_PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

is_312_plus() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
  local candidates=("${FP4KV_PYTHON:-}" python3.12 python3.13 python3)
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)"/versions/3.1[2-9]*/bin/python3)
  fi
  for py in "${candidates[@]}"; do
    if [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 && is_312_plus "$py"; then
      command -v "$py"
      return 0
    fi
  done
  echo "setup.sh: no Python >= 3.12 found; install one or set FP4KV_PYTHON." >&2
  return 1
}

if [ ! -x .venv/bin/python ] || ! is_312_plus .venv/bin/python; then
  rm -rf .venv
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"

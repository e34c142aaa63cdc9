#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv at the repository root.
# CPU machines: torch and megatron-core are pinned by constraints/cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# --no-compile: byte-compiling every module of torch, ray and transformers at install time
# took longer than the whole install without it (185 s against 77 s on a 2-core machine);
# Python compiles the modules a run actually imports on first use instead.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile -c constraints/cpu.txt -e ".[dev]"

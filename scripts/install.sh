#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv at the repository root.
# CPU machines: torch and megatron-core are pinned by constraints/cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Byte-compiling at install takes ~half of it (185 s against 77 s with --no-compile), but keep
# it: where PYTHONDONTWRITEBYTECODE is set, nothing is cached later, and every process of the
# test suite would compile torch from source again (the default suite took 9.7 min, not ~5).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e ".[dev]"

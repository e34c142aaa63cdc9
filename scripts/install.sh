#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv at the repository root.
# CPU machines: torch and megatron-core are pinned by constraints/cpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e ".[dev]"

#!/bin/bash
# Install everything the tests need, then run the checks and the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m 'not slow' -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== pytest"; python -m pytest "$@"

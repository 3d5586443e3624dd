#!/usr/bin/env bash
# Fresh-machine test run: set up .venv (CPU torch unless a GPU is present), then lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
. .venv/bin/activate
ruff check src tests benchmarks
mypy src/palionnx benchmarks
python -m pytest -q "$@"

#!/usr/bin/env bash
# Fresh-machine test run: set up .venv (CPU torch unless a GPU is present), then lint, type-check, test: the unit
# tier first (no torch, no subprocesses: under a minute), then the integration tier. `--fast`: the unit tier only.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
if [ "${1:-}" = "--fast" ]; then fast=1; shift; fi
scripts/setup.sh dev
. .venv/bin/activate
ruff check src tests benchmarks
mypy src/palionnx benchmarks
tier() { python -m pytest -q -m "$@" || [ $? = 5 ]; }  # 5: no test of this tier among the ones asked for
tier "not integration" "$@"
if [ "$fast" = 0 ]; then
  # The page tests drive Debian's chromium (never a downloaded browser): installed here where apt can (as root);
  # elsewhere they skip, saying why.
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
        >/dev/null || echo "test: apt could not install chromium: the browser tests will skip"
    else
      echo "test: no chromium and chromedriver, and no apt as root to install them: the browser tests will skip"
    fi
  fi
  tier integration "$@"
fi

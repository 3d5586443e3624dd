#!/usr/bin/env bash
# Fresh-machine captioning: set up .venv, then `palionnx caption` with all arguments passed through.
#   scripts/caption.sh input/                      writes a .txt caption beside each image in input/
#   scripts/caption.sh input/ --model models/x     an exported folder or a hub id
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh" >&2
exec "$root/.venv/bin/palionnx" caption "$@"

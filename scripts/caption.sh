#!/usr/bin/env bash
# Fresh-machine captioning: set up .venv (once), then `palionnx caption` with all arguments passed on.
#   scripts/caption.sh input/                      writes a .txt caption beside each image in input/
#   scripts/caption.sh input/ --model models/x     an exported folder or a hub id
# With no --model the default model is exported on first use: see the README, "Two commands".
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
usage() {
  echo "usage: scripts/caption.sh FOLDER [palionnx caption options]" >&2
  echo "  Put the images to caption in a folder (input/ is there for that) and pass it:" >&2
  echo "    scripts/caption.sh input/" >&2
  echo "  Each image gets a .txt caption beside it. Options: scripts/caption.sh --help" >&2
}
if [ $# -eq 0 ]; then
  mkdir -p "$root/input"
  echo "error: no folder given; $root/input/ is ready for your images" >&2
  usage
  exit 2
fi
missing() {
  echo "error: $1: no such file, folder or matching pattern" >&2
  usage
  exit 2
}
case "$1" in
  -*) ;;  # an option (--help, say): palionnx answers it
  *[*?[]*) compgen -G "$1" >/dev/null || missing "$1" ;;
  *) [ -e "$1" ] || missing "$1" ;;
esac
"$root/scripts/setup.sh" >&2
exec "$root/.venv/bin/palionnx" caption "$@"

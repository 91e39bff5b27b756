#!/usr/bin/env bash
# The main job on the built-in example (the README's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ckptsim demo "$@"

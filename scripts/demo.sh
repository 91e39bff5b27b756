#!/usr/bin/env bash
# The main job on the built-in example (the README's first command): checkpoint, kill and
# restart a running counter, on real processes when the live backend can run here (root,
# ptrace), else in the model (it says why); `scripts/demo.sh --model` forces the model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ckptsim demo "$@"

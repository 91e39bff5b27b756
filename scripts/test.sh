#!/usr/bin/env bash
# The whole test suite, in parallel (the README's test command; .ci/run runs it too).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -n auto -q "$@"

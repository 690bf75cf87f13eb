#!/usr/bin/env bash
# Sets up and runs every test: ruff lint and format check, then the whole pytest suite (aiperf, which the
# e2e tests drive, goes in its own venv: scripts/aiperf_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/aiperf_venv.sh >/dev/null
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# The main job on the embedded default: creates the demo model (random weights) if missing and generates.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/emoe demo "$@"

#!/usr/bin/env bash
# The main job on the embedded default: a local Ray cluster serving the demo model (random weights, created if
# missing) over gRPC and OpenAI HTTP, until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/emoe serve "$@"

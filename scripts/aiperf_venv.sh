#!/usr/bin/env bash
# aiperf (NVIDIA's LLM benchmark client) in its own venv, .venv-aiperf: it pins versions (pandas,
# huggingface_hub) that conflict with the project's .venv. Prints the path of its `aiperf` command.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${AIPERF_VENV:-$ROOT/.venv-aiperf}"
VERSION="${AIPERF_VERSION:-0.13.0}"
if [ ! -x "$VENV/bin/aiperf" ] || ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('aiperf') == '$VERSION'" 2>/dev/null; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check "aiperf==$VERSION" >&2
fi
echo "$VENV/bin/aiperf"

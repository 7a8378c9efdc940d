#!/usr/bin/env bash
# The README's first command: set up this machine, then run the main job on the
# embedded default (a local directory store, no servers).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/install.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/tools/demo.py" "$@"

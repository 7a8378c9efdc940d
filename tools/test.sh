#!/usr/bin/env bash
# The README's second command: set up (idempotent) and run the whole test suite.
# Extra arguments go to pytest (e.g. -k registry, -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/install.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"

#!/usr/bin/env bash
# Generate imagefs/containerd_api/*_pb2*.py from the .proto files beside them, with
# grpcio-tools' protoc from the virtualenv. tools/install.sh runs it on every install
# (the generated modules are not committed: imagefs/containerd_api/__init__.py says
# why); run it by hand after editing a .proto.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
cd "$ROOT"
"$PYTHON" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. imagefs/containerd_api/*.proto

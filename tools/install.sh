#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (run as root).
#
# Installs the Debian packages imagefs and its tests need (FUSE, the OCI tools, a
# registry, a container runtime, the bench peers) and a virtualenv at .venv with
# imagefs installed in editable mode. Safe to run again: every step checks first.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IMAGEFS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

DEBIAN_PACKAGES=(
  fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv   # pyfuse3 builds against libfuse3
  skopeo umoci docker-registry runc                            # images, registry, runtime
  debootstrap squashfs-tools squashfuse casync                 # bench images and peers
  iproute2 kmod psmisc curl ca-certificates                    # bench network emulation, teardown
  busybox-static                                               # small real images for container tests
  tini libc6-dev                                               # imagefs run --init; static test programs
  erofs-utils                                                  # fsck.erofs: a second reader of imagefs's EROFS metadata
)
# containerd (1.6 on Debian 12, with ctr): imagefs snapshotter plugs into it, and its tests
# start their own. A host that has containerd already (Docker's containerd.io package,
# which conflicts with Debian's) keeps it.
command -v containerd >/dev/null || DEBIAN_PACKAGES+=(containerd)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "install.sh: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian registry package starts a system service on install; tests start their own.
if command -v systemctl >/dev/null && systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "install.sh: creating virtualenv $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when the dependencies changed (pyproject.toml's hash is the stamp).
STAMP="$VENV/.imagefs-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $ROOT"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  # compat mode: a plain .pth path entry; the default import-hook finder costs every
  # imagefs process (CLI, mount daemons) tens of ms at start-up.
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test,bench]" --config-settings editable_mode=compat
  echo "$WANT" > "$STAMP"
fi
# containerd's gRPC stubs are generated here, against the protobuf just installed
# (imagefs/containerd_api/__init__.py says why they are not committed); ~1 s.
PYTHON="$VENV/bin/python" bash "$ROOT/tools/gen_containerd_api.sh"
# Byte-compile the project (an editable install does not, and PYTHONDONTWRITEBYTECODE
# would stop Python from doing it later): every imagefs process imports these at
# start, and compiling them from source cost a mount ~25 ms. Fast when up to date.
"$VENV/bin/python" -m compileall -q -j 0 "$ROOT/imagefs" "$ROOT/indexer" "$ROOT/cache" >/dev/null
echo "install.sh: ready ($VENV)" >&2

"""Build the bench images: real Debian + Python ML rootfs, as OCI layouts, offline.

Why this exists: a lazy rootfs only pays off on images shaped like the ones users
run — tens of thousands of small Python files that an import touches one by one, plus
a few huge shared objects that it barely reads. Synthetic trees get neither the shape
nor the sharing right, and no registry is reachable from this machine, so the images
are built here, from parts the machine can fetch: Debian packages through debootstrap
and apt, Python wheels through pip on the host (pip inside a chroot cannot reach the
index), and the local CPU-only PyTorch wheel.

Two images share their lower layers, so dedup across images can be measured:

    L1  Debian bookworm minbase + python3 + python3-venv
    L2  a venv at /opt/venv with numpy          numpy image = [L1, L2]
    L3  torch (CPU) and its deps in that venv   torch image = [L1, L2, L3]

L2 and L3 are filesystem diffs of the rootfs before and after a step, the way a
container build records a ``RUN``: new or changed entries, and ``.wh.`` whiteouts for
deletions. Each image is written as an OCI image layout twice, with zstd and with gzip
layers, and its unpacked rootfs is kept as the "image already on local disk" baseline.

Every step is cached in a work directory: it is built under a temporary name, renamed
into place when complete, and then gets a stamp recording its inputs (including the
build ids of the steps it came from). A step whose stamp matches is reused; a
half-built artifact never has a stamp, so it is never used.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, cast

import zstandard

# Bump when a build step changes in a way that makes old artifacts wrong.
RECIPE = 1

WORKDIR_ENV = "IMAGEFS_BENCH_DIR"
DEFAULT_WORKDIR = "/var/cache/imagefs-bench"
MIRROR_ENV = "IMAGEFS_BENCH_MIRROR"
TORCH_WHEEL_ENV = "IMAGEFS_BENCH_TORCH_WHEEL"

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
PYTHON_VERSION = "3.11"  # bookworm's python3; the wheels are downloaded for it
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
NUMPY_REQUIREMENT = "numpy==2.3.5"
TORCH_VERSION = "2.13.0"
TORCH_WHEEL_NAME = f"torch-{TORCH_VERSION}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
VENV = "/opt/venv"
IMAGE_NAMES = ("numpy", "torch")

ZSTD_LEVEL = 3
GZIP_LEVEL = 6  # the default of docker and containers/image
MEDIA_TYPE_LAYER = {
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
}
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
TAG = "latest"

# Environment for commands run inside the chroot: nothing from the host leaks in.
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
# Where the host's wheel directory is bind-mounted inside the chroot during a pip step.
CHROOT_WHEELS = "tmp/imagefs-wheels"


class BuildError(Exception):
    """A bench image step failed; the message names the step and, for a command, its log."""


@dataclasses.dataclass(frozen=True)
class BenchImage:
    """A built bench image: where its layouts and rootfs are, and how big its layers are.

    ``layout_zstd`` and ``layout_gzip`` are skopeo/containers transport references
    (``oci:PATH:latest``). ``layer_sizes`` are uncompressed tar bytes per layer, bottom
    first; ``layer_entries`` the tar entries per layer; ``n_entries`` the entries of the
    merged rootfs (every file, directory and symlink below ``/``).
    """

    name: str
    layout_zstd: str
    layout_gzip: str
    rootfs: str
    layer_sizes: tuple[int, ...]
    n_entries: int
    layer_entries: tuple[int, ...] = ()
    layer_compressed: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- logging


def _log(msg: str) -> None:
    print(f"[bench images {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- mirror


def parse_apt_sources(text: str, deb822: bool) -> list[tuple[str, list[str]]]:
    """Return ``(uri, suites)`` for each ``deb`` source in a sources file's text.

    ``deb822`` selects the ``*.sources`` format (stanzas of ``Key: value`` lines);
    otherwise the one-line ``deb [opts] URI SUITE COMPONENTS`` format is parsed.
    """
    found: list[tuple[str, list[str]]] = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            suites = fields.get("suites", "").split()
            found += [(uri, suites) for uri in fields.get("uris", "").split()]
        return found
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        words = re.sub(r"\[[^]]*\]", " ", line[4:]).split()
        if len(words) >= 2:
            found.append((words[0], [words[1]]))
    return found


def find_mirror(suite: str = SUITE, etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses for ``suite`` (``$IMAGEFS_BENCH_MIRROR`` wins)."""
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV]
    files = [(etc_apt / "sources.list", False)]
    d = etc_apt / "sources.list.d"
    if d.is_dir():
        files += [(p, False) for p in sorted(d.glob("*.list"))]
        files += [(p, True) for p in sorted(d.glob("*.sources"))]
    for path, deb822 in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri, suites in parse_apt_sources(text, deb822):
            if suite in suites:
                return uri
    raise BuildError(
        f"no apt source for suite {suite!r} in {etc_apt}/sources.list(.d); set ${MIRROR_ENV}"
    )


# --------------------------------------------------------------------------- layer diff


@dataclasses.dataclass(frozen=True)
class LayerEntry:
    """One entry of a layer tar: a path of the new tree, or a whiteout of a deleted one."""

    path: str  # relative, "/"-separated, no leading "./"
    whiteout: bool = False

    @property
    def tar_name(self) -> str:
        if not self.whiteout:
            return self.path
        head, _, name = self.path.rpartition("/")
        return f"{head}/.wh.{name}" if head else f".wh.{name}"


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out: dict[str, bytes] = {}
    for name in sorted(names):
        if name.startswith("trusted.overlay."):
            continue
        with contextlib.suppress(OSError):
            out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _same_entry(old: Path, st_old: os.stat_result, new: Path, st_new: os.stat_result) -> bool:
    """Whether an entry is unchanged, judged like a snapshotter would: by metadata.

    Regular files compare size and mtime (a rewrite that keeps both is not seen, as in
    rsync's quick check); symlinks compare their target; devices their number.
    """
    if (st_old.st_mode, st_old.st_uid, st_old.st_gid) != (st_new.st_mode, st_new.st_uid, st_new.st_gid):
        return False
    mode = st_new.st_mode
    if stat.S_ISLNK(mode):
        if os.readlink(old) != os.readlink(new):
            return False
    elif stat.S_ISREG(mode):
        if (st_old.st_size, st_old.st_mtime_ns) != (st_new.st_size, st_new.st_mtime_ns):
            return False
    elif stat.S_ISDIR(mode):
        if st_old.st_mtime_ns != st_new.st_mtime_ns:
            return False
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        if st_old.st_rdev != st_new.st_rdev:
            return False
    return _xattrs(old) == _xattrs(new)


def _listdir(d: Path) -> dict[str, os.stat_result]:
    with os.scandir(d) as it:
        return {e.name: e.stat(follow_symlinks=False) for e in it}


def diff_trees(old: Path | None, new: Path) -> list[LayerEntry]:
    """The entries of a layer that turns tree ``old`` into tree ``new``.

    ``old=None`` means an empty tree (a base layer: every entry of ``new``). Deleted
    paths become whiteouts (one for a whole deleted directory); an entry whose type
    changed gets a whiteout and the new entry. Ancestors of every emitted entry are
    emitted too, so the layer carries their metadata. Within each directory whiteouts
    come first, then entries by name, each directory before its children: the order
    is deterministic and an in-order unpacker never removes what the layer just wrote.
    The root directory itself is not an entry.
    """
    out: list[LayerEntry] = []
    _diff_dir(old, new, "", out)
    return out


def _diff_dir(old: Path | None, new: Path, rel: str, out: list[LayerEntry]) -> None:
    new_entries = _listdir(new)
    old_entries = _listdir(old) if old is not None else {}
    join = (lambda n: f"{rel}/{n}") if rel else (lambda n: n)
    for name in sorted(set(old_entries) - set(new_entries)):
        out.append(LayerEntry(join(name), whiteout=True))
    replaced = [
        n for n in sorted(new_entries)
        if n in old_entries and stat.S_IFMT(old_entries[n].st_mode) != stat.S_IFMT(new_entries[n].st_mode)
    ]
    out += [LayerEntry(join(n), whiteout=True) for n in replaced]
    for name in sorted(new_entries):
        st_new = new_entries[name]
        path = join(name)
        st_old = None if name in replaced else old_entries.get(name)
        old_child = old / name if old is not None and st_old is not None else None
        changed = old_child is None or st_old is None or not _same_entry(old_child, st_old, new / name, st_new)
        if stat.S_ISDIR(st_new.st_mode):
            below: list[LayerEntry] = []
            _diff_dir(old_child, new / name, path, below)
            if changed or below:
                out.append(LayerEntry(path))
                out += below
        elif changed:
            out.append(LayerEntry(path))


def _tarinfo(root: Path, entry: LayerEntry, hardlinks: dict[tuple[int, int], str]) -> tuple[tarfile.TarInfo, Path | None]:
    """The tar header for ``entry`` (and the file to copy its content from, if any)."""
    ti = tarfile.TarInfo(entry.tar_name)
    ti.uname = ti.gname = ""
    if entry.whiteout:
        ti.type, ti.mode, ti.mtime = tarfile.REGTYPE, 0o644, 0
        return ti, None
    path = root / entry.path
    st = path.lstat()
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    sec, nsec = divmod(st.st_mtime_ns, 10**9)
    ti.mtime = sec
    pax: dict[str, str] = {}
    if nsec:
        pax["mtime"] = f"{sec}.{nsec:09d}".rstrip("0")
    for name, value in _xattrs(path).items():
        pax["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    ti.pax_headers = pax
    mode = st.st_mode
    source: Path | None = None
    if stat.S_ISDIR(mode):
        ti.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in hardlinks:
            ti.type, ti.linkname = tarfile.LNKTYPE, hardlinks[key]
        else:
            if st.st_nlink > 1:
                hardlinks[key] = entry.path
            ti.type, ti.size, source = tarfile.REGTYPE, st.st_size, path
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(mode):
        ti.type = tarfile.FIFOTYPE
    else:
        raise BuildError(f"{path}: cannot put a socket or unknown file type in a layer")
    return ti, source


def write_layer(root: Path, entries: Sequence[LayerEntry], fileobj: IO[bytes]) -> int:
    """Write ``entries`` of tree ``root`` as an uncompressed PAX tar to ``fileobj``.

    Owners are numeric only (names would come from the host's passwd, not the
    image's); mode, nanosecond mtime and xattrs are kept; a file linked more than once
    within the layer is stored once and then as hardlinks. Returns the entry count.
    """
    hardlinks: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      copybufsize=1 << 20) as tar:
        for entry in entries:
            ti, source = _tarinfo(root, entry, hardlinks)
            if source is None:
                tar.addfile(ti)
                continue
            with open(source, "rb") as f:
                tar.addfile(ti, f)
    return len(entries)


def count_entries(root: Path) -> int:
    """Entries below ``root`` (files, directories, symlinks...; not ``root`` itself)."""
    n = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                n += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
    return n


class HashingFile:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f: IO[bytes] | None) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, b: bytes | bytearray | memoryview) -> int:
        self.sha.update(b)
        self.size += len(b)
        if self.f is not None:
            self.f.write(b)
        return len(b)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if self.f is not None:
            self.f.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class _LayerSink:
    """Takes the tar stream once and writes the zstd and gzip blobs side by side,
    with the digests of the tar (the diff id) and of each blob."""

    def __init__(self, zst: IO[bytes], gz: IO[bytes]) -> None:
        self.tar = HashingFile(None)
        self.zst = HashingFile(zst)
        self.gz = HashingFile(gz)
        self._zw = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).stream_writer(
            self.zst, closefd=False  # type: ignore[arg-type]
        )
        # wbits=31: a gzip wrapper with no name and mtime 0, so the blob is deterministic.
        self._gzip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)

    def write(self, b: bytes) -> int:
        self.tar.write(b)
        self._zw.write(b)
        self.gz.write(self._gzip.compress(b))
        return len(b)

    def tell(self) -> int:
        return self.tar.size

    def finish(self) -> None:
        self._zw.flush(zstandard.FLUSH_FRAME)
        self._zw.close()
        self.gz.write(self._gzip.flush())


# --------------------------------------------------------------------------- steps


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """Remove a build tree, never through a mount left inside it (a bound /dev!)."""
    if not path.exists() and not path.is_symlink():
        return
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False)
    if left := _mounts_under(path):
        raise BuildError(f"refusing to remove {path}: still mounted: {', '.join(left)}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class _Builder:
    """Runs the steps of one ``ensure_images`` call against a locked work directory."""

    def __init__(self, workdir: Path, force: bool) -> None:
        self.work = workdir
        self.force = force
        self.done: dict[str, dict[str, Any]] = {}  # step name -> stamp, this run
        self.logs = workdir / "logs"

    # -- generic step machinery

    def step(self, name: str, inputs: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Return the stamp of artifact ``WORK/name``, building it if not current."""
        if name in self.done:
            return self.done[name]
        path = self.work / name
        stamp_path = path.with_name(path.name + ".stamp.json")
        inputs = json.loads(json.dumps({"recipe": RECIPE, **inputs}))
        stamp = _read_json(stamp_path)
        if (not self.force and isinstance(stamp, dict) and stamp.get("inputs") == inputs
                and path.exists()):
            self.done[name] = stamp
            return stamp
        if os.geteuid() != 0:
            raise BuildError(f"building {name} needs root (debootstrap, chroot, mount)")
        _log(f"{name}: building")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        _remove_tree(tmp)
        t0 = time.monotonic()
        try:
            outputs = build(tmp)
        except BaseException:
            _log(f"{name}: failed; removing {tmp}")
            with contextlib.suppress(Exception):
                _remove_tree(tmp)
            raise
        seconds = round(time.monotonic() - t0, 1)
        stamp_path.unlink(missing_ok=True)  # no stamp while the old artifact goes away
        _remove_tree(path)
        os.rename(tmp, path)
        stamp = {
            "inputs": inputs,
            "outputs": outputs,
            "build_id": uuid.uuid4().hex,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": seconds,
        }
        _write_json_atomic(stamp_path, stamp)
        _log(f"{name}: done in {seconds:.1f} s")
        self.done[name] = stamp
        return stamp

    def run(self, cmd: Sequence[str], log_name: str, **kw: Any) -> None:
        """Run a command with its output going to ``WORK/logs/LOG_NAME.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{log_name}.log"
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw).returncode
        if rc != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise BuildError(f"{log_name}: `{' '.join(cmd)}` exited {rc}; log {log}:\n{tail}")

    def chroot(self, root: Path, cmd: Sequence[str], log_name: str) -> None:
        env = [f"{k}={v}" for k, v in CHROOT_ENV.items()]
        self.run(["chroot", str(root), "/usr/bin/env", "-i", *env, *cmd], log_name)

    # -- rootfs stages

    def base_rootfs(self) -> dict[str, Any]:
        mirror = find_mirror()
        inputs = {"suite": SUITE, "mirror": mirror, "packages": list(BASE_PACKAGES)}

        def build(root: Path) -> dict[str, Any]:
            _log(f"debootstrap --variant=minbase {SUITE} from {mirror}")
            self.run(["debootstrap", "--variant=minbase", SUITE, str(root), mirror], "base")
            shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
            with chroot_mounts(root):
                _log(f"apt-get install {' '.join(BASE_PACKAGES)} in the chroot")
                self.chroot(root, ["apt-get", "-o", "Acquire::Check-Valid-Until=false", "update"], "base")
                self.chroot(root, ["apt-get", "install", "-y", "--no-install-recommends", *BASE_PACKAGES], "base")
                self.chroot(root, ["apt-get", "clean"], "base")
                version = self.chroot_python_version(root)
            # What container base images leave out: package lists, the host's resolver,
            # device nodes (the runtime provides /dev).
            for d in ("var/lib/apt/lists", "dev", "tmp", "var/tmp"):
                for p in sorted((root / d).iterdir()):
                    if p.name not in ("partial", "lock"):
                        _remove_tree(p)
            (root / "etc/resolv.conf").unlink(missing_ok=True)
            if not version.startswith(PYTHON_VERSION + "."):
                raise BuildError(f"the chroot's python3 is {version}, wheels are fetched for {PYTHON_VERSION}")
            return {"python": version, "entries": count_entries(root)}

        return self.step("rootfs/base", inputs, build)

    def chroot_python_version(self, root: Path) -> str:
        out = subprocess.run(
            ["chroot", str(root), "/usr/bin/env", "-i", "PYTHONDONTWRITEBYTECODE=1", "/usr/bin/python3", "-c",
             "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True, text=True, check=True,
        )
        return out.stdout.strip()

    def wheels(self, name: str) -> dict[str, Any]:
        """Download the wheels of one venv step on the host, for the chroot's Python."""
        if name == "numpy":
            inputs: dict[str, Any] = {"requirements": [NUMPY_REQUIREMENT]}
        else:
            inputs = {"requirements": [TORCH_WHEEL_NAME]}
        inputs |= {"python": PYTHON_VERSION, "platforms": list(WHEEL_PLATFORMS)}

        def build(dest: Path) -> dict[str, Any]:
            reqs = [NUMPY_REQUIREMENT] if name == "numpy" else [str(find_torch_wheel())]
            dest.mkdir(parents=True)
            cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
                   "--implementation", "cp", "--python-version", PYTHON_VERSION]
            for platform in WHEEL_PLATFORMS:
                cmd += ["--platform", platform]
            _log(f"pip download {' '.join(reqs)}")
            self.run([*cmd, "-d", str(dest), *reqs], f"wheels-{name}")
            files = sorted(p.name for p in dest.iterdir())
            cuda = [f for f in files if re.match(r"(nvidia|triton|cuda)[-_]", f, re.I)]
            if cuda:
                raise BuildError(f"wheels for {name} pulled CUDA packages: {', '.join(cuda)}")
            return {"files": files, "bytes": sum(p.stat().st_size for p in dest.iterdir())}

        return self.step(f"wheels/{name}", inputs, build)

    def venv_rootfs(self, name: str, below: str, below_stamp: dict[str, Any]) -> dict[str, Any]:
        """Copy rootfs ``below``, then install the ``name`` wheels into /opt/venv."""
        wheels = self.wheels(name)
        inputs = {"below": below_stamp["build_id"], "wheels": wheels["build_id"], "venv": VENV}
        target = NUMPY_REQUIREMENT if name == "numpy" else f"torch=={TORCH_VERSION}+cpu"

        def build(root: Path) -> dict[str, Any]:
            _log(f"copying rootfs/{below}")
            self.run(["cp", "-a", "--reflink=auto", str(self.work / "rootfs" / below), str(root)], f"rootfs-{name}")
            with chroot_mounts(root, {self.work / "wheels" / name: CHROOT_WHEELS}):
                if name == "numpy":
                    _log(f"python3 -m venv {VENV}")
                    self.chroot(root, ["/usr/bin/python3", "-m", "venv", VENV], f"rootfs-{name}")
                _log(f"pip install {target} in the chroot")
                self.chroot(root, [f"{VENV}/bin/pip", "install", "--no-index", "--no-cache-dir",
                                   "--disable-pip-version-check", "--root-user-action=ignore", "--find-links", "/" + CHROOT_WHEELS, target],
                            f"rootfs-{name}")
            return {"entries": count_entries(root)}

        return self.step(f"rootfs/{name}", inputs, build)

    # -- layers and layouts

    def layer(self, name: str, lower: str | None, upper: str, created_by: str) -> dict[str, Any]:
        """Diff rootfs ``lower`` -> ``upper`` into ``WORK/layers/NAME/`` (zstd and gzip blobs)."""
        ids = [self.done[f"rootfs/{r}"]["build_id"] for r in (lower, upper) if r is not None]
        inputs = {"lower": lower, "upper": upper, "rootfs": ids, "zstd_level": ZSTD_LEVEL, "gzip_level": GZIP_LEVEL}

        def build(out: Path) -> dict[str, Any]:
            out.mkdir(parents=True)
            old = self.work / "rootfs" / lower if lower else None
            new = self.work / "rootfs" / upper
            _log(f"layer {name}: diff {lower or '(empty)'} -> {upper}")
            entries = diff_trees(old, new)
            _log(f"layer {name}: writing {len(entries)} entries (zstd + gzip)")
            with open(out / "layer.tar.zst", "wb") as zst, open(out / "layer.tar.gz", "wb") as gz:
                sink = _LayerSink(zst, gz)
                write_layer(new, entries, cast(IO[bytes], sink))
                sink.finish()
            return {
                "diff_id": sink.tar.digest, "size": sink.tar.size, "entries": len(entries),
                "zstd": {"digest": sink.zst.digest, "size": sink.zst.size},
                "gzip": {"digest": sink.gz.digest, "size": sink.gz.size},
                "created_by": created_by,
            }

        return self.step(f"layers/{name}", inputs, build)

    def layout(self, image: str, layers: Sequence[str], codec: str) -> dict[str, Any]:
        """Write ``WORK/oci/IMAGE-CODEC`` as an OCI image layout tagged ``latest``."""
        stamps = [self.done[f"layers/{layer}"] for layer in layers]
        inputs = {"layers": [s["build_id"] for s in stamps], "codec": codec}

        def build(out: Path) -> dict[str, Any]:
            blobs = out / "blobs" / "sha256"
            blobs.mkdir(parents=True)
            descriptors = []
            for layer, s in zip(layers, stamps):
                blob = s["outputs"][codec]
                src = self.work / "layers" / layer / ("layer.tar.zst" if codec == "zstd" else "layer.tar.gz")
                dst = blobs / blob["digest"].split(":", 1)[1]
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
                descriptors.append({"mediaType": MEDIA_TYPE_LAYER[codec], "digest": blob["digest"], "size": blob["size"]})
            config = image_config(image, [s["outputs"] for s in stamps])
            config_desc = _put_json_blob(blobs, config, MEDIA_TYPE_CONFIG)
            manifest = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_MANIFEST, "config": config_desc,
                        "layers": descriptors}
            manifest_desc = _put_json_blob(blobs, manifest, MEDIA_TYPE_MANIFEST)
            manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": TAG}
            manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
            (out / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
            (out / "index.json").write_text(json.dumps(
                {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": [manifest_desc]}))
            validate_layout(out, [d["digest"] for d in descriptors])
            return {"manifest": manifest_desc["digest"]}

        return self.step(f"oci/{image}-{codec}", inputs, build)


def _put_json_blob(blobs: Path, doc: dict[str, Any], media_type: str) -> dict[str, Any]:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}


def image_config(image: str, layers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The OCI image config: what a runtime needs to run ``python3`` from the venv."""
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    f"VIRTUAL_ENV={VENV}", "LANG=C.UTF-8"],
            "Cmd": ["python3"],
            "WorkingDir": "/",
            "Labels": {"org.opencontainers.image.title": f"imagefs bench image {image}"},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer["diff_id"] for layer in layers]},
        "history": [{"created_by": layer["created_by"]} for layer in layers],
    }


def validate_layout(path: Path, layer_digests: Sequence[str]) -> None:
    """Read the layout back with skopeo: the layout must parse and list these layers."""
    ref = f"oci:{path}:{TAG}"
    res = subprocess.run(["skopeo", "inspect", ref], capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"skopeo inspect {ref} failed: {res.stderr.strip()}")
    got = json.loads(res.stdout).get("Layers")
    if got != list(layer_digests):
        raise BuildError(f"skopeo inspect {ref}: layers {got} != written {list(layer_digests)}")


def find_torch_wheel() -> Path:
    """The local CPU-only torch wheel: ``$IMAGEFS_BENCH_TORCH_WHEEL``, else a find-links dir."""
    if os.environ.get(TORCH_WHEEL_ENV):
        return Path(os.environ[TORCH_WHEEL_ENV])
    dirs = os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]
    for d in dirs:
        p = Path(d.removeprefix("file://")) / TORCH_WHEEL_NAME
        if p.is_file():
            return p
    raise BuildError(f"{TORCH_WHEEL_NAME} not found in {' '.join(dirs)}; set ${TORCH_WHEEL_ENV}")


@contextlib.contextmanager
def chroot_mounts(root: Path, binds: dict[Path, str] | None = None) -> Iterator[None]:
    """Mount /proc, /sys, /dev (and read-only bind mounts of ``binds``) in a chroot.

    Everything mounted is unmounted on the way out, failure or not; a mount point this
    created is removed again and its parent's mtime restored, so it leaves no trace in
    the layer diff.
    """
    mounted: list[Path] = []
    created: list[tuple[Path, os.stat_result]] = []
    try:
        for args, target in (
            (["-t", "proc", "proc"], "proc"),
            (["-t", "sysfs", "sysfs"], "sys"),
            (["--bind", "/dev"], "dev"),
        ):
            subprocess.run(["mount", *args, str(root / target)], check=True)
            mounted.append(root / target)
        for src, target in (binds or {}).items():
            mp = root / target
            if not mp.exists():
                created.append((mp, mp.parent.stat()))
                mp.mkdir()
            subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(mp)], check=True)
            mounted.append(mp)
        yield
    finally:
        stuck = []
        for mp in reversed(mounted):
            if subprocess.run(["umount", str(mp)], stderr=subprocess.DEVNULL).returncode != 0:
                if subprocess.run(["umount", "-l", str(mp)]).returncode != 0:
                    stuck.append(str(mp))
        for mp, parent_st in reversed(created):
            if str(mp) not in stuck:
                mp.rmdir()
                os.utime(mp.parent, ns=(parent_st.st_atime_ns, parent_st.st_mtime_ns))
        if stuck:
            raise BuildError(f"could not unmount {', '.join(stuck)}")


# --------------------------------------------------------------------------- public API

LAYER_PLAN = {
    # layer: (lower rootfs, upper rootfs, what it is)
    "l1": (None, "base", f"debootstrap --variant=minbase {SUITE}; apt-get install {' '.join(BASE_PACKAGES)}"),
    "l2": ("base", "numpy", f"python3 -m venv {VENV}; pip install {NUMPY_REQUIREMENT}"),
    "l3": ("numpy", "torch", f"pip install torch=={TORCH_VERSION}+cpu"),
}
IMAGE_LAYERS = {"numpy": ("l1", "l2"), "torch": ("l1", "l2", "l3")}


def resolve_workdir(workdir: str | os.PathLike[str] | None = None) -> Path:
    return Path(workdir or os.environ.get(WORKDIR_ENV) or DEFAULT_WORKDIR).absolute()


@contextlib.contextmanager
def _locked(workdir: Path) -> Iterator[None]:
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another build in {workdir}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_images(workdir: str | None = None, names: Sequence[str] = IMAGE_NAMES,
                  force: bool = False) -> dict[str, BenchImage]:
    """Build (or reuse) the named bench images; returns them by name.

    ``workdir`` defaults to ``$IMAGEFS_BENCH_DIR``, else ``/var/cache/imagefs-bench``.
    With everything cached this only reads stamps. ``force`` rebuilds every step the
    named images need. Building needs root; a clean build of both takes minutes.
    """
    unknown = [n for n in names if n not in IMAGE_LAYERS]
    if unknown:
        raise ValueError(f"unknown bench image(s) {unknown}; known: {', '.join(IMAGE_LAYERS)}")
    work = resolve_workdir(workdir)
    with _locked(work):
        b = _Builder(work, force)
        rootfs = {"base": b.base_rootfs()}
        wanted_layers = sorted({layer for n in names for layer in IMAGE_LAYERS[n]})
        uppers = {LAYER_PLAN[layer][1] for layer in wanted_layers}
        if uppers & {"numpy", "torch"}:
            rootfs["numpy"] = b.venv_rootfs("numpy", "base", rootfs["base"])
        if "torch" in uppers:
            rootfs["torch"] = b.venv_rootfs("torch", "numpy", rootfs["numpy"])
        layers = {}
        for layer in wanted_layers:
            lower, upper, created_by = LAYER_PLAN[layer]
            layers[layer] = b.layer(layer, lower, upper, created_by)["outputs"]
        images = {}
        for name in names:
            for codec in ("zstd", "gzip"):
                b.layout(name, IMAGE_LAYERS[name], codec)
            ls = [layers[layer] for layer in IMAGE_LAYERS[name]]
            images[name] = BenchImage(
                name=name,
                layout_zstd=f"oci:{work / 'oci' / (name + '-zstd')}:{TAG}",
                layout_gzip=f"oci:{work / 'oci' / (name + '-gzip')}:{TAG}",
                rootfs=str(work / "rootfs" / name),
                layer_sizes=tuple(x["size"] for x in ls),
                n_entries=rootfs[name]["outputs"]["entries"],
                layer_entries=tuple(x["entries"] for x in ls),
                layer_compressed={c: tuple(x[c]["size"] for x in ls) for c in ("zstd", "gzip")},
            )
        return images


def build_times(workdir: str | None = None) -> dict[str, float]:
    """Seconds each cached step took when it was built, by step name."""
    work = resolve_workdir(workdir)
    out = {}
    for stamp in sorted(work.glob("*/*.stamp.json")):
        data = _read_json(stamp)
        if isinstance(data, dict) and "seconds" in data:
            out[str(stamp.relative_to(work)).removesuffix(".stamp.json")] = data["seconds"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench images``: build or reuse the bench images, print where they are."""
    p = argparse.ArgumentParser(
        prog="python -m bench images",
        description="Build the numpy and torch bench images (OCI layouts, zstd and gzip, plus "
        "the unpacked rootfs), cached in a work directory.",
    )
    p.add_argument("--workdir", help=f"work directory (default ${WORKDIR_ENV}, else {DEFAULT_WORKDIR})")
    p.add_argument("--only", choices=IMAGE_NAMES, help="build only this image (and what it needs)")
    p.add_argument("--force", action="store_true", help="rebuild every step, ignoring the cache")
    args = p.parse_args(argv)
    names = (args.only,) if args.only else IMAGE_NAMES
    try:
        images = ensure_images(args.workdir, names, force=args.force)
    except BuildError as e:
        print(f"bench images: {e}", file=sys.stderr)
        return 1
    for img in images.values():
        print(f"{img.name}:")
        print(f"  rootfs       {img.rootfs}  ({img.n_entries} entries)")
        print(f"  layout zstd  {img.layout_zstd}")
        print(f"  layout gzip  {img.layout_gzip}")
        for i, (size, n) in enumerate(zip(img.layer_sizes, img.layer_entries)):
            z, g = img.layer_compressed["zstd"][i], img.layer_compressed["gzip"][i]
            print(f"  layer {i + 1}      {size:>13,} B tar ({_human(size)}), {n:>6} entries; "
                  f"zstd {_human(z)}, gzip {_human(g)}")
        print(f"  total        {sum(img.layer_sizes):>13,} B tar ({_human(sum(img.layer_sizes))})")
    times = build_times(args.workdir)
    if times:
        print("build times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    return 0

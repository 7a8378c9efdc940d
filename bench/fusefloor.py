"""The floor under any pyfuse3 read path: a do-nothing FUSE file system, against local disk.

The read-path targets (bench/readpath.py) compare imagefs with local disk. Part of the
gap is imagefs's own work (finding, reading and verifying chunks) and part is the cost of
serving a file system from Python through pyfuse3 and trio at all. This bench measures
the second part alone, with a file system that does no work of its own:

- ``static``: one 1 GiB file whose every read is answered from one preallocated buffer
  (no I/O at all): the pyfuse3 + kernel FUSE ceiling for sequential reads.
- ``pread``: the same file answered by ``os.pread`` of the local copy on a worker
  thread, the thinnest data path a pyfuse3 file system can have over local disk.
- ``ops``: N small files read one after another (lookup, open, read, release each):
  the time each file costs through FUSE minus the same on local disk, i.e. the round
  trips a serial workload such as ``import torch`` pays per file.
- ``mirror``: a read-only pass-through of the unpacked torch rootfs, with imagefs's
  kernel-caching choices, and ``import torch`` chrooted into it (the wrapper of the
  read-path bench), cold and hot: the floor under imagefs's import-torch targets, and
  the FUSE requests one import costs a pyfuse3 file system with those choices.

Each figure sits beside local disk measured in the same run, interleaved; cold means
``sync; echo 3 > /proc/sys/vm/drop_caches`` right before.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import re
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.scenarios import drop_caches, force_unmount

SMALL_SIZE = 4096
YEAR = 365 * 24 * 3600.0  # imagefs's entry and attribute timeout (imagefs.fuse_ops.CACHE_TIMEOUT)


def mirror_ops(source: str, ops: Counter[str]) -> Any:
    """(child process) A read-only pass-through of ``source`` that counts requests in ``ops``.

    Why it exists: ``import torch`` through imagefs is compared with the same import on
    the unpacked rootfs. This file system forwards every request to those very files and
    does nothing else, with imagefs's kernel-caching choices (entries and attributes
    cached a year, missing names as cached negative entries, ``keep_cache``,
    readdirplus), so its import time is what any pyfuse3 file system pays over local
    disk on this machine. Metadata calls run on the trio thread (imagefs answers them
    from memory); reads are ``os.pread`` on a worker thread, as imagefs keeps its
    blocking I/O off that thread.
    """
    import pyfuse3
    import trio

    def entry(ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.entry_timeout, e.attr_timeout = ino, YEAR, YEAR
        e.st_mode, e.st_nlink, e.st_uid, e.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        e.st_rdev, e.st_size, e.st_blocks, e.st_blksize = st.st_rdev, st.st_size, st.st_blocks, st.st_blksize
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return e

    def op(fn: Callable[..., Any]) -> Callable[..., Any]:
        """Count the request; answer an OSError with its errno (anything but FUSEError ends pyfuse3.main)."""
        @functools.wraps(fn)
        async def handler(self: Any, *args: Any) -> Any:
            ops[fn.__name__] += 1
            try:
                return await fn(self, *args)
            except OSError as e:
                ops[f"{fn.__name__} {errno.errorcode.get(e.errno or 0, e.errno)}"] += 1
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        return handler

    class Mirror(pyfuse3.Operations):  # type: ignore[misc]
        supports_dot_lookup = True
        enable_writeback_cache = False
        enable_acl = False

        def __init__(self) -> None:
            super().__init__()
            root = os.fsencode(os.path.abspath(source))
            self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: root}
            self.inos: dict[bytes, int] = {root: pyfuse3.ROOT_INODE}
            self.files: dict[int, int] = {}  # handle -> fd
            self.dirs: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}  # handle -> listing
            self.handles = 0

        def _entry(self, path: bytes) -> pyfuse3.EntryAttributes:
            st = os.lstat(path)
            ino = self.inos.get(path)
            if ino is None:
                ino = self.inos[path] = len(self.paths) + 1  # ROOT_INODE is 1
                self.paths[ino] = path
            return entry(ino, st)

        def _parent(self, ino: int) -> bytes:
            path = self.paths[ino]
            return path if ino == pyfuse3.ROOT_INODE else os.path.dirname(path)

        @op
        async def lookup(self, parent: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
            if name in (b".", b".."):
                path = self.paths[parent] if name == b"." else self._parent(parent)
            else:
                path = os.path.join(self.paths[parent], name)
            try:
                return self._entry(path)
            except FileNotFoundError:
                e = pyfuse3.EntryAttributes()
                e.st_ino, e.entry_timeout = 0, YEAR  # a negative entry the kernel keeps
                return e

        @op
        async def getattr(self, ino: int, ctx: Any) -> pyfuse3.EntryAttributes:
            return self._entry(self.paths[ino])

        @op
        async def readlink(self, ino: int, ctx: Any) -> bytes:
            return os.readlink(self.paths[ino])

        @op
        async def opendir(self, ino: int, ctx: Any) -> int:
            path = self.paths[ino]
            with os.scandir(path) as it:
                names = sorted(e.name for e in it)
            self.handles += 1
            self.dirs[self.handles] = [(b".", self._entry(path)), (b"..", self._entry(self._parent(ino)))] + [
                (n, self._entry(os.path.join(path, n))) for n in names]
            return self.handles

        @op
        async def readdir(self, fh: int, start: int, token: Any) -> None:
            listing = self.dirs[fh]
            for i in range(start, len(listing)):  # offset i + 1 = the entry after this one
                if not pyfuse3.readdir_reply(token, listing[i][0], listing[i][1], i + 1):
                    return

        @op
        async def releasedir(self, fh: int) -> None:
            del self.dirs[fh]

        @op
        async def open(self, ino: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
            self.handles += 1
            self.files[self.handles] = os.open(self.paths[ino], os.O_RDONLY)
            return pyfuse3.FileInfo(fh=self.handles, keep_cache=True, direct_io=False)

        @op
        async def read(self, fh: int, off: int, size: int) -> bytes:
            return await trio.to_thread.run_sync(os.pread, self.files[fh], size, off)

        @op
        async def release(self, fh: int) -> None:
            os.close(self.files.pop(fh))

        @op
        async def getxattr(self, ino: int, name: bytes, ctx: Any) -> bytes:
            return os.getxattr(self.paths[ino], name, follow_symlinks=False)

        @op
        async def listxattr(self, ino: int, ctx: Any) -> list[bytes]:
            return [os.fsencode(n) for n in os.listxattr(self.paths[ino], follow_symlinks=False)]

        async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
            ops["forget"] += 1  # inodes live as long as the mount; no reply, so never raise

    return Mirror()


def serve(mountpoint: str, mode: str, big: str, files: int, ops_file: str | None = None) -> None:
    """(child process) Serve the do-nothing file system (or, in mode ``mirror``, the
    pass-through of the directory ``big``) until unmounted. The mirror writes its request
    counts as JSON to ``ops_file`` on SIGUSR1 and on exit."""
    import pyfuse3
    import trio

    if mode == "mirror":
        ops: Counter[str] = Counter()

        def dump(*_: object) -> None:
            if ops_file:
                Path(ops_file + ".tmp").write_text(json.dumps(ops))
                os.replace(ops_file + ".tmp", ops_file)

        signal.signal(signal.SIGUSR1, dump)
        # imagefs's own option set (imagefs.mount)
        pyfuse3.init(mirror_ops(big, ops), mountpoint,
                     {"fsname=fusefloor-mirror", "ro", "default_permissions", "allow_other"})
        try:
            trio.run(pyfuse3.main)
        finally:
            pyfuse3.close(unmount=False)
            dump()
        return

    size = os.path.getsize(big)
    static = os.urandom(1 << 20)
    small = os.urandom(SMALL_SIZE)
    fd = os.open(big, os.O_RDONLY)

    class Floor(pyfuse3.Operations):  # type: ignore[misc]
        async def getattr(self, ino: int, ctx: object = None) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            a.entry_timeout = a.attr_timeout = 3600
            if ino == pyfuse3.ROOT_INODE:
                a.st_mode = stat.S_IFDIR | 0o755
            else:
                a.st_mode = stat.S_IFREG | 0o644
                a.st_size = size if ino == 2 else SMALL_SIZE
            return a

        async def lookup(self, parent: int, name: bytes, ctx: object = None) -> pyfuse3.EntryAttributes:
            if parent == pyfuse3.ROOT_INODE:
                if name == b"big":
                    return await self.getattr(2)
                if name.startswith(b"f") and name[1:].isdigit() and int(name[1:]) < files:
                    return await self.getattr(3 + int(name[1:]))
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def open(self, ino: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
            fi = pyfuse3.FileInfo(fh=ino)
            fi.keep_cache = True
            return fi

        async def read(self, fh: int, off: int, size_: int) -> bytes:
            if fh != 2:
                return small[off:off + size_]
            if mode == "static":
                return static[:max(0, min(size_, size - off))]
            return await trio.to_thread.run_sync(os.pread, fd, size_, off)

    options = set(pyfuse3.default_options)
    options |= {"fsname=fusefloor", "ro"}
    pyfuse3.init(Floor(), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


class FloorMount:
    """The do-nothing file system (or the mirror of the directory ``big``) in a child
    process, mounted at a fresh directory."""

    def __init__(self, mode: str, big: Path, files: int = 0) -> None:
        self.dir = tempfile.mkdtemp(prefix="imagefs-fusefloor-")
        self.ops_file = Path(tempfile.mkdtemp(prefix="imagefs-fusefloor-ops-"), "ops.json")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.fusefloor", "--serve", self.dir, mode, str(big),
                                      str(files), "--ops-file", str(self.ops_file)])
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.dir):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the floor file system did not mount")
            time.sleep(0.01)
        bdi = os.stat(self.dir).st_dev
        # the same readahead window imagefs sets on its mounts
        Path(f"/sys/class/bdi/{os.major(bdi)}:{os.minor(bdi)}/read_ahead_kb").write_text("32768\n")

    def ops(self, timeout: float = 10.0) -> Counter[str]:
        """(mirror) The requests answered so far, once every file and directory handle is
        released again (the kernel sends releases asynchronously after a close)."""
        deadline = time.monotonic() + timeout
        while True:
            self.ops_file.unlink(missing_ok=True)
            self.proc.send_signal(signal.SIGUSR1)
            while not self.ops_file.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the mirror did not report its request counts")
                time.sleep(0.002)
            ops = Counter(json.loads(self.ops_file.read_text()))
            if (ops["open"] == ops["release"] and ops["opendir"] == ops["releasedir"]) or time.monotonic() > deadline:
                return ops
            time.sleep(0.02)

    def close(self) -> None:
        try:
            force_unmount(Path(self.dir))
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.rmdir(self.dir)
            subprocess.run(["rm", "-rf", str(self.ops_file.parent)], check=False)


def read_all(path: str) -> float:
    """Seconds to read ``path`` sequentially in 1 MiB calls."""
    buf = bytearray(1 << 20)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def read_small(directory: str, files: int) -> float:
    t = time.perf_counter()
    for i in range(files):
        with open(os.path.join(directory, f"f{i}"), "rb", buffering=0) as f:
            f.read(SMALL_SIZE + 1)
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_seqread(big: Path, files: int, repeat: int) -> list[str]:
    """Sequential read of ``big``: local cold, ``static`` and ``pread`` cold, local and ``static`` hot."""
    size = big.stat().st_size
    results: dict[str, list[float]] = {"local": [], "static": [], "pread": [], "local hot": [], "static hot": []}
    for mode in ("static", "pread"):
        m = FloorMount(mode, big, files)
        try:
            for _ in range(repeat):
                drop_caches()
                results["local"].append(read_all(str(big)))
                drop_caches()
                results[mode].append(read_all(os.path.join(m.dir, "big")))
                if mode == "static":  # hot: the kernel serves both from the page cache
                    read_all(str(big))
                    results["local hot"].append(read_all(str(big)))
                    results["static hot"].append(read_all(os.path.join(m.dir, "big")))
        finally:
            m.close()
    mb = size / 1e6
    local = median(results["local"])
    out = [f"Sequential read of a {size >> 20} MiB file in 1 MiB calls, page cache dropped before each cold read:\n",
           "| read path | MB/s | vs local disk cold (same run) |", "|---|---|---|",
           f"| local disk, cold | {mb / local:,.0f} | 1.00x |"]
    for mode, label in (("static", "pyfuse3, every read answered from one buffer (no I/O)"),
                        ("pread", "pyfuse3, every read a pread of the local file on a worker thread")):
        t = median(results[mode])
        out.append(f"| {label} | {mb / t:,.0f} | {local / t:.2f}x |")
    hot_local, hot_fuse = median(results["local hot"]), median(results["static hot"])
    out.append(f"| local disk, hot (page cache) | {mb / hot_local:,.0f} | |")
    out.append(f"| pyfuse3, hot (page cache, keep_cache: no request reaches the daemon) | {mb / hot_fuse:,.0f} | "
               f"{hot_local / hot_fuse:.2f}x local hot |")
    return out


def bench_small(big: Path, files: int, repeat: int) -> list[str]:
    """Per small file: ``files`` 4 KiB files through the do-nothing file system, cold, vs local hot."""
    local_dir = tempfile.mkdtemp(prefix="imagefs-fusefloor-local-", dir="/var/tmp")
    small = os.urandom(SMALL_SIZE)
    for i in range(files):
        Path(local_dir, f"f{i}").write_bytes(small)
    per_fuse: list[float] = []
    per_local: list[float] = []
    m = FloorMount("static", big, files)
    try:
        for _ in range(repeat):
            drop_caches()  # FUSE: every file is a lookup, open, read, release at the daemon
            per_fuse.append(read_small(m.dir, files) / files)
            read_small(local_dir, files)  # local: hot, so its cost is the syscalls alone
            per_local.append(read_small(local_dir, files) / files)
    finally:
        m.close()
        subprocess.run(["rm", "-rf", local_dir], check=False)
    fuse_us, local_us = median(per_fuse) * 1e6, median(per_local) * 1e6
    return [f"Per small file read through the do-nothing FUSE file system (lookup, open, read, release "
            f"at the daemon; {files} files): {fuse_us:.0f} us, against {local_us:.0f} us for the same "
            f"syscalls on local files in the page cache: {fuse_us - local_us:.0f} us of round trips per file."]


def _ops_line(ops: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items()) if v) + f" ({sum(ops.values()):,} in all)"


def recorded_import_figures(results_md: Path) -> tuple[str, dict[str, tuple[str, str]]]:
    """imagefs's ``import torch`` ratios against local disk as recorded in the section
    "Read path" of ``results_md``: (its run and commit, {"cold"|"hot": (ratio, target)})."""
    text = results_md.read_text() if results_md.exists() else ""
    start = text.find("## Read path\n")
    if start < 0:
        return "", {}
    end = text.find("\n## ", start + 1)
    section = text[start:end if end >= 0 else len(text)]
    run = re.search(r" on (\d{4}-\d\d-\d\d \d\d:\d\d UTC), imagefs (\S+);", section)
    found: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0].startswith("`import torch`") and cells[2].startswith("local disk"):
            found["hot" if "hot" in cells[0] else "cold"] = (cells[3], cells[4])
    return (f"{run[1]}, imagefs {run[2]}" if run else "date unknown"), found


def bench_import(repeat: int) -> list[str]:
    """``import torch`` on the torch rootfs and through a fresh ``mirror`` mount of it,
    each cold then hot, interleaved; plus the mirror's requests per import."""
    from bench.images import ensure_images
    from bench.readpath import RESULTS_MD, DropGuard, chroot_import, cpu_seconds

    rootfs = Path(ensure_images(None, ("torch",))["torch"].rootfs)
    guard = DropGuard()  # someone else's drop_caches would turn a hot figure cold: measure again
    chroot_import(rootfs)  # the wrapper's own binaries and the rootfs once, untimed
    times: dict[str, list[float]] = {k: [] for k in ("local cold", "local hot", "mirror cold", "mirror hot")}
    ops: list[tuple[Counter[str], Counter[str]]] = []  # (cold, hot) per repeat
    cpu: list[float] = []  # mirror daemon CPU seconds per cold import

    def local() -> tuple[dict[str, float], None]:
        drop_caches()
        return {"local cold": chroot_import(rootfs), "local hot": chroot_import(rootfs)}, None

    def mirror() -> tuple[dict[str, float], tuple[Counter[str], Counter[str], float]]:
        m = FloorMount("mirror", rootfs)  # a fresh daemon and mount each time
        try:
            drop_caches()
            s0, c0 = m.ops(), cpu_seconds(m.proc.pid)
            cold = chroot_import(Path(m.dir))
            s1, c1 = m.ops(), cpu_seconds(m.proc.pid)
            hot = chroot_import(Path(m.dir))
            s2 = m.ops()
        finally:
            m.close()
        return {"mirror cold": cold, "mirror hot": hot}, (s1 - s0, s2 - s1, c1 - c0)

    steps: list[tuple[str, Callable[[], tuple[dict[str, float], Any]]]] = [("local disk", local), ("mirror", mirror)]
    for rep in range(repeat):
        for what, step in steps if rep % 2 == 0 else steps[::-1]:
            figures, extra = guard.run(f"import torch, {what}", step, 1)
            for k, v in figures.items():
                times[k].append(v)
            if extra is not None:
                ops.append(extra[:2])
                cpu.append(extra[2])
        print(f"[fusefloor] import torch {rep + 1}/{repeat} (s): "
              + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), file=sys.stderr, flush=True)

    med = {k: median(v) for k, v in times.items()}
    cold, hot = med["mirror cold"] / med["local cold"], med["mirror hot"] / med["local hot"]

    def cell(k: str) -> str:
        return f"{med[k]:.2f} ({min(times[k]):.2f}-{max(times[k]):.2f})"

    out = [f"`import torch` (the read-path bench's wrapper: `unshare -m`, /proc and /dev mounted, `chroot ROOT "
           f"/opt/venv/bin/python3 -c \"import torch\"`, timed from the parent, interpreter start included) on the "
           f"unpacked torch rootfs on local disk, and through `mirror`: a pyfuse3 pass-through of that same rootfs "
           f"that does nothing but forward each request to those files, with imagefs's kernel-caching choices and "
           f"mount options (a year of entry and attribute caching, cached negative entries, keep_cache, readdirplus, "
           f"read_ahead_kb 32768, ro) and each read an `os.pread` on a worker thread; a fresh mount per repeat, "
           f"\"cold\" = page cache dropped after the mount. Interleaved, {repeat} repeats, medians "
           f"(min-max); {guard.retries} measurements taken again after a foreign page-cache drop:\n",
           "| `import torch` | seconds | vs local disk (same run) |", "|---|---|---|",
           f"| local disk, cold | {cell('local cold')} | 1.00x |",
           f"| pyfuse3 mirror of the same files, cold | {cell('mirror cold')} | {cold:.2f}x local cold |",
           f"| local disk, hot | {cell('local hot')} | 1.00x |",
           f"| pyfuse3 mirror, hot | {cell('mirror hot')} | {hot:.2f}x local hot |", ""]
    totals = [(sum(c.values()), sum(h.values())) for c, h in ops]
    out.append(f"FUSE requests the mirror answered per import, first repeat: cold: {_ops_line(ops[0][0])}; hot: "
               f"{_ops_line(ops[0][1])}. Totals over the repeats: cold {min(t[0] for t in totals):,}-"
               f"{max(t[0] for t in totals):,}, hot {min(t[1] for t in totals):,}-{max(t[1] for t in totals):,}. "
               f"Mirror daemon CPU (user+system, all threads) per cold import: median {median(cpu):.2f} s.")
    run, rec = recorded_import_figures(RESULTS_MD)
    if {"cold", "hot"} <= rec.keys():
        def against(floor: float, target: str) -> str:
            bound = re.search(r"\d+(?:\.\d+)?", target)
            if bound is None:
                return ""
            return "; the target is below this floor" if floor > float(bound[0]) else "; this floor is within it"
        out.append(f"\nimagefs against this floor (section \"Read path\", {run}): `import torch` SSD warm, page "
                   f"cache dropped {rec['cold'][0]} local disk cold, target {rec['cold'][1]}, where the mirror "
                   f"takes {cold:.2f}x{against(cold, rec['cold'][1])}; hot {rec['hot'][0]} local disk hot, target "
                   f"{rec['hot'][1]}, where the mirror takes {hot:.2f}x{against(hot, rec['hot'][1])}.")
    else:
        out.append("\n(Section \"Read path\" has no `import torch` figures against local disk to set beside these.)")
    return out


PARTS = ("seqread", "small", "import")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench fusefloor", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--big", type=Path, default=Path("/var/cache/imagefs-bench/readpath/big/big.bin"),
                    help="a large local file (default: the read-path bench's 1 GiB file)")
    ap.add_argument("--files", type=int, default=2000, help="small files for the per-file round trips")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=PARTS, action="append",
                    help="run only these parts (repeatable; default all): sequential read, per-file round trips, "
                         "import torch through the mirror")
    ap.add_argument("--write", action="store_true", help="put the section into bench/RESULTS.md (needs every part)")
    ap.add_argument("--serve", nargs=4, metavar=("MP", "MODE", "BIG", "FILES"), help=argparse.SUPPRESS)
    ap.add_argument("--ops-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        mp, mode, big, files = args.serve
        serve(mp, mode, big, int(files), args.ops_file)
        return 0
    parts = set(args.only or PARTS)
    if args.write and parts != set(PARTS):
        print("fusefloor: --write replaces the whole section: run every part", file=sys.stderr)
        return 2
    if parts & {"seqread", "small"} and not args.big.is_file():
        print(f"fusefloor: {args.big}: no such file (run `python -m bench readpath` once to make it)",
              file=sys.stderr)
        return 1
    command = " ".join(["python -m bench fusefloor", *(sys.argv[2:] if argv is None else argv)])
    out = [f"## FUSE floor\n\n`{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
           f"{os.cpu_count()} cores; pyfuse3 + trio, read_ahead_kb 32768 on every mount, page cache dropped "
           f"before each cold measurement. Medians.\n"]
    if "seqread" in parts:
        out += bench_seqread(args.big, args.files, args.repeat) + [""]
    if "small" in parts:
        out += bench_small(args.big, args.files, args.repeat) + [""]
    if "import" in parts:
        out += bench_import(args.repeat) + [""]
    text = "\n".join(out).rstrip("\n") + "\n"
    print(text, end="")
    if args.write:
        from bench.readpath import write_section
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

Each figure sits beside local disk measured in the same run, interleaved; cold means
``sync; echo 3 > /proc/sys/vm/drop_caches`` right before.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.scenarios import drop_caches, force_unmount

SMALL_SIZE = 4096


def serve(mountpoint: str, mode: str, big: str, files: int) -> None:
    """(child process) Serve the do-nothing file system until unmounted."""
    import pyfuse3
    import trio

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
    """The do-nothing file system in a child process, mounted at a fresh directory."""

    def __init__(self, mode: str, big: Path, files: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="imagefs-fusefloor-")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.fusefloor", "--serve", self.dir, mode, str(big),
                                      str(files)])
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.dir):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the floor file system did not mount")
            time.sleep(0.01)
        bdi = os.stat(self.dir).st_dev
        # the same readahead window imagefs sets on its mounts
        Path(f"/sys/class/bdi/{os.major(bdi)}:{os.minor(bdi)}/read_ahead_kb").write_text("32768\n")

    def close(self) -> None:
        force_unmount(Path(self.dir))
        self.proc.wait(timeout=30)
        os.rmdir(self.dir)


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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench fusefloor", description=__doc__.splitlines()[0])
    ap.add_argument("--big", type=Path, default=Path("/var/cache/imagefs-bench/readpath/big/big.bin"),
                    help="a large local file (default: the read-path bench's 1 GiB file)")
    ap.add_argument("--files", type=int, default=2000, help="small files for the per-file round trips")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="put the section into bench/RESULTS.md")
    ap.add_argument("--serve", nargs=4, metavar=("MP", "MODE", "BIG", "FILES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        mp, mode, big, files = args.serve
        serve(mp, mode, big, int(files))
        return 0
    if not args.big.is_file():
        print(f"fusefloor: {args.big}: no such file (run `python -m bench readpath` once to make it)",
              file=sys.stderr)
        return 1
    size = args.big.stat().st_size
    results: dict[str, list[float]] = {"local": [], "static": [], "pread": [], "local hot": [], "static hot": []}
    for mode in ("static", "pread"):
        m = FloorMount(mode, args.big, args.files)
        try:
            for _ in range(args.repeat):
                drop_caches()
                results["local"].append(read_all(str(args.big)))
                drop_caches()
                results[mode].append(read_all(os.path.join(m.dir, "big")))
                if mode == "static":  # hot: the kernel serves both from the page cache
                    read_all(str(args.big))
                    results["local hot"].append(read_all(str(args.big)))
                    results["static hot"].append(read_all(os.path.join(m.dir, "big")))
        finally:
            m.close()
    local_dir = tempfile.mkdtemp(prefix="imagefs-fusefloor-local-", dir="/var/tmp")
    small = os.urandom(SMALL_SIZE)
    for i in range(args.files):
        Path(local_dir, f"f{i}").write_bytes(small)
    per_fuse: list[float] = []
    per_local: list[float] = []
    m = FloorMount("static", args.big, args.files)
    try:
        for _ in range(args.repeat):
            drop_caches()  # FUSE: every file is a lookup, open, read, release at the daemon
            per_fuse.append(read_small(m.dir, args.files) / args.files)
            read_small(local_dir, args.files)  # local: hot, so its cost is the syscalls alone
            per_local.append(read_small(local_dir, args.files) / args.files)
    finally:
        m.close()
        subprocess.run(["rm", "-rf", local_dir], check=False)

    out: list[str] = []
    mb = size / 1e6
    local = median(results["local"])
    out.append(f"## FUSE floor\n\n`python -m bench fusefloor --repeat {args.repeat}` on "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores; pyfuse3 + trio, "
               f"read_ahead_kb 32768, {size >> 20} MiB file, page cache dropped before each read. Medians.\n")
    out.append("| read path | MB/s | vs local disk cold (same run) |")
    out.append("|---|---|---|")
    out.append(f"| local disk, cold | {mb / local:,.0f} | 1.00x |")
    for mode, label in (("static", "pyfuse3, every read answered from one buffer (no I/O)"),
                        ("pread", "pyfuse3, every read a pread of the local file on a worker thread")):
        t = median(results[mode])
        out.append(f"| {label} | {mb / t:,.0f} | {local / t:.2f}x |")
    hot_local, hot_fuse = median(results["local hot"]), median(results["static hot"])
    out.append(f"| local disk, hot (page cache) | {mb / hot_local:,.0f} | |")
    out.append(f"| pyfuse3, hot (page cache, keep_cache: no request reaches the daemon) | {mb / hot_fuse:,.0f} | "
               f"{hot_local / hot_fuse:.2f}x local hot |")
    fuse_us, local_us = median(per_fuse) * 1e6, median(per_local) * 1e6
    out.append(f"\nPer small file read through the do-nothing FUSE file system (lookup, open, read, release "
               f"at the daemon; {args.files} files): {fuse_us:.0f} us, against {local_us:.0f} us for the same "
               f"syscalls on local files in the page cache: {fuse_us - local_us:.0f} us of round trips per file.")
    text = "\n".join(out) + "\n"
    print(text, end="")
    if args.write:
        from bench.readpath import write_section
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SSD tier layout: one file per chunk against one segment file, for cold random reads.

The SSD tier keeps each chunk in a file of its own (``chunks/ab/abcd...``). With the
page cache dropped, every chunk read then pays a directory lookup and an inode read
before its data, where a tier that appended chunks to large segment files (and kept
them open) would pay only the data read. Whether that is worth a new tier design is a
question of how much it costs per chunk on this disk, which this bench measures alone:

- ``files``: N chunk files of SIZE bytes in the tier's two-level layout, each opened,
  read whole with O_DIRECT (as the tier reads) and closed;
- ``segment``: the same N chunks at 4 KiB-aligned offsets of one file opened once,
  each read with O_DIRECT;

in the same random order, page cache dropped before each pass, passes interleaved.
The defaults mimic an SSD-warm ``import torch`` (1,449 chunk reads, 409 MiB: ~290 KiB
each). ``python -m bench ssdlayout [--chunks N] [--size BYTES] [--repeat N]`` prints a
markdown section.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

from bench.scenarios import drop_caches

ALIGN = 4096


def _aligned(n: int) -> int:
    return n + (-n) % ALIGN


def prepare(root: str, names: list[str], size: int) -> None:
    """The chunk files and the segment file, same bytes, written and synced once."""
    data = os.urandom(size)
    pad = b"\0" * (_aligned(size) - size)
    for name in names:
        d = os.path.join(root, "chunks", name[:2])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    with open(os.path.join(root, "segment"), "wb") as f:
        for _ in names:
            f.write(data + pad)
    os.sync()


def read_files(root: str, names: list[str], order: list[int], buf: memoryview) -> float:
    t = time.perf_counter()
    for i in order:
        name = names[i]
        fd = os.open(os.path.join(root, "chunks", name[:2], name), os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
    return time.perf_counter() - t


def read_segment(root: str, order: list[int], buf: memoryview) -> float:
    t = time.perf_counter()
    fd = os.open(os.path.join(root, "segment"), os.O_RDONLY | os.O_DIRECT)
    try:
        for i in order:
            os.preadv(fd, [buf], i * len(buf))
    finally:
        os.close(fd)
    return time.perf_counter() - t


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench ssdlayout", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--chunks", type=int, default=1449, help="chunk reads per pass (default: an SSD-warm import torch)")
    ap.add_argument("--size", type=int, default=290 << 10, help="bytes per chunk (default 290 KiB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp", help="where to put the test files (the SSD tier's disk)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench ssdlayout: needs root (drop_caches)", file=sys.stderr)
        return 2
    rnd = random.Random(1)
    names = [f"{rnd.getrandbits(256):064x}" for _ in range(args.chunks)]
    order = list(range(args.chunks))
    rnd.shuffle(order)
    root = tempfile.mkdtemp(prefix="imagefs-ssdlayout-", dir=args.dir)
    raw = mmap.mmap(-1, _aligned(args.size))  # page-aligned, as O_DIRECT wants
    buf = memoryview(raw)
    files: list[float] = []
    segment: list[float] = []
    try:
        prepare(root, names, args.size)
        for _ in range(args.repeat):
            drop_caches()
            files.append(read_files(root, names, order, buf))
            drop_caches()
            segment.append(read_segment(root, order, buf))
    finally:
        buf.release()
        raw.close()
        shutil.rmtree(root, ignore_errors=True)
    f, s = statistics.median(files), statistics.median(segment)
    per_f, per_s = f / args.chunks * 1e6, s / args.chunks * 1e6
    print("\n".join([
        "## SSD tier layout", "",
        f"`python -m bench ssdlayout --chunks {args.chunks} --size {args.size} --repeat {args.repeat}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores; {args.chunks} cold "
        f"O_DIRECT reads of {args.size >> 10} KiB in random order, page cache dropped before each pass; medians.", "",
        "| layout | pass | per chunk |", "|---|---|---|",
        f"| one file per chunk (open, read, close) | {f * 1000:.0f} ms | {per_f:.0f} us |",
        f"| one segment file, opened once | {s * 1000:.0f} ms | {per_s:.0f} us |",
        "",
        f"A file per chunk costs {per_f - per_s:.0f} us more per chunk: {(f - s) * 1000:.0f} ms over {args.chunks} "
        f"chunks (all passes: files {', '.join(f'{x * 1000:.0f}' for x in files)} ms; segment "
        f"{', '.join(f'{x * 1000:.0f}' for x in segment)} ms).",
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

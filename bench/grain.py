"""Chunk grain: how many bytes of chunks a cold workload needs, by readahead window and chunk size.

Why: a profile can only fetch whole chunks, and the kernel asks for more than the
workload touches (its readahead window is also the read-around of a page fault in a
mapped file). What a cold start must move is the chunks covering what the kernel asks
for, so the grain decides the working set a replay streams. This bench measures it on
a real workload instead of guessing:

1. index the bench image (``bench/images.py``) into a scratch local store with 1 MiB
   chunks everywhere (``random_access_chunk_size`` = chunk size);
2. for each readahead window, mount it (plain FUSE, so every read reaches the daemon),
   log every FUSE read (inode, offset, size), drop the page cache and run the workload
   in a chroot of an overlay over the mount (as a container would);
3. count the pages the reads cover and, for each chunk-size policy, the chunks (and
   their bytes) covering those pages: one size for every file, or a smaller size for
   ELF files of at least a given size (what indexer/chunker.py does).

Prints a table; ``--write`` adds it to bench/RESULTS.md under "Chunk grain".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Chunk grain"
WINDOWS_KB = (32768, 1024, 512, 128, 0)
# (minimum file size for the small size, small size); (0, c): every file at c.
POLICIES = ((0, 1 << 20), (0, 256 << 10), (0, 64 << 10), (4 << 20, 64 << 10), (4 << 20, 128 << 10),
            (1 << 20, 64 << 10), (16 << 20, 64 << 10))
PY = "/opt/venv/bin/python3"

_SERVER = r'''
import json, os, signal, sys, time
import pyfuse3, trio
from cache.stores import open_store
from cache.blobtier import BlobTier
from cache.chain import ChunkChain
from cache.memory import MemoryTier
from cache.ssd import SSDTier
from imagefs.index_cache import load_index
from imagefs.fuse_ops import FuseOps
from imagefs.vfs import VFS
from imagefs.readahead import set_read_ahead_kb

store_dir, image, mp, ra, out, cache = sys.argv[1:7]
store = open_store(store_dir)
index = load_index(store, image, cache)
chain = ChunkChain(BlobTier(store), SSDTier(os.path.join(cache, "ssd"), 20 << 30), MemoryTier(2 << 30))
reads = []

class Ops(FuseOps):
    async def read(self, fh, off, size):
        reads.append((fh, off, size))
        return await super().read(fh, off, size)

pyfuse3.init(Ops(VFS(index, chain)), mp, {"fsname=imagefs-grain", "ro", "default_permissions", "allow_other"})

async def main():
    async with trio.open_nursery() as n:
        n.start_soon(pyfuse3.main)
        def ready():
            os.stat(mp)
            set_read_ahead_kb(mp, int(ra))
            print("ready", flush=True)
        await trio.to_thread.run_sync(ready)
        with trio.open_signal_receiver(signal.SIGTERM) as sigs:
            async for _ in sigs:
                pyfuse3.terminate()
                return

try:
    trio.run(main)
finally:
    pyfuse3.close(unmount=True)
    sizes = {}
    for ino in {r[0] for r in reads}:
        sizes[ino] = index.inode(ino).size
    json.dump({"reads": reads, "sizes": sizes}, open(out, "w"))
'''


def trace(repo: Path, store: str, image: str, rootfs_py: str, workload: str, ra_kb: int, work: Path) -> dict[str, Any]:
    """Mount with every read logged, run ``workload`` cold in a chroot; the reads."""
    mp = work / "mnt"
    mp.mkdir(exist_ok=True)
    out = work / f"reads-{ra_kb}.json"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    server = subprocess.Popen([sys.executable, "-c", _SERVER, store, image, str(mp), str(ra_kb), str(out),
                               str(work / "cache")], stdout=subprocess.PIPE, env=env)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError("the tracing mount did not come up")
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        script = (f'T=$(mktemp -d); mount -t tmpfs tmpfs $T; mkdir -p $T/u $T/w $T/m; '
                  f'mount -t overlay overlay -o lowerdir={mp},upperdir=$T/u,workdir=$T/w $T/m; '
                  f'mount -t proc proc $T/m/proc; mount --rbind /sys $T/m/sys; mount --rbind /dev $T/m/dev; '
                  f'chroot $T/m /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin {rootfs_py} -c "{workload}"')
        t0 = time.monotonic()
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], check=True)
        took = time.monotonic() - t0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    data = json.loads(out.read_text())
    data["seconds"] = took
    return data


def analyse(data: dict[str, Any], elf_sizes: dict[int, bool]) -> dict[str, Any]:
    sizes = {int(k): v for k, v in data["sizes"].items()}
    pages = {(ino, p) for ino, off, size in data["reads"] for p in range(off // 4096, (off + size + 4095) // 4096)}
    row: dict[str, Any] = {"reads": len(data["reads"]), "pages_mib": len(pages) * 4096 / 2**20, "policies": {}}
    for min_size, small in POLICIES:
        chunks = set()
        for ino, p in pages:
            cs = small if sizes[ino] >= min_size and (min_size == 0 or elf_sizes.get(ino)) else 1 << 20
            chunks.add((ino, p * 4096 // cs, cs))
        nbytes = sum(min(cs, sizes[ino] - i * cs) for ino, i, cs in chunks)
        row["policies"][f"{'ELF>=' + str(min_size >> 20) + 'M@' if min_size else 'all@'}{small >> 10}K"] = \
            {"chunks": len(chunks), "mib": round(nbytes / 2**20, 1)}
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench grain", description=__doc__.splitlines()[0])
    p.add_argument("--image", default="torch", help="bench image (default torch)")
    p.add_argument("--workload", default="import torch", help="Python code run by the image's python3")
    p.add_argument("--windows", default=",".join(map(str, WINDOWS_KB)), help="readahead windows, KiB")
    p.add_argument("--workdir", help="bench work directory (default $IMAGEFS_BENCH_DIR or /var/cache/imagefs-bench)")
    p.add_argument("--write", action="store_true", help="add the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench grain: needs root (mounts, chroot, drop_caches)", file=sys.stderr)
        return 2
    from bench import images as bench_images
    from cache.localstore import LocalStore
    from indexer.build import build_image
    from indexer.chunker import DEFAULT_CHUNK_SIZE

    repo = Path(__file__).resolve().parent.parent
    built = bench_images.ensure_images(args.workdir, (args.image,))[args.image]
    with tempfile.TemporaryDirectory(prefix="imagefs-grain-") as tmp:
        work = Path(tmp)
        store = str(work / "store")
        res = build_image(built.layout_zstd, LocalStore(store), "grain", random_access_chunk_size=DEFAULT_CHUNK_SIZE)
        from indexer.catalog import open_image

        index = open_image(LocalStore(store), "grain")
        rows = []
        for ra in (int(x) for x in args.windows.split(",")):
            data = trace(repo, store, "grain", PY, args.workload, ra, work)
            # Which of the read files are ELF: look at their first bytes in the image's rootfs.
            elf = {}
            for ino in {int(k) for k in data["sizes"]}:
                path = Path(built.rootfs) / index.path_of(ino).lstrip("/")
                try:
                    with open(path, "rb") as f:
                        elf[ino] = f.read(4) == b"\x7fELF"
                except OSError:
                    elf[ino] = False
            row = analyse(data, elf)
            row["window_kb"] = ra
            row["seconds"] = round(data["seconds"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        shutil.rmtree(work / "mnt", ignore_errors=True)
    names = list(rows[0]["policies"])
    table = ["| readahead KiB | FUSE reads | pages read MiB | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        table.append(f"| {r['window_kb']} | {r['reads']} | {r['pages_mib']:.1f} | " +
                     " | ".join(f"{r['policies'][n]['chunks']} / {r['policies'][n]['mib']}" for n in names) + " |")
    text = "\n".join(table)
    print(text)
    if args.write:
        cmd = "python -m bench grain " + " ".join(argv if argv is not None else sys.argv[1:])
        block = (f"### {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M} ({args.image}, `{args.workload}`)\n\n"
                 f"Command: `{cmd}`; machine: {os.cpu_count()} CPUs, Linux {platform.release()}; index built with "
                 f"1 MiB chunks everywhere ({res.chunks} chunks). Cells: chunks / MiB of chunks covering the pages the "
                 f"kernel asked for (`all@N`: every file in N chunks; `ELF>=S@N`: ELF files of S or more in N chunks, "
                 f"others 1 MiB).\n\n{text}\n")
        _append(block)
    return 0


def _append(block: str) -> None:
    text = RESULTS_MD.read_text()
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n`python -m bench grain` (bench/grain.py): what a cold workload " \
            "needs of an image at each readahead window and chunk-size policy (the choice in indexer/chunker.py " \
            "and the recording grain of startup profiles).\n"
    lines = text.splitlines()
    start = lines.index(SECTION)
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    new = lines[:end] + ["", *block.rstrip("\n").splitlines()] + ([""] + lines[end:] if end < len(lines) else [])
    RESULTS_MD.write_text("\n".join(new).rstrip("\n") + "\n")

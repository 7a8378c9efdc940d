"""Indexing: throughput, index size and open time, cross-image dedup, chunk size.

``python -m bench indexing [--workdir DIR] [--repeat N] [--skip-sweep] [--skip-level-sweep]`` indexes the
bench images (zstd layouts) into fresh local stores and reports, each beside a
baseline measured in the same run on the same layers (decompress and unpack them to
local disk with ``tar --zstd -x``, what a plain pull-and-unpack costs here):

* throughput in MB/s of uncompressed layer content (target >= 150 MB/s, 2 cores);
* index bytes per entry and index open time (target <= 20 ms for torch);
* what indexing torch after numpy stores, against the torch layer's own content;
* a chunk-size sweep on the numpy image (how the choice of chunk size was made);
* a zstd level sweep over the torch rootfs's bytes cut into 1 MiB chunks (how the
  chunk compression level was chosen: compression is most of the indexer's CPU).

Prints a markdown section; ``--write`` appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import zstandard

from bench.images import BenchImage, ensure_images
from cache.chunk import ZSTD_LEVEL
from cache.localstore import LocalStore
from indexer.build import BuildResult, build_image
from indexer.catalog import index_key, resolve
from indexer.index import Index

MB = 1_000_000
LEVEL_SAMPLE = 512 * MB  # bytes of the torch rootfs the level sweep compresses


def layer_blobs(layout_ref: str) -> list[str]:
    """Paths of a layout's layer blobs, bottom first."""
    path = layout_ref[len("oci:"):].rsplit(":", 1)[0]
    with open(os.path.join(path, "index.json")) as f:
        manifest_digest = json.load(f)["manifests"][0]["digest"]
    with open(os.path.join(path, "blobs", "sha256", manifest_digest.split(":")[1])) as f:
        manifest = json.load(f)
    return [os.path.join(path, "blobs", "sha256", l["digest"].split(":")[1]) for l in manifest["layers"]]


def warm_blobs(image: BenchImage) -> None:
    """Read every layer blob once, so each timed run (imagefs and baseline alike)
    starts with them in the page cache: other benches on this machine drop it, and a
    run that happened to follow a drop measured the disk, not the indexer."""
    for blob in layer_blobs(image.layout_zstd):
        with open(blob, "rb") as f:
            while f.read(8 << 20):
                pass


def unpack_baseline(image: BenchImage, scratch: str) -> float:
    """Seconds to decompress and unpack every layer to local disk with tar."""
    target = tempfile.mkdtemp(dir=scratch)
    start = time.monotonic()
    for blob in layer_blobs(image.layout_zstd):
        subprocess.run(["tar", "--zstd", "-xf", blob, "-C", target, "--numeric-owner"], check=True,
                       stderr=subprocess.DEVNULL)
    subprocess.run(["sync", "-f", target], check=True)
    elapsed = time.monotonic() - start
    shutil.rmtree(target)
    return elapsed


def index_once(image: BenchImage, store_dir: str, name: str, chunk_size: int = 1 << 20) -> BuildResult:
    return build_image(image.layout_zstd, LocalStore(store_dir), name, chunk_size=chunk_size)


def cpu_seconds() -> float:
    """User + system CPU of this process, all threads (the indexer runs in-process)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def open_time_ms(store_dir: str, name: str, n: int = 50) -> tuple[float, int, int]:
    store = LocalStore(store_dir)
    digest = resolve(store, name)
    blob = store.get(index_key(digest))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        ix = Index.from_blob(blob, digest)
        ix.inode(1)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, len(blob), ix.n_inodes


def pack_bytes(store_dir: str) -> int:
    packs = os.path.join(store_dir, "packs")
    return sum(os.path.getsize(os.path.join(packs, f)) for f in os.listdir(packs))


def rootfs_chunks(root: str, limit: int, chunk_size: int = 1 << 20) -> list[bytes]:
    """The first ``limit`` bytes of regular files under ``root`` in tree order, cut into
    chunks the way the indexer cuts them (each file on its own, 1 MiB pieces)."""
    chunks: list[bytes] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            path = os.path.join(dirpath, fn)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                while total < limit and (block := f.read(chunk_size)):
                    chunks.append(block)
                    total += len(block)
            if total >= limit:
                return chunks
    return chunks


def level_sweep(chunks: list[bytes], levels: tuple[int, ...], repeat: int) -> list[tuple[int, float, int]]:
    """(level, single-thread CPU MB/s, compressed bytes) per zstd level, levels
    interleaved within each repeat so that machine noise spreads over all of them."""
    cpu: dict[int, list[float]] = {lv: [] for lv in levels}
    out_bytes: dict[int, int] = {}
    content = sum(len(c) for c in chunks)
    for _ in range(repeat):
        for lv in levels:
            c = zstandard.ZstdCompressor(level=lv, write_content_size=True)
            t = time.thread_time()
            out_bytes[lv] = sum(len(c.compress(b)) for b in chunks)
            cpu[lv].append(time.thread_time() - t)
    return [(lv, content / MB / statistics.median(cpu[lv]), out_bytes[lv]) for lv in levels]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench indexing", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="bench image work dir (default: bench.images default)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (median reported)")
    ap.add_argument("--skip-sweep", action="store_true", help="skip the chunk-size sweep")
    ap.add_argument("--skip-level-sweep", action="store_true", help="skip the zstd level sweep")
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args(argv)

    images = ensure_images(args.workdir)
    scratch = tempfile.mkdtemp(prefix="imagefs-bench-index-", dir="/var/tmp")
    os.environ["XDG_CACHE_HOME"] = os.path.join(scratch, "xdg")  # no packtoc cache carried between runs
    lines: list[str] = []
    try:
        rows = []
        for name in ("numpy", "torch"):
            img = images[name]
            content = sum(img.layer_sizes)
            idx_s, base_s, cpu_s = [], [], []
            result = None
            for r in range(args.repeat):
                store_dir = os.path.join(scratch, f"{name}-{r}")
                warm_blobs(img)
                t, c = time.monotonic(), cpu_seconds()
                result = index_once(img, store_dir, name)
                idx_s.append(time.monotonic() - t)
                cpu_s.append(cpu_seconds() - c)
                warm_blobs(img)
                base_s.append(unpack_baseline(img, scratch))
                if r < args.repeat - 1:
                    shutil.rmtree(store_dir)
            assert result is not None
            open_ms, index_bytes, inodes = open_time_ms(os.path.join(scratch, f"{name}-{args.repeat - 1}"), name)
            rows.append((name, content, statistics.median(idx_s), statistics.median(base_s), result, open_ms, index_bytes,
                         statistics.median(cpu_s)))
            print(f"{name}: indexed {content / MB:.0f} MB in {statistics.median(idx_s):.2f} s; unpack {statistics.median(base_s):.2f} s", file=sys.stderr)

        # Torch after numpy, in one store: what the second image adds.
        dedup_dir = os.path.join(scratch, "dedup")
        index_once(images["numpy"], dedup_dir, "numpy")
        before = pack_bytes(dedup_dir)
        torch_after = index_once(images["torch"], dedup_dir, "torch")
        added = pack_bytes(dedup_dir) - before
        torch_layer = images["torch"].layer_sizes[-1]
        torch_layer_zstd = os.path.getsize(layer_blobs(images["torch"].layout_zstd)[-1])

        sweep = []
        if not args.skip_sweep:
            for cs in (256 << 10, 512 << 10, 1 << 20, 4 << 20):
                d = os.path.join(scratch, f"sweep-{cs}")
                t = time.monotonic()
                r = index_once(images["numpy"], d, "numpy", chunk_size=cs)
                sweep.append((cs, time.monotonic() - t, r))
                shutil.rmtree(d)
        levels: list[tuple[int, float, int]] = []
        sample = 0
        if not args.skip_level_sweep:
            chunks = rootfs_chunks(images["torch"].rootfs, LEVEL_SAMPLE)
            sample = sum(len(c) for c in chunks)
            levels = level_sweep(chunks, tuple(sorted({1, 2, 3, 4, ZSTD_LEVEL})), args.repeat)
            del chunks

        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines += [
            "## Indexing", "",
            f"`python -m bench indexing --repeat {args.repeat}{' --skip-sweep' if args.skip_sweep else ''}"
            f"{' --skip-level-sweep' if args.skip_level_sweep else ''}` on {when}; {platform.node()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}, chunks compressed at zstd level "
            f"{ZSTD_LEVEL}, local-directory store on the same disk. "
            "Baseline, same run, same layers: `tar --zstd -xf` of every layer to local disk (decompress + unpack). "
            "The layer blobs are read once before every timed run, of either (page cache warm). "
            "Content is uncompressed layer bytes; times are medians. `CPU` is the indexer's own user+system "
            "time (all threads); `CPU ceiling` = content / (CPU / 2): the throughput this much work allows on "
            "two otherwise idle cores, an upper bound (it assumes both stay busy) that does not depend on "
            f"what else the shared machine runs (load average at the end of this run: {os.getloadavg()[0]:.1f}).", "",
            "| image | entries | layer content | index time | index MB/s | CPU | CPU ceiling, 2 cores | unpack baseline | imagefs / baseline time | index size | bytes/entry | open |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, content, t_idx, t_base, result, open_ms, index_bytes, cpu in rows:
            lines.append(
                f"| {name} | {result.entries} | {content / MB:.0f} MB | {t_idx:.2f} s | {content / MB / t_idx:.0f} | "
                f"{cpu:.1f} s | {content / MB / (cpu / 2):.0f} | "
                f"{t_base:.2f} s ({content / MB / t_base:.0f} MB/s) | {t_idx / t_base:.2f}x | {index_bytes / 1024:.0f} KiB | "
                f"{index_bytes / result.entries:.0f} | {open_ms:.1f} ms |"
            )
        lines += [
            "",
            f"Torch indexed after numpy into the same store added {added / MB:.1f} MB of packs "
            f"({torch_after.new_chunks} new chunks, {torch_after.reused_chunks} reused); the torch layer alone is "
            f"{torch_layer / MB:.0f} MB uncompressed, {torch_layer_zstd / MB:.1f} MB as its zstd layer blob "
            f"({added / torch_layer_zstd:.2f}x the blob: chunks are compressed one by one).",
        ]
        if sweep:
            lines += [
                "", "Chunk size sweep (numpy image, one run each):", "",
                "| chunk size | chunks | stored | index size | index time |", "|---|---|---|---|---|",
            ]
            for cs, t, r in sweep:
                lines.append(f"| {cs >> 10} KiB | {r.chunks} | {r.stored_bytes / MB:.1f} MB | {r.index_bytes / 1024:.0f} KiB | {t:.2f} s |")
        if levels:
            base_bytes = {lv: b for lv, _, b in levels}[ZSTD_LEVEL]
            lines += [
                "", f"zstd level sweep ({sample / MB:.0f} MB of the torch rootfs in 1 MiB chunks, tree order; "
                f"one thread; median of {args.repeat}, levels interleaved):", "",
                "| level | compress MB/s (CPU, one thread) | stored | vs level in use |", "|---|---|---|---|",
            ]
            for lv, mbps, b in levels:
                mark = " (in use)" if lv == ZSTD_LEVEL else ""
                lines.append(f"| {lv}{mark} | {mbps:.0f} | {b / MB:.1f} MB ({sample / b:.2f}x) | "
                             f"{b / base_bytes:.3f}x bytes |")
        text = "\n".join(lines) + "\n"
        print(text)
        if args.write:
            with open(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "a") as f:
                f.write("\n" + text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

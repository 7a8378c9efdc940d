"""EROFS mounts: the warm read path through the kernel's EROFS vs the plain mount vs local disk.

Why this command exists (issue 11): a warm host is where imagefs lost to a C peer, and
per-file FUSE round trips are the floor of any pyfuse3 file system. ``--fs erofs`` has
the kernel answer all metadata from imagefs-written EROFS metadata and reads file data
from a FUSE-served virtual blob (imagefs/erofs). This bench puts the two ways of
mounting side by side, in the same run and interleaved with their baselines:

1. **Metadata**: what the EROFS metadata of the torch image costs to write from its
   index (slot map + writer, in-process), its size, the check of a kept copy, and
   ``imagefs mount`` until it returns, plain vs EROFS (EROFS with the metadata kept in
   the cache directory, and on a host that has to write it first).
2. ``import torch`` chrooted into the image (the wrapper of ``bench readpath``), SSD
   tier warm and page cache dropped, then hot: local disk, squashfuse (zstd), the
   plain imagefs mount and the EROFS mount, rotated each repeat. FUSE requests and
   tier bytes per run; once, the bytes of file pages resident after an SSD-warm
   import through EROFS (``fincore``), beside what the SSD tier read for it.
3. **Sequential read of 1 GiB**, SSD warm then hot: local disk, plain, EROFS.

The SSD tier is warmed by ``bench readpath``'s warm-up passes (plain mounts; chunks
are the same whichever way they are served). Inputs are ``bench readpath``'s (cached in
``WORK/readpath``). ``--write`` puts the section "EROFS mounts" into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import readpath as rp
from bench.images import ensure_images, resolve_workdir
from bench.scenarios import drop_caches

MiB = 1 << 20
SECTION = "## EROFS mounts"
FS = ("fuse", "erofs")


def log(msg: str) -> None:
    print(f"[erofs {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def serving(fs: str) -> Iterator[None]:
    """Every ``bench readpath`` mount inside serves the tree this way (``--fs``)."""
    saved = list(rp.MOUNT_ARGS)
    rp.MOUNT_ARGS[:] = [*saved, "--fs", fs]
    try:
        yield
    finally:
        rp.MOUNT_ARGS[:] = saved


# --------------------------------------------------------------------------- 1. metadata


@dataclass
class MetaResult:
    inodes: int = 0
    chunks: int = 0
    metadata_bytes: int = 0
    blob_bytes: int = 0
    build: rp.Series = field(default_factory=rp.Series)  # slot map + writer, seconds
    check: rp.Series = field(default_factory=rp.Series)  # reading and checking a kept copy
    mount: dict[str, rp.Series] = field(default_factory=dict)  # variant -> `imagefs mount` returned
    stats_fs: dict[str, Any] = field(default_factory=dict)


def bench_metadata(prep: rp.Prepared, scratch: rp.Scratch, repeat: int) -> MetaResult:
    from cache.localstore import LocalStore
    from indexer.erofs import writer
    from indexer.erofs.slots import SlotMap
    from indexer.catalog import open_image

    res = MetaResult()
    index = open_image(LocalStore(str(prep.store)), rp.TORCH_NAME)
    res.inodes, res.chunks = index.n_inodes, index.n_chunks
    image = b""
    for _ in range(repeat):
        t = time.perf_counter()
        slots = SlotMap.of_index(index)
        image = bytes(writer.build(index, slots))
        res.build.add(time.perf_counter() - t)
        t = time.perf_counter()
        writer.check(image, index.digest)
        res.check.add(time.perf_counter() - t)
    res.metadata_bytes, res.blob_bytes = len(image), slots.size
    mp = scratch.dir("mnt-meta")
    warm = [rp.IMAGEFS, "-q", "mount", rp.TORCH_NAME, str(mp), "--store", str(prep.store),
            "--cache-dir", str(scratch.dir("ssd-meta")), "--no-prefetch", "--fs", "erofs"]
    rp._run(warm, "imagefs mount", timeout=120)  # untimed: the metadata is kept from now on
    rp.imagefs_umount(mp)
    for rep in range(repeat):
        for variant, fs, fresh in (("plain", "fuse", False), ("EROFS, metadata kept", "erofs", False),
                                   ("EROFS, metadata written first", "erofs", True)):
            cache_dir = scratch.dir("ssd-meta")
            if fresh:
                for p in (cache_dir / "erofs").glob("*.erofs"):
                    p.unlink()
            argv = [rp.IMAGEFS, "-q", "mount", rp.TORCH_NAME, str(mp), "--store", str(prep.store),
                    "--cache-dir", str(cache_dir), "--no-prefetch", "--fs", fs]
            t = time.perf_counter()
            rp._run(argv, "imagefs mount", timeout=120)
            res.mount.setdefault(variant, rp.Series()).add(time.perf_counter() - t)
            if fs == "erofs" and not res.stats_fs:
                res.stats_fs = rp.imagefs_stats(mp).get("fs", {})
            rp.imagefs_umount(mp)
        log(f"mount {rep + 1}/{repeat}: " + ", ".join(f"{v} {s.samples[-1] * 1000:.0f} ms" for v, s in res.mount.items()))
    return res


# --------------------------------------------------------------------------- 2. import torch


@dataclass
class ImportResult:
    series: dict[str, rp.Series] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # "<fs> warm"/"<fs> hot" -> summary
    cpu: dict[str, list[float]] = field(default_factory=dict)
    warm_passes: list[rp.WarmPass] = field(default_factory=list)
    resident_bytes: int = 0  # file pages in the EROFS mount after one SSD-warm import
    resident_local: int = 0  # the same for the rootfs on local disk after a cold import
    ssd_bytes_for_resident: int = 0

    def add(self, key: str, seconds: float) -> None:
        self.series.setdefault(key, rp.Series()).add(seconds)


def resident_bytes(root: Path) -> int:
    """Bytes of file pages in the page cache for every regular file under ``root``."""
    files = [os.path.join(d, f) for d, _dirs, names in os.walk(root) for f in names
             if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))]
    total = 0
    for i in range(0, len(files), 500):
        out = subprocess.run(["fincore", "-b", "-n", "-r", "-o", "RES", *files[i: i + 500]],
                             capture_output=True, text=True).stdout
        total += sum(int(x) for x in out.split() if x.isdigit())
    return total


def bench_import(prep: rp.Prepared, scratch: rp.Scratch, repeat: int) -> ImportResult:
    res = ImportResult()
    mps = {fs: scratch.dir(f"mnt-torch-{fs}") for fs in FS}
    sq_mp = scratch.dir("mnt-squashfs")
    cache_dir = scratch.dir("ssd-torch")
    rootfs = Path(prep.torch.rootfs)
    with serving("fuse"):
        res.warm_passes = rp.warm_ssd(prep, rp.TORCH_NAME, mps["fuse"], cache_dir, rp.chroot_import, "import torch")
    rp.chroot_import(rootfs)  # the wrapper's own binaries and the rootfs once, untimed

    def local() -> dict[str, float]:
        drop_caches()
        return {"local disk cold": rp.chroot_import(rootfs), "local disk hot": rp.chroot_import(rootfs)}

    def squash() -> dict[str, float]:
        with rp.squashfuse_mounted(scratch, prep.squashfs, sq_mp):
            drop_caches()
            return {"squashfuse cold": rp.chroot_import(sq_mp), "squashfuse hot": rp.chroot_import(sq_mp)}

    def imagefs(fs: str) -> Callable[[], dict[str, float]]:
        def step() -> dict[str, float]:
            mp = mps[fs]
            with serving(fs), rp.mounted(prep, rp.TORCH_NAME, mp, cache_dir):
                run = rp.warm_then_hot(mp, lambda: rp.chroot_import(mp))
            res.stats.setdefault(f"{fs} warm", run.warm_stats)
            res.stats.setdefault(f"{fs} hot", run.hot_stats)
            res.cpu.setdefault(fs, []).append(run.daemon_cpu)
            return {f"imagefs {fs} SSD warm": run.warm, f"imagefs {fs} hot": run.hot}
        return step

    steps = [("local disk", local), ("squashfuse", squash), ("imagefs fuse", imagefs("fuse")),
             ("imagefs erofs", imagefs("erofs"))]
    for rep in range(repeat):
        k = rep % len(steps)
        for what, step in steps[k:] + steps[:k]:
            for key, seconds in rp.GUARD.run(f"import torch, {what}", step, 1).items():
                res.add(key, seconds)
        log(f"import torch {rep + 1}/{repeat} (s): " +
            ", ".join(f"{key} {s.samples[-1]:.2f}" for key, s in res.series.items()))
    # Once: which file pages an SSD-warm import leaves in the page cache, against what the
    # SSD tier read for it (through EROFS), and the same pages for local disk.
    mp = mps["erofs"]
    with serving("erofs"), rp.mounted(prep, rp.TORCH_NAME, mp, cache_dir):
        drop_caches()
        before = rp.imagefs_stats(mp)
        rp.chroot_import(mp)
        after = rp.imagefs_stats(mp)
        res.ssd_bytes_for_resident = (rp.tiers_from_stats(after).get("ssd", {}).get("bytes", 0)
                                      - rp.tiers_from_stats(before).get("ssd", {}).get("bytes", 0))
        res.resident_bytes = resident_bytes(mp)
    drop_caches()
    rp.chroot_import(rootfs)
    res.resident_local = resident_bytes(rootfs)
    return res


# --------------------------------------------------------------------------- 3. sequential read


@dataclass
class SeqResult:
    size: int
    series: dict[str, rp.Series] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)


def bench_seqread(prep: rp.Prepared, scratch: rp.Scratch, repeat: int) -> SeqResult:
    res = SeqResult(prep.big_size)
    mps = {fs: scratch.dir(f"mnt-big-{fs}") for fs in FS}
    cache_dir = scratch.dir("ssd-big")
    with serving("fuse"):
        rp.warm_ssd(prep, rp.BIG_NAME, mps["fuse"], cache_dir, lambda m: rp.read_file(m / rp.BIG_PATH), "seq read")

    def add(key: str, seconds: float) -> None:
        res.series.setdefault(key, rp.Series()).add(seconds)

    def local() -> None:
        def run() -> tuple[float, float]:
            drop_caches()
            return rp.read_file(prep.big_file), rp.read_file(prep.big_file)
        cold, hot = rp.GUARD.run("seq read, local", run, 1)
        add("local disk cold", cold)
        add("local disk hot", hot)

    def imagefs(fs: str) -> Callable[[], None]:
        def step() -> None:
            mp = mps[fs]

            def run() -> rp.WarmThenHot:
                with serving(fs), rp.mounted(prep, rp.BIG_NAME, mp, cache_dir):
                    return rp.warm_then_hot(mp, lambda: rp.read_file(mp / rp.BIG_PATH))
            out = rp.GUARD.run(f"seq read, {fs}", run, 1)
            add(f"imagefs {fs} SSD warm", out.warm)
            add(f"imagefs {fs} hot", out.hot)
            res.stats.setdefault(f"{fs} warm", out.warm_stats)
            res.cpu.setdefault(fs, []).append(out.daemon_cpu)
        return step

    steps = [local, imagefs("fuse"), imagefs("erofs")]
    for rep in range(repeat):
        k = rep % len(steps)
        for step in steps[k:] + steps[:k]:
            step()
        log(f"seq read {rep + 1}/{repeat} MB/s: " +
            ", ".join(f"{key} {prep.big_size / 1e6 / s.samples[-1]:,.0f}" for key, s in res.series.items()))
    return res


# --------------------------------------------------------------------------- report


def _fuse_ops(summary: dict[str, Any]) -> str:
    ops = {k.removeprefix("ops_"): v for k, v in (summary.get("fuse") or {}).items() if k.startswith("ops_") and v}
    total = sum(ops.values())
    return f"{total:,} ({', '.join(f'{k} {v:,}' for k, v in sorted(ops.items()))})" if ops else "0"


def _tier_mib(summary: dict[str, Any], tier: str) -> float:
    return float((summary.get("tiers") or {}).get(tier, {}).get("bytes", 0)) / MiB


def render(args: argparse.Namespace, meta: MetaResult | None, imp: ImportResult | None, seq: SeqResult | None,
           elapsed: float) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    u = platform.uname()
    lines = [SECTION, "",
             f"`{args.command_line}` on {when}, imagefs {args.commit}; {u.node}, {os.cpu_count()} cores (shared), "
             f"kernel {u.release}; run took {elapsed / 60:.1f} min. Medians of {args.repeat} interleaved repeats "
             "(p90 in brackets); \"SSD warm\" = chunks on the SSD tier, page cache dropped right before (after the "
             "mount); \"hot\" = the same again at once. imagefs defaults otherwise (1 MiB chunks, 512 MiB memory "
             "tier, background prefetch on). Code: bench/erofs.py.", ""]
    notes: list[str] = []
    if imp is not None:
        s = imp.series
        lc, lh = s["local disk cold"], s["local disk hot"]
        qc = s["squashfuse cold"]
        lines += ["| `import torch` | SSD warm, page cache dropped | vs local disk cold | vs squashfuse cold | hot "
                  "| vs local disk hot | FUSE requests, warm / hot |", "|---|---|---|---|---|---|---|"]
        lines.append(f"| local disk (ext4) | {rp._s(lc)} | 1.00x | {lc.median / qc.median:.2f}x | {rp._s(lh)} | 1.00x | – |")
        lines.append(f"| squashfuse (zstd) | {rp._s(qc)} | {qc.median / lc.median:.2f}x | 1.00x | "
                     f"{rp._s(s['squashfuse hot'])} | {s['squashfuse hot'].median / lh.median:.2f}x | – |")
        for fs in FS:
            w, h = s[f"imagefs {fs} SSD warm"], s[f"imagefs {fs} hot"]
            name = "imagefs, plain FUSE mount" if fs == "fuse" else "imagefs, EROFS mount"
            lines.append(f"| {name} | {rp._s(w)} | {w.median / lc.median:.2f}x | {w.median / qc.median:.2f}x | "
                         f"{rp._s(h)} | {h.median / lh.median:.2f}x | {_fuse_ops(imp.stats.get(f'{fs} warm', {}))} / "
                         f"{_fuse_ops(imp.stats.get(f'{fs} hot', {}))} |")
        lines.append("")
        for fs in FS:
            st = imp.stats.get(f"{fs} warm", {})
            notes.append(f"`import torch` through the {fs} mount, first repeat, SSD warm: SSD tier "
                         f"{_tier_mib(st, 'ssd'):,.0f} MiB, memory tier {_tier_mib(st, 'memory'):,.0f} MiB, store "
                         f"{_tier_mib(st, 'blob'):,.0f} MiB; daemon CPU per SSD-warm import: median "
                         f"{statistics.median(imp.cpu[fs]):.2f} s.")
        notes.append(f"File pages resident after one SSD-warm import through EROFS (`fincore` over the mount): "
                     f"{imp.resident_bytes / MiB:,.0f} MiB, for which the SSD tier read "
                     f"{imp.ssd_bytes_for_resident / MiB:,.0f} MiB ({imp.ssd_bytes_for_resident / max(1, imp.resident_bytes):.2f}x); "
                     f"the rootfs on local disk after a cold import: {imp.resident_local / MiB:,.0f} MiB resident.")
        notes.append("SSD warm-up (plain mounts, as `bench readpath`): " + rp._passes(imp.warm_passes) + ".")
    if seq is not None:
        s = seq.series
        lc, lh = s["local disk cold"], s["local disk hot"]
        lines += [f"| sequential read {seq.size / (1 << 30):g} GiB | SSD warm | vs local disk cold | hot | vs local disk hot |",
                  "|---|---|---|---|---|",
                  f"| local disk | {rp._mbps(lc, seq.size)} | 1.00x | {rp._mbps(lh, seq.size)} | 1.00x |"]
        for fs in FS:
            w, h = s[f"imagefs {fs} SSD warm"], s[f"imagefs {fs} hot"]
            lines.append(f"| imagefs {fs} | {rp._mbps(w, seq.size)} | {lc.median / w.median:.2f}x | "
                         f"{rp._mbps(h, seq.size)} | {lh.median / h.median:.2f}x |")
            notes.append(f"Sequential read through the {fs} mount, SSD warm: FUSE reads "
                         f"{_fuse_ops(seq.stats.get(f'{fs} warm', {}))}; daemon CPU median "
                         f"{statistics.median(seq.cpu[fs]):.2f} s.")
        lines.append("")
    if meta is not None:
        lines += ["| EROFS metadata of the torch image | figure |", "|---|---|",
                  f"| inodes / distinct chunks | {meta.inodes:,} / {meta.chunks:,} |",
                  f"| metadata size / blob address space | {meta.metadata_bytes / MiB:.1f} MiB / "
                  f"{meta.blob_bytes / (1 << 30):.2f} GiB |",
                  f"| written from the index (slot map + writer, in-process) | {rp._ms(meta.build)} |",
                  f"| a kept copy read and checked (blake3 of its body) | {rp._ms(meta.check)} |"]
        for variant, series in meta.mount.items():
            lines.append(f"| `imagefs mount` until it returns, {variant} | {rp._ms(series)} |")
        lines.append("")
        notes.append("The mount's own account of an EROFS mount (`imagefs stats`, `fs`): " +
                     json.dumps({k: v for k, v in meta.stats_fs.items() if k.endswith("_ms") or k.endswith("bytes")}) + ".")
    notes.append(f"Foreign page-cache drops retaken: {rp.GUARD.retries}; kept despite one: {rp.GUARD.gave_up}.")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench erofs", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--workdir", help="bench work dir (default: bench.images default)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved repeats (default 5)")
    ap.add_argument("--write", action="store_true", help="put the section into bench/RESULTS.md")
    ap.add_argument("--big-size", type=int, default=1024, metavar="MIB", help="size of the sequential-read file")
    ap.add_argument("--only", choices=("metadata", "import", "seqread"), action="append",
                    help="run only these parts (repeatable; default all)")
    args = ap.parse_args(argv)
    args.commit = rp._commit()
    args.command_line = " ".join(["python -m bench erofs", *(sys.argv[2:] if argv is None else argv)])
    if os.geteuid() != 0:
        print("bench erofs: needs root (drop_caches, mounts, chroot)", file=sys.stderr)
        return 2
    parts = set(args.only or ("metadata", "import", "seqread"))
    t0 = time.monotonic()
    images = ensure_images(args.workdir, ("torch",))
    prep = rp.prepare(resolve_workdir(args.workdir) / "readpath", images["torch"], args.big_size * MiB)
    scratch = rp.Scratch()
    os.environ[rp.AGENT_SOCKET_ENV] = str(scratch.root / "no-agent.sock")  # every mount spawns its daemon
    meta = imp = seq = None
    try:
        if "metadata" in parts:
            meta = bench_metadata(prep, scratch, args.repeat)
        if "import" in parts:
            imp = bench_import(prep, scratch, args.repeat)
        if "seqread" in parts:
            seq = bench_seqread(prep, scratch, args.repeat)
    finally:
        scratch.close()
    text = render(args, meta, imp, seq, time.monotonic() - t0)
    print(text)
    if args.write:
        rp.write_section(text)
        log(f"wrote the section to {rp.RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

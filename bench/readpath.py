"""Read path: mount time, sequential read of 1 GiB, ``import torch``, each beside a baseline.

Why this command exists: imagefs promises that once a chunk is on the host, reading
through the mount costs about what reading the same bytes from local disk costs, and
that a mount is ready in milliseconds. Those claims are about the read path alone
(FUSE, the Python daemon, the SSD tier, the page cache), not about networks, so this
bench measures them on local storage only, with every figure beside a baseline taken
in the same run on the same machine (the machine is shared and noisy: only ratios
carry over between runs):

1. **Mount time**: from spawning ``imagefs mount torch MP --store STORE`` to the first
   stat of a file inside the mount that the mount answers, seen from the parent (which
   polls every 0.5 ms). Baselines: ``python -c pass`` and ``python -c "import pyfuse3"``
   with the venv's interpreter (the floor of any process that serves FUSE from Python).
   If ``imagefs agent`` exists (a pre-imported host process that mounts fork from),
   mounts are measured with and without it.
2. **Sequential read of a 1 GiB file** of pseudo-random data (a one-layer OCI image
   built and indexed once): "SSD warm" = chunks in the SSD cache dir of a previous
   mount, page cache dropped, fresh daemon; "hot" = the same file read again. Baseline:
   the same bytes in a file on the local disk, cold (page cache dropped) and hot.
3. ``python3 -c "import torch"`` chrooted into the torch image, in a private mount
   namespace with /proc and /dev mounted (the same wrapper for every variant): imagefs
   with chunks on the SSD tier (warmed by imports through earlier mounts, see below)
   and page cache dropped, then hot; baselines the unpacked rootfs on local disk and
   squashfuse over a zstd squashfs of that rootfs, each cold and hot.

Variants are interleaved within each repeat so that machine noise spreads over all of
them. Other benches on this machine drop the page cache too, which silently turns a
"hot" figure cold: every measurement is checked against the ``drop_pagecache`` counter
of /proc/vmstat and taken again if someone else dropped meanwhile. "SSD warm" means
what it says: warm-up passes (through fresh mounts, each left to finish its background
prefetch and SSD write-behind) repeat until one reads nothing from the store, and each
pass is reported, since the write-behind may skip copies. ``imagefs stats`` counters
and the daemon's CPU time are recorded beside the timings, to say where time goes.
Mounts use this run's own agent socket, so an agent someone else runs never serves the
"without agent" figures. Prepared inputs (the local store with both images indexed,
the 1 GiB layout and file, the squashfs) are cached in ``WORK/readpath`` with stamps
of their inputs; every mount, cache dir and mountpoint of a run lives in a scratch dir
that is removed at the end, also on failure.

``python -m bench readpath [--repeat N] [--write] [--no-prefetch]`` prints a markdown
section; ``--write`` puts it in bench/RESULTS.md (replacing this command's earlier
section of the same title; ``--no-prefetch`` runs get a section of their own).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import pstats
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import zstandard

from bench.images import BenchImage, HashingFile, ensure_images, resolve_workdir
from bench.scenarios import (drop_caches, force_unmount, fuse_from_stats, is_mounted, stats_diff, stop_process,
                             tiers_from_stats)

REPO = Path(__file__).resolve().parent.parent
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python")
IMAGEFS = str(VENV_BIN / "imagefs")
SECTION = "## Read path"
PREP_VERSION = 1  # bump when a preparation step changes its output

MiB = 1 << 20
MB = 1_000_000
BIG_SEED = 20240601
BIG_PATH = "data/big.bin"  # inside the image
BIG_NAME = "readpath/big"
TORCH_NAME = "readpath/torch"
# Every imagefs command of a run talks to this run's own agent socket (in the scratch
# dir), so an agent someone else runs on the host never serves the "without" figures.
AGENT_SOCKET_ENV = "IMAGEFS_AGENT_SOCKET"
STAT_PROBE = "etc/os-release"  # the file whose first answered stat ends a mount
CHROOT_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_WARM_PASSES = 8
IMPORT_ARGV = ("/opt/venv/bin/python3", "-c", "import torch")


def log(msg: str) -> None:
    print(f"[readpath {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], what: str, timeout: float = 3600) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"{what} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-1500:]}")
    return res.stdout


# --------------------------------------------------------------------------- stamps


def layout_dir(ref: str) -> Path:
    """``oci:PATH:TAG`` -> PATH."""
    return Path(ref.removeprefix("oci:").rsplit(":", 1)[0])


def manifest_digest(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])


def code_hash(*packages: str) -> str:
    """Digest of the project's sources in ``packages``: an index built by other code is rebuilt."""
    h = hashlib.sha256()
    for pkg in packages:
        for p in sorted((REPO / pkg).rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _stamp_ok(stamp: Path, inputs: dict[str, Any], *outputs: Path) -> bool:
    try:
        return json.loads(stamp.read_text()).get("inputs") == inputs and all(p.exists() for p in outputs)
    except (OSError, ValueError):
        return False


def _stamp(stamp: Path, inputs: dict[str, Any], seconds: float) -> None:
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps({"inputs": inputs, "seconds": round(seconds, 1),
                               "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    tmp.replace(stamp)


# --------------------------------------------------------------------------- the 1 GiB image


def write_big_file(path: Path, size: int, seed: int = BIG_SEED) -> None:
    """``size`` bytes of seeded pseudo-random data (zstd cannot shrink it, as with
    weights or compressed media); the same seed gives the same bytes."""
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(rng.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _put_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":")[1]).write_bytes(data)
    return digest, len(data)


def write_one_file_layout(layout: Path, src: Path, name_in_image: str) -> None:
    """An OCI image layout (tag ``latest``) whose one zstd layer holds ``src`` at
    ``name_in_image``. The tar is streamed through zstd, so a GiB never sits in memory."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tmp_layer = blobs / "layer.tmp"
    with open(tmp_layer, "wb") as raw:
        compressed = HashingFile(raw)
        zw = zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(compressed, closefd=False)
        plain = HashingFile(zw)
        with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            parts = name_in_image.split("/")
            for i in range(1, len(parts)):
                d = tarfile.TarInfo("/".join(parts[:i]))
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tar.addfile(d)
            ti = tarfile.TarInfo(name_in_image)
            ti.size, ti.mode, ti.mtime = src.stat().st_size, 0o644, 1_700_000_000
            with open(src, "rb") as f:
                tar.addfile(ti, f)
        zw.close()
    layer_digest = compressed.digest
    tmp_layer.rename(blobs / layer_digest.split(":")[1])
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [plain.digest]},
              "history": [{"created_by": "bench readpath: one file of pseudo-random data"}]}
    cfg_digest, cfg_size = _put_blob(blobs, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": layer_digest,
                    "size": compressed.size}],
    }
    man_digest, man_size = _put_blob(blobs, json.dumps(manifest, sort_keys=True).encode())
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_digest,
                       "size": man_size, "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
    }, sort_keys=True))


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class Prepared:
    store: Path
    big_file: Path  # the baseline copy on local disk
    big_size: int
    squashfs: Path
    torch: BenchImage


def prepare(work: Path, torch: BenchImage, big_size: int) -> Prepared:
    """Build or reuse: the 1 GiB file and its layout, both images indexed into a local
    store (re-indexed when the indexer's source changes), the torch squashfs."""
    work.mkdir(parents=True, exist_ok=True)
    big_dir = work / "big"
    big_file = big_dir / "big.bin"
    big_layout = big_dir / "layout"
    big_inputs = {"size": big_size, "seed": BIG_SEED, "path": BIG_PATH, "prep": PREP_VERSION}
    stamp = big_dir / "big.stamp.json"
    if not _stamp_ok(stamp, big_inputs, big_file, big_layout / "index.json"):
        log(f"preparing: {big_size / MiB:.0f} MiB pseudo-random file and its one-layer OCI layout")
        t = time.monotonic()
        shutil.rmtree(big_dir, ignore_errors=True)
        big_dir.mkdir(parents=True)
        write_big_file(big_file, big_size)
        tmp_layout = big_dir / "layout.tmp"
        write_one_file_layout(tmp_layout, big_file, BIG_PATH)
        tmp_layout.rename(big_layout)
        _stamp(stamp, big_inputs, time.monotonic() - t)

    store = work / "store"
    code = code_hash("indexer", "cache")
    for name, ref in ((BIG_NAME, f"oci:{big_layout}:latest"), (TORCH_NAME, torch.layout_zstd)):
        inputs = {"manifest": manifest_digest(layout_dir(ref)), "code": code, "prep": PREP_VERSION}
        stamp = work / f"index-{name.replace('/', '-')}.stamp.json"
        if not _stamp_ok(stamp, inputs, store / "refs" / name):
            log(f"preparing: imagefs index {ref} --name {name}")
            t = time.monotonic()
            _run([IMAGEFS, "-q", "index", ref, "--store", str(store), "--name", name], f"imagefs index {name}")
            _stamp(stamp, inputs, time.monotonic() - t)

    sqfs = work / "torch.sqfs"
    inputs = {"manifest": manifest_digest(layout_dir(torch.layout_zstd)), "comp": "zstd", "prep": PREP_VERSION}
    stamp = work / "torch.sqfs.stamp.json"
    if not _stamp_ok(stamp, inputs, sqfs):
        log("preparing: mksquashfs of the torch rootfs (zstd)")
        t = time.monotonic()
        tmp = work / "torch.sqfs.tmp"
        tmp.unlink(missing_ok=True)
        _run(["mksquashfs", torch.rootfs, str(tmp), "-comp", "zstd", "-noappend", "-no-progress", "-quiet"],
             "mksquashfs torch")
        tmp.replace(sqfs)
        _stamp(stamp, inputs, time.monotonic() - t)
    return Prepared(store, big_file, big_size, sqfs, torch)


# --------------------------------------------------------------------------- other processes' drops


def drop_count() -> int:
    """How often anyone on this machine has dropped the page cache (``/proc/vmstat``)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("drop_pagecache "):
            return int(line.split()[1])
    return 0


T = TypeVar("T")


class DropGuard:
    """Measures again when someone else dropped the page cache during a measurement.

    The machine is shared and other benches drop caches too; a "hot" figure taken
    across a foreign drop is a cold one. Each step declares how many drops it makes
    itself; more than that in /proc/vmstat means the step is repeated (up to a bound).
    """

    def __init__(self, tries: int = 5) -> None:
        self.tries = tries
        self.retries = 0
        self.gave_up = 0

    def run(self, what: str, step: Callable[[], T], own_drops: int) -> T:
        for _ in range(self.tries):
            before = drop_count()
            out = step()
            if drop_count() - before <= own_drops:
                return out
            self.retries += 1
            log(f"{what}: another process dropped the page cache meanwhile; measuring again")
        self.gave_up += 1
        return out


GUARD = DropGuard()


# --------------------------------------------------------------------------- mounts


class Scratch:
    """Mountpoints and cache dirs of one run; ``close`` undoes every mount made in it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="imagefs-readpath-", dir="/var/tmp"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def dir(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def mounts(self) -> list[str]:
        """Mountpoints inside the scratch dir, deepest first (read from /proc, never the
        paths themselves, so a dead mount cannot hang this)."""
        prefix = str(self.root) + "/"
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp.startswith(prefix):
                found.append(mp)
        return sorted(set(found), key=lambda p: -p.count("/"))

    def close(self) -> None:
        for mp in self.mounts():
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run([IMAGEFS, "-q", "umount", mp], capture_output=True, timeout=60)
            force_unmount(Path(mp))
        for proc in self.procs:
            stop_process(proc)
        still = self.mounts()
        if still:
            log(f"leaving {self.root} in place: still mounted: {', '.join(still)}")
            return
        shutil.rmtree(self.root, ignore_errors=True)


# Extra arguments for every `imagefs mount` of the run (``--no-prefetch``), set by main.
MOUNT_ARGS: list[str] = []
PROFILE = True  # also profile one SSD-warm run of each workload (``--no-profile`` turns it off)


def mount_argv(prep: Prepared, image: str, mp: Path, cache_dir: Path) -> list[str]:
    return [IMAGEFS, "-q", "mount", image, str(mp), "--store", str(prep.store), "--cache-dir", str(cache_dir),
            *MOUNT_ARGS]


def imagefs_mount(prep: Prepared, image: str, mp: Path, cache_dir: Path) -> None:
    _run(mount_argv(prep, image, mp, cache_dir), f"imagefs mount {image}", timeout=120)


def imagefs_umount(mp: Path) -> None:
    try:
        _run([IMAGEFS, "-q", "umount", str(mp)], "imagefs umount", timeout=120)
    finally:
        force_unmount(mp)


def imagefs_stats(mp: Path) -> dict[str, Any]:
    return dict(json.loads(_run([IMAGEFS, "stats", "--json", str(mp)], "imagefs stats", timeout=30)))


@contextlib.contextmanager
def mounted(prep: Prepared, image: str, mp: Path, cache_dir: Path) -> Iterator[Path]:
    imagefs_mount(prep, image, mp, cache_dir)
    try:
        yield mp
    finally:
        imagefs_umount(mp)


@contextlib.contextmanager
def squashfuse_mounted(scratch: Scratch, sqfs: Path, mp: Path) -> Iterator[Path]:
    logf = open(scratch.root / "squashfuse.log", "ab")
    proc = subprocess.Popen(["squashfuse", "-f", str(sqfs), str(mp)], stdin=subprocess.DEVNULL, stdout=logf,
                            stderr=logf, start_new_session=True)
    scratch.procs.append(proc)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mp):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"squashfuse did not mount {sqfs} (see {logf.name})")
            time.sleep(0.005)
        os.stat(mp / STAT_PROBE)
        yield mp
    finally:
        force_unmount(mp)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        logf.close()


def read_ahead_kb(path: Path) -> int | None:
    """The readahead window of the device (or FUSE superblock) holding ``path``."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for p in (f"/sys/class/bdi/{dev}/read_ahead_kb", f"/sys/dev/block/{dev}/queue/read_ahead_kb",
              f"/sys/dev/block/{dev}/../queue/read_ahead_kb"):
        with contextlib.suppress(OSError, ValueError):
            return int(Path(p).read_text().strip())
    return None


@dataclass(frozen=True)
class WarmPass:
    seconds: float  # the workload, through the mount
    store_bytes: int  # what the whole pass (workload + background prefetch) read from the store
    fills_skipped: int  # SSD copies the write-behind skipped (queue over its bound)
    prefetched: int  # chunks the background prefetch brought


def settle(mp: Path, timeout: float = 300.0) -> dict[str, Any]:
    """The daemon's stats once its background work is done: no prefetch progress, no
    store reads and no pending SSD fills over three polls 0.5 s apart (or ``timeout``)."""
    def key(st: dict[str, Any]) -> tuple[int, int, int]:
        cache = st.get("cache") or {}
        blob = tiers_from_stats(st).get("blob", {})
        return int(cache.get("prefetched", 0)), int(blob.get("requests", 0)), int(cache.get("fill_pending", 0))

    deadline = time.monotonic() + timeout
    last = imagefs_stats(mp)
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
        now = imagefs_stats(mp)
        quiet = quiet + 1 if key(now) == key(last) and key(now)[2] == 0 else 0
        last = now
    return last


def warm_ssd(prep: Prepared, image: str, mp: Path, cache_dir: Path, workload: Callable[[Path], float],
             what: str) -> list[WarmPass]:
    """Put what ``workload`` reads on the SSD tier in ``cache_dir``: run it through a fresh
    mount, let the daemon finish its background work, unmount; again until a pass reads
    nothing from the store (the write-behind skips SSD copies while its queue is over its
    bound, so one pass may not be enough). Every pass is returned, to be reported."""
    passes: list[WarmPass] = []
    for attempt in range(1, MAX_WARM_PASSES + 1):
        with mounted(prep, image, mp, cache_dir):
            drop_caches()
            t = workload(mp)
            stats = settle(mp)
        cache = stats.get("cache") or {}
        p = WarmPass(t, tiers_from_stats(stats).get("blob", {}).get("bytes", 0), int(cache.get("fill_dropped", 0)),
                     int(cache.get("prefetched", 0)))
        passes.append(p)
        log(f"{what}: warm-up pass {attempt}: workload {t:.2f} s; {p.store_bytes / MiB:,.0f} MiB from the store, "
            f"{p.prefetched} chunks prefetched, {p.fills_skipped} SSD fills skipped")
        if p.store_bytes == 0:
            break
    return passes


def _passes(passes: Sequence[WarmPass]) -> str:
    return "; ".join(f"pass {i}: workload {p.seconds:.2f} s, {p.store_bytes / MiB:,.0f} MiB from the store, "
                     f"{p.prefetched} chunks prefetched, {p.fills_skipped} SSD fills skipped"
                     for i, p in enumerate(passes, 1))


SMALL_READ_AHEAD_KB = 128  # the kernel's default window
PROFILE_TOP = 6


@dataclass(frozen=True)
class Profile:
    """Where the daemon's trio thread spent a workload: cProfile's own time per function."""

    seconds: float  # the workload under the profiler (slower than unprofiled)
    total: float  # profiled seconds of the daemon's main thread
    top: list[tuple[str, int, float]]  # (function, calls, own seconds), largest first


def _label(func: tuple[str, int, str]) -> str:
    file, _line, name = func
    if file == "~":
        return name.strip("<>").replace("method ", "").replace(" objects", "").replace("' of '", " of ").replace("'", "")
    for root in (str(REPO) + "/", "site-packages/"):
        if root in file:
            file = file.split(root, 1)[1]
    return f"{file}:{name}"


def profile_daemon(prep: Prepared, scratch: Scratch, image: str, mp: Path, cache_dir: Path, probe: str,
                   workload: Callable[[Path], float]) -> Profile:
    """Run ``workload`` once, page cache dropped, through a foreground mount whose process
    runs under cProfile (which sees the trio thread: FUSE dispatch, VFS, chain; worker
    threads' SSD reads and hashing show up there as waiting)."""
    prof = scratch.root / f"{image.replace('/', '-')}.prof"
    logf = open(scratch.root / "profile.log", "ab")
    argv = [PYTHON, "-m", "cProfile", "-o", str(prof), IMAGEFS, "-q", "mount", "-f", image, str(mp),
            "--store", str(prep.store), "--cache-dir", str(cache_dir), *MOUNT_ARGS]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    scratch.procs.append(proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                os.stat(mp / probe)
                break
            except FileNotFoundError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"profiled mount of {image} did not answer (see {logf.name})") from None
                time.sleep(0.01)
        drop_caches()
        seconds = workload(mp)
    finally:
        force_unmount(mp)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        logf.close()
    st = pstats.Stats(str(prof))
    entries = st.stats  # type: ignore[attr-defined]
    rows = sorted(((_label(f), int(v[1]), float(v[2])) for f, v in entries.items()), key=lambda r: -r[2])
    return Profile(seconds, float(st.total_tt), rows[:PROFILE_TOP])  # type: ignore[attr-defined]


def _profile_line(what: str, p: Profile | None) -> str | None:
    if p is None:
        return None
    parts = ", ".join(f"{name} {sec / p.total:.0%} ({calls:,} calls)" for name, calls, sec in p.top)
    return (f"{what}, daemon main thread under cProfile (one SSD-warm run, {p.seconds:.2f} s when profiled; own "
            f"time as a share of the daemon's {p.total:.2f} s profiled life, startup included; epoll = waiting "
            f"for the kernel or worker threads): {parts}.")


def set_read_ahead(mp: Path, kb: int | None) -> None:
    """Set the readahead window of the filesystem mounted at ``mp`` (its sysfs bdi)."""
    if kb is None:
        return
    st = os.stat(mp)
    Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb").write_text(f"{kb}\n")


# --------------------------------------------------------------------------- statistics


@dataclass
class Series:
    """Repeated measurements of one figure (seconds); throughput is derived from them."""

    samples: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> float:
        self.samples.append(seconds)
        return seconds

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        """Nearest-rank 90th percentile (the slow tail; with 5 samples, the slowest)."""
        s = sorted(self.samples)
        return s[max(0, math.ceil(0.9 * len(s)) - 1)]


def _ms(s: Series) -> str:
    return f"{s.median * 1000:.0f} ms (p90 {s.p90 * 1000:.0f})"


def _s(s: Series) -> str:
    return f"{s.median:.2f} s (p90 {s.p90:.2f})"


def _mbps(s: Series, size: int) -> str:
    return f"{size / MB / s.median:,.0f} MB/s (p90 {size / MB / s.p90:,.0f})"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


# --------------------------------------------------------------------------- 1. mount time


def _timed(argv: Sequence[str]) -> float:
    t = time.perf_counter()
    subprocess.run(list(argv), check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def timed_mount(prep: Prepared, image: str, mp: Path, cache_dir: Path,
                env: dict[str, str]) -> tuple[float, float]:
    """(seconds to the first answered stat of a file in the mount, seconds until
    ``imagefs mount`` returned), both from just before the spawn; leaves it mounted."""
    probe = mp / STAT_PROBE
    argv = mount_argv(prep, image, mp, cache_dir)
    full_env = {**os.environ, **env}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=full_env)
    first: float | None = None
    exited: float | None = None
    while first is None or exited is None:
        if first is None:
            try:
                os.stat(probe)
                first = time.perf_counter() - t0
            except FileNotFoundError:
                pass
        if exited is None and proc.poll() is not None:
            exited = time.perf_counter() - t0
            if proc.returncode:
                raise RuntimeError(f"imagefs mount failed: {proc.stderr.read().decode(errors='replace') if proc.stderr else ''}")
        if first is None or exited is None:
            if time.perf_counter() - t0 > 60:
                raise RuntimeError("imagefs mount: no answer within 60 s")
            time.sleep(0.0005)
    return first, exited


def _answers(sock: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(sock)
        except OSError:
            return False
    return True


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def blake3_mbps() -> tuple[float, float]:
    """MB/s of blake3 over 1 MiB buffers here: one thread, and as the chunk verifier
    hashes chunks of >= 1 MiB (``max_threads=AUTO``). The verification cost floor."""
    import blake3

    data = random.Random(1).randbytes(MiB)
    out = []
    for threads in (1, blake3.blake3.AUTO):
        t = time.perf_counter()
        for _ in range(100):
            blake3.blake3(data, max_threads=threads).digest()
        out.append(100 * MiB / MB / (time.perf_counter() - t))
    return out[0], out[1]


def agent_available() -> bool:
    res = subprocess.run([IMAGEFS, "agent", "--help"], capture_output=True)
    return res.returncode == 0


@contextlib.contextmanager
def agent_running(scratch: Scratch) -> Iterator[int]:
    """``imagefs agent`` for the duration; stopped (SIGTERM to the pid started here) after."""
    logf = open(scratch.root / "agent.log", "ab")
    proc = subprocess.Popen([IMAGEFS, "agent"], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                            start_new_session=True)
    scratch.procs.append(proc)
    sock = os.environ[AGENT_SOCKET_ENV]
    try:
        deadline = time.monotonic() + 30
        while not _answers(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"imagefs agent did not listen on {sock} (see {logf.name})")
            time.sleep(0.02)
        yield proc.pid
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        logf.close()


@dataclass
class MountResult:
    py_pass: Series = field(default_factory=Series)
    py_pyfuse3: Series = field(default_factory=Series)
    cli_help: Series = field(default_factory=Series)  # `imagefs mount --help`: the CLI's own start
    stat: dict[str, Series] = field(default_factory=dict)  # variant -> first answered stat
    returned: dict[str, Series] = field(default_factory=dict)  # variant -> `imagefs mount` returned
    agent: str = ""  # "", or why it was not measured
    by_agent: int = 0  # measured "with agent" mounts whose daemon the agent forked


def bench_mount(prep: Prepared, scratch: Scratch, repeat: int) -> MountResult:
    res = MountResult()
    mp = scratch.dir("mnt-mount")
    cache_dir = scratch.dir("ssd-mount")
    have_agent = agent_available()
    if not have_agent:
        res.agent = "`imagefs agent` does not exist in this checkout: measured without it only"
    agent_sock = os.environ[AGENT_SOCKET_ENV]
    no_agent_sock = str(scratch.root / "no-agent.sock")  # never created: mounts spawn a daemon

    def measure(agent_pid: int | None) -> tuple[float, float, float, dict[str, tuple[float, float, bool]]]:
        a = _timed([PYTHON, "-c", "pass"])
        b = _timed([PYTHON, "-c", "import pyfuse3"])
        c = _timed([IMAGEFS, "mount", "--help"])
        got: dict[str, tuple[float, float, bool]] = {}
        for variant, sock in (("without agent", no_agent_sock), ("with agent", agent_sock)):
            if variant == "with agent" and agent_pid is None:
                continue
            first, returned = timed_mount(prep, TORCH_NAME, mp, cache_dir, {AGENT_SOCKET_ENV: sock})
            forked = agent_pid is not None and _ppid(int(imagefs_stats(mp)["pid"])) == agent_pid
            imagefs_umount(mp)
            got[variant] = (first, returned, forked)
        return a, b, c, got

    def one(record: bool, agent_pid: int | None) -> None:
        a, b, c, got = GUARD.run("mount", lambda: measure(agent_pid), 0)
        if not record:
            return
        res.py_pass.add(a)
        res.py_pyfuse3.add(b)
        res.cli_help.add(c)
        for variant, (first, returned, forked) in got.items():
            res.stat.setdefault(variant, Series()).add(first)
            res.returned.setdefault(variant, Series()).add(returned)
            if variant == "with agent":
                res.by_agent += forked
        log(f"mount: python -c pass {a * 1000:.0f} ms, import pyfuse3 {b * 1000:.0f} ms, "
            f"imagefs mount --help {c * 1000:.0f} ms; mount -> stat " +
            ", ".join(f"{v} {f * 1000:.0f} ms (returned {r * 1000:.0f}{', agent forked it' if k else ''})"
                      for v, (f, r, k) in got.items()))

    ctx: contextlib.AbstractContextManager[int | None] = (
        agent_running(scratch) if have_agent else contextlib.nullcontext(None))
    with ctx as agent_pid:
        one(False, agent_pid)  # warm-up: page cache holds the interpreter and imagefs
        for _ in range(repeat):
            one(True, agent_pid)
    return res


# --------------------------------------------------------------------------- 2. sequential read


def read_file(path: Path) -> float:
    """Seconds to read ``path`` start to end with 1 MiB reads."""
    buf = bytearray(MiB)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


@dataclass
class SeqResult:
    size: int
    local_cold: Series = field(default_factory=Series)
    local_hot: Series = field(default_factory=Series)
    ssd_warm: Series = field(default_factory=Series)
    hot: Series = field(default_factory=Series)
    ra_mount: int | None = None
    ra_local: int | None = None
    warm_passes: list[WarmPass] = field(default_factory=list)
    daemon_cpu: list[float] = field(default_factory=list)  # daemon CPU seconds per SSD-warm read
    hot_small_ra: list[float] = field(default_factory=list)  # a hot read with read_ahead_kb=128
    profile: Profile | None = None
    blake3: tuple[float, float] = (0.0, 0.0)  # MB/s, one thread and AUTO
    warm_stats: dict[str, Any] = field(default_factory=dict)  # tier diff of one SSD-warm read
    hot_stats: dict[str, Any] = field(default_factory=dict)


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    return {"tiers": tiers_from_stats(stats), "fuse": fuse_from_stats(stats)}


@dataclass(frozen=True)
class WarmThenHot:
    """One SSD-warm run of a workload through a fresh mount, then the same run hot."""

    warm: float  # seconds, page cache dropped first
    hot: float  # seconds, right after
    daemon_cpu: float  # the daemon's CPU seconds during the warm run
    warm_stats: dict[str, Any]  # tier and FUSE counters of the warm run
    hot_stats: dict[str, Any]


def warm_then_hot(mp: Path, workload: Callable[[], float]) -> WarmThenHot:
    """Drop the page cache, run ``workload`` through the mount at ``mp`` (SSD warm), then
    again (hot), with the daemon's CPU and counters for each: the measurement the
    sequential-read and import benches share."""
    drop_caches()
    s0 = imagefs_stats(mp)
    pid = int(s0["pid"])
    cpu0 = cpu_seconds(pid)
    warm = workload()
    cpu = cpu_seconds(pid) - cpu0
    s1 = imagefs_stats(mp)
    hot = workload()
    s2 = imagefs_stats(mp)
    return WarmThenHot(warm, hot, cpu, _summary(stats_diff(s1, s0)), _summary(stats_diff(s2, s1)))


def bench_seqread(prep: Prepared, scratch: Scratch, repeat: int) -> SeqResult:
    res = SeqResult(prep.big_size)
    mp = scratch.dir("mnt-big")
    cache_dir = scratch.dir("ssd-big")
    target = mp / BIG_PATH
    res.ra_local = read_ahead_kb(prep.big_file)
    res.blake3 = blake3_mbps()
    res.warm_passes = warm_ssd(prep, BIG_NAME, mp, cache_dir, lambda m: read_file(m / BIG_PATH), "seq read")
    def local() -> tuple[float, float]:
        drop_caches()
        return read_file(prep.big_file), read_file(prep.big_file)

    def imagefs() -> WarmThenHot:
        with mounted(prep, BIG_NAME, mp, cache_dir):
            res.ra_mount = read_ahead_kb(mp)
            run = warm_then_hot(mp, lambda: read_file(target))
            if not res.hot_small_ra:  # once: does the 32 MiB window cost anything when hot?
                ra = read_ahead_kb(mp)
                set_read_ahead(mp, SMALL_READ_AHEAD_KB)
                res.hot_small_ra.append(read_file(target))
                set_read_ahead(mp, ra)
        return run

    def run_local() -> None:
        cold, hot = GUARD.run("seq read, local", local, 1)
        res.local_cold.add(cold)
        res.local_hot.add(hot)

    def run_imagefs() -> None:
        run = GUARD.run("seq read, imagefs", imagefs, 1)
        res.ssd_warm.add(run.warm)
        res.hot.add(run.hot)
        res.daemon_cpu.append(run.daemon_cpu)
        if not res.warm_stats:
            res.warm_stats, res.hot_stats = run.warm_stats, run.hot_stats

    for rep in range(repeat):
        steps: list[Callable[[], None]] = [run_local, run_imagefs]
        for step in steps if rep % 2 == 0 else steps[::-1]:  # alternate which goes first
            step()
        mbs = [f"{prep.big_size / MB / x.samples[-1]:,.0f}" for x in (res.local_cold, res.local_hot, res.ssd_warm, res.hot)]
        log(f"seq read {rep + 1}/{repeat} MB/s: local cold {mbs[0]}, local hot {mbs[1]}, "
            f"imagefs SSD warm {mbs[2]}, imagefs hot {mbs[3]}")
    if PROFILE:
        res.profile = profile_daemon(prep, scratch, BIG_NAME, mp, cache_dir, BIG_PATH, lambda m: read_file(m / BIG_PATH))
    return res


# --------------------------------------------------------------------------- 3. import torch


def chroot_import(root: Path) -> float:
    """Seconds for ``python3 -c "import torch"`` chrooted into ``root``, in a private
    mount namespace with /proc and /dev mounted there (so nothing leaks out)."""
    script = ('mount -t proc proc "$1/proc" && mount --bind /dev "$1/dev" && '
              'exec chroot "$1" /usr/bin/env -i PATH="$2" HOME=/root LANG=C.UTF-8 "$3" "$4" "$5"')
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(root), CHROOT_PATH,
            *IMPORT_ARGV]
    t = time.perf_counter()
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t
    if res.returncode:
        raise RuntimeError(f"import torch in {root} failed ({res.returncode}): {res.stderr.strip()[-1500:]}")
    return elapsed


@dataclass
class ImportResult:
    series: dict[str, Series] = field(default_factory=dict)  # "local cold", "imagefs hot", ...
    warm_stats: dict[str, Any] = field(default_factory=dict)
    hot_stats: dict[str, Any] = field(default_factory=dict)
    warm_passes: list[WarmPass] = field(default_factory=list)
    daemon_cpu: list[float] = field(default_factory=list)  # daemon CPU seconds per SSD-warm import
    profile: Profile | None = None

    def add(self, key: str, seconds: float) -> float:
        return self.series.setdefault(key, Series()).add(seconds)


CPU_KEY = "daemon cpu"


def bench_import(prep: Prepared, scratch: Scratch, repeat: int) -> ImportResult:
    res = ImportResult()
    mp = scratch.dir("mnt-torch")
    sq_mp = scratch.dir("mnt-squashfs")
    cache_dir = scratch.dir("ssd-torch")
    rootfs = Path(prep.torch.rootfs)
    res.warm_passes = warm_ssd(prep, TORCH_NAME, mp, cache_dir, chroot_import, "import torch")
    chroot_import(rootfs)  # the wrapper's own binaries and the rootfs once, untimed

    def local() -> dict[str, float]:
        drop_caches()
        return {"local cold": chroot_import(rootfs), "local hot": chroot_import(rootfs)}

    def squash() -> dict[str, float]:
        with squashfuse_mounted(scratch, prep.squashfs, sq_mp):
            drop_caches()
            return {"squashfuse cold": chroot_import(sq_mp), "squashfuse hot": chroot_import(sq_mp)}

    def imagefs() -> dict[str, float]:
        with mounted(prep, TORCH_NAME, mp, cache_dir):
            run = warm_then_hot(mp, lambda: chroot_import(mp))
        if not res.warm_stats:
            res.warm_stats, res.hot_stats = run.warm_stats, run.hot_stats
        return {"imagefs SSD warm": run.warm, "imagefs hot": run.hot, CPU_KEY: run.daemon_cpu}

    steps: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("local disk", local), ("squashfuse", squash), ("imagefs", imagefs)]
    for rep in range(repeat):
        for what, step in steps[rep % 3:] + steps[:rep % 3]:  # rotate: noise spreads over every variant
            for key, seconds in GUARD.run(f"import torch, {what}", step, 1).items():
                if key == CPU_KEY:
                    res.daemon_cpu.append(seconds)
                else:
                    res.add(key, seconds)
        last = {k: f"{v.samples[-1]:.2f}" for k, v in res.series.items()}
        log(f"import torch {rep + 1}/{repeat} (s): " + ", ".join(f"{k} {v}" for k, v in last.items()))
    if PROFILE:
        res.profile = profile_daemon(prep, scratch, TORCH_NAME, mp, cache_dir, STAT_PROBE, chroot_import)
    return res


# --------------------------------------------------------------------------- report


def _tiers_line(summary: dict[str, Any]) -> str:
    tiers = summary.get("tiers", {})
    parts = [f"{name} {t['requests']} req / {t['hits']} hits / {t['bytes'] / MiB:,.1f} MiB"
             for name, t in tiers.items() if t.get("requests") or t.get("bytes")]
    fuse = summary.get("fuse", {})
    ops = ", ".join(f"{k.removeprefix('ops_')} {v}" for k, v in sorted(fuse.items()) if v)
    return ("tiers: " + ("; ".join(parts) or "none asked")) + (f"; FUSE ops: {ops}" if ops else "")


def _commit() -> str:
    """The checkout's commit, with "+changes" if imagefs, indexer or cache differ from it."""
    try:
        rev = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], "git rev-parse").strip()
        dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--", "imagefs", "indexer", "cache"],
                     "git status").strip()
    except (OSError, RuntimeError):
        return "(unknown commit)"
    return rev + ("+changes" if dirty else "")


def render(args: argparse.Namespace, prep: Prepared, mount: MountResult | None, seq: SeqResult | None,
           imp: ImportResult | None, elapsed: float) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    uname = platform.uname()
    lines = [
        section_title(), "",
        f"`{args.command_line}` on {when}, imagefs {args.commit}; {uname.node}, {os.cpu_count()} cores "
        f"(shared), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB RAM, "
        f"kernel {uname.release}, Python {platform.python_version()}; run took {elapsed / 60:.1f} min. "
        "Store: a local directory on the same disk as the baselines; imagefs defaults otherwise "
        "(1 MiB chunks, 512 MiB memory tier, 10 GiB SSD tier, background prefetch into the SSD tier "
        f"{'off: --no-prefetch' if '--no-prefetch' in MOUNT_ARGS else 'on'}; plain FUSE mounts, `--fs fuse`: "
        "`python -m bench erofs` measures EROFS mounts). Every figure is a median over the repeats with its "
        "p90 (nearest rank: with 5 repeats, the worst), and sits beside a baseline measured in the same run, "
        "interleaved with it; ratios are of medians. \"Cold\" = `sync; echo 3 > /proc/sys/vm/drop_caches` "
        "right before the measurement (after the mount). Code: bench/readpath.py.", "",
        "| figure | imagefs | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    if mount is not None:
        interp = mount.py_pass.median
        base = (f"`python -c pass` {_ms(mount.py_pass)}; `python -c \"import pyfuse3\"` {_ms(mount.py_pyfuse3)}; "
                f"`imagefs mount --help` {_ms(mount.cli_help)}")
        for variant, s in mount.stat.items():
            over = s.median - interp
            lines.append(
                f"| mount torch -> first answered stat, {variant} | {_ms(s)} | {base} | "
                f"+{over * 1000:.0f} ms over interpreter start ({s.median / interp:.1f}x) | <= +50 ms | "
                f"{_met(over <= 0.050)} |")
        notes.append("Mount: from spawning `imagefs -q mount IMAGE MP --store DIR --cache-dir DIR` to the first "
                     f"`stat(MP/{STAT_PROBE})` the mount answers (the parent polls every 0.5 ms); `imagefs mount` "
                     "returned after " + ", ".join(f"{_ms(s)} ({v})" for v, s in mount.returned.items()) +
                     ". `imagefs mount --help` is the CLI's own start (interpreter + imagefs.cli + imagefs.mount "
                     "imports), which every mount pays in the calling process, agent or not.")
        if mount.agent:
            notes.append(mount.agent + ".")
        elif "with agent" in mount.stat:
            n = len(mount.stat["with agent"].samples)
            notes.append(f"With agent: an `imagefs agent` started for this run (own socket); {mount.by_agent} of {n} "
                         "measured mounts were served by a daemon it forked (checked by the daemon's parent pid). "
                         "Without agent: the same command pointed at a socket that does not exist, so it spawns "
                         "`python -m imagefs.daemon`; the two are interleaved.")
    if seq is not None:
        r_warm = seq.local_cold.median / seq.ssd_warm.median
        r_hot = seq.local_hot.median / seq.hot.median
        gib = f"{seq.size / (1 << 30):g} GiB" if seq.size >= 1 << 30 else f"{seq.size / MiB:g} MiB"
        lines.append(f"| sequential read {gib}, SSD tier warm, page cache dropped | {_mbps(seq.ssd_warm, seq.size)} | "
                     f"local disk cold {_mbps(seq.local_cold, seq.size)} | {r_warm:.2f}x | >= 0.8x | {_met(r_warm >= 0.8)} |")
        lines.append(f"| sequential read {gib}, hot (page cache) | {_mbps(seq.hot, seq.size)} | "
                     f"local disk hot {_mbps(seq.local_hot, seq.size)} | {r_hot:.2f}x | >= 0.9x | {_met(r_hot >= 0.9)} |")
        small = (f" One extra hot read through the mount with read_ahead_kb set to {SMALL_READ_AHEAD_KB}: "
                 f"{seq.size / MB / seq.hot_small_ra[0]:,.0f} MB/s." if seq.hot_small_ra else "")
        notes.append(f"read_ahead_kb in effect: imagefs mount {seq.ra_mount}, local disk {seq.ra_local}.{small} "
                     "Reads are 1 MiB `readinto` calls from Python over pseudo-random data (zstd cannot shrink it).")
        notes.append("SSD tier warm-up (the file read through a fresh mount, the daemon left to finish its "
                     "background work, unmounted; repeated until a pass reads nothing from the store): "
                     f"{_passes(seq.warm_passes)}.")
        notes.append(f"Sequential read, first repeat, SSD warm: {_tiers_line(seq.warm_stats)}.")
        cpu = statistics.median(seq.daemon_cpu)
        notes.append(f"Daemon CPU during an SSD-warm read of the file: median {cpu:.2f} s user+system over "
                     f"{seq.ssd_warm.median:.2f} s wall ({cpu / seq.ssd_warm.median:.0%} of one core; 2 cores here). "
                     f"blake3 (verifying every SSD hit) over 1 MiB buffers in this run: {seq.blake3[0]:,.0f} MB/s on "
                     f"one thread, {seq.blake3[1]:,.0f} MB/s with max_threads=AUTO (as the verifier runs it).")
        notes.append(f"Sequential read, first repeat, hot: {_tiers_line(seq.hot_stats)}.")
        line = _profile_line("Sequential read", seq.profile)
        if line:
            notes.append(line)
    if imp is not None:
        s = imp.series
        lc, lh = s["local cold"], s["local hot"]
        qc, qh = s["squashfuse cold"], s["squashfuse hot"]
        ic, ih = s["imagefs SSD warm"], s["imagefs hot"]
        r_c, r_q, r_h = ic.median / lc.median, ic.median / qc.median, ih.median / lh.median
        lines.append(f"| `import torch`, SSD tier warm, page cache dropped | {_s(ic)} | local disk cold {_s(lc)} | "
                     f"{r_c:.2f}x | <= 1.2x | {_met(r_c <= 1.2)} |")
        lines.append(f"| `import torch`, SSD tier warm, page cache dropped | {_s(ic)} | squashfuse (zstd) cold {_s(qc)} | "
                     f"{r_q:.2f}x | < 1.0x | {_met(r_q < 1.0)} |")
        lines.append(f"| `import torch`, hot | {_s(ih)} | local disk hot {_s(lh)} | {r_h:.2f}x | <= 1.05x | "
                     f"{_met(r_h <= 1.05)} |")
        lines.append(f"| `import torch`, hot | {_s(ih)} | squashfuse (zstd) hot {_s(qh)} | {ih.median / qh.median:.2f}x "
                     "| (peer) | |")
        notes.append("`import torch` = `unshare -m` + mount /proc and bind /dev in the root + `chroot ROOT "
                     "/opt/venv/bin/python3 -c \"import torch\"`, timed from the parent (same wrapper for every "
                     "root; includes interpreter start). SSD tier warm-up (one import through a fresh mount, the "
                     "daemon left to finish its background work, unmounted; repeated until a pass reads nothing "
                     f"from the store): {_passes(imp.warm_passes)}.")
        notes.append(f"`import torch`, first repeat, SSD warm: {_tiers_line(imp.warm_stats)}; daemon CPU per "
                     f"SSD-warm import: median {statistics.median(imp.daemon_cpu):.2f} s.")
        notes.append(f"`import torch`, first repeat, hot: {_tiers_line(imp.hot_stats)}.")
        line = _profile_line("`import torch`", imp.profile)
        if line:
            notes.append(line)
    notes.append(f"Other benches on this machine drop the page cache too: a measurement "
                 f"during which a foreign drop happened (the `drop_pagecache` counter in /proc/vmstat) was taken "
                 f"again: {GUARD.retries} retakes; {GUARD.gave_up} kept despite a drop after {GUARD.tries} tries.")
    lines.append("")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def section_title() -> str:
    return SECTION + (" (--no-prefetch)" if "--no-prefetch" in MOUNT_ARGS else "")


def write_section(text: str, path: Path = RESULTS_MD) -> None:
    """Put ``text`` in ``path``: in place of an earlier section of the same title (this
    command's own), else appended; every other section is left as it is."""
    title = text.splitlines()[0]
    old = path.read_text() if path.exists() else "# Results\n"
    start = old.find(title + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(title))
        rest = old[nxt + 1:] if nxt >= 0 else ""
        new = old[:start] + text + ("\n" + rest if rest else "")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench readpath", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--workdir", help="bench work dir (default: bench.images default); inputs cached in WORK/readpath")
    ap.add_argument("--repeat", type=int, default=5, help="repeats of every measurement (median and p90; default 5)")
    ap.add_argument("--write", action="store_true", help="put the section into bench/RESULTS.md")
    ap.add_argument("--big-size", type=int, default=1024, metavar="MIB", help="size of the sequential-read file (MiB)")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="pass --no-prefetch to every imagefs mount (no background prefetch into the SSD tier)")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the cProfile run of the daemon (one SSD-warm run of each workload)")
    ap.add_argument("--only", choices=("mount", "seqread", "import"), action="append",
                    help="run only these parts (repeatable; default all)")
    args = ap.parse_args(argv)
    args.commit = _commit()  # before the run: others commit while it runs
    args.command_line = " ".join(["python -m bench readpath", *(sys.argv[2:] if argv is None else argv)])
    if os.geteuid() != 0:
        print("bench readpath: needs root (drop_caches, FUSE, chroot, unshare)", file=sys.stderr)
        return 2
    global PROFILE
    PROFILE = not args.no_profile
    if args.no_prefetch:
        MOUNT_ARGS.append("--no-prefetch")
    # The read path of the plain FUSE mount (its floor is `bench fusefloor`); EROFS mounts,
    # the default where the kernel has them, are measured by `bench erofs`.
    MOUNT_ARGS += ["--fs", "fuse"]
    parts = set(args.only or ("mount", "seqread", "import"))
    t_start = time.monotonic()
    images = ensure_images(args.workdir, ("torch",))
    prep = prepare(resolve_workdir(args.workdir) / "readpath", images["torch"], args.big_size * MiB)
    scratch = Scratch()
    os.environ[AGENT_SOCKET_ENV] = str(scratch.root / "agent.sock")
    mount = seq = imp = None
    try:
        if "mount" in parts:
            mount = bench_mount(prep, scratch, args.repeat)
        if "seqread" in parts:
            seq = bench_seqread(prep, scratch, args.repeat)
        if "import" in parts:
            imp = bench_import(prep, scratch, args.repeat)
    finally:
        scratch.close()
    text = render(args, prep, mount, seq, imp, time.monotonic() - t_start)
    print(text)
    if args.write:
        write_section(text)
        log(f"wrote the section to {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

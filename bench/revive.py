"""Mount daemon crashes: what a supervised mount costs, and how long readers pause when its server is killed.

Why this command exists (issue 12, "no dead mounts"): as root a mount's daemon is a
supervisor holding the FUSE connection plus the server it forks (imagefs/supervisor.py),
and a killed server is replaced. Two figures, each beside its baseline from the same run:

1. ``imagefs mount`` (with an agent) until it returns and a first stat is answered,
   supervised vs served in one process (``IMAGEFS_SUPERVISE=0``, what every mount was
   before), interleaved, plain FUSE and EROFS.
2. Reader threads read every file of the image again and again, each read past the page
   cache (``posix_fadvise(DONTNEED)``) and checked byte for byte, while the mount's server
   is killed with SIGKILL ``--kills`` times: the pause is the longest time between two
   completed reads around each kill, beside the same measure over as long a stretch
   without a kill; errors and wrong bytes are counted (the target is 0 and 0).

The image is synthetic (``--files`` small files and a few larger ones), built in
process into a local store, so the figures are about the mount, not the store.
``--write`` puts the section "Mount daemon crashes" into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import readpath as rp

REPO = Path(__file__).resolve().parent.parent
IMAGEFS = [sys.executable, "-m", "imagefs"]


def build(root: Path, n_small: int) -> dict[str, bytes]:
    """Index a synthetic image into ``root/store`` as ``revive``; its files by path."""
    from cache.localstore import LocalStore
    from indexer.build import build_image
    from indexer.sources import ImageSource
    from indexer.sources.blobs import Layer

    files = {f"usr/lib/d{i % 40}/f{i}": random.Random(i).randbytes(3000 + i % 5000) for i in range(n_small)}
    files |= {f"data/big{i}": random.Random(10_000 + i).randbytes(2 << 20) for i in range(4)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    import hashlib

    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    layer = Layer(digest=digest, size=len(raw), media_type="application/vnd.oci.image.layer.v1.tar",
                  opener=lambda: io.BytesIO(raw), source="bench:revive", diff_id=digest)
    config = {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": [digest]}}
    src = ImageSource("bench:revive", "sha256:" + "0" * 64, config, [layer])
    build_image(src, LocalStore(str(root / "store")), "revive")
    return files


class Agent:
    def __init__(self, root: Path, name: str, supervise: bool) -> None:
        self.env = {**os.environ, "IMAGEFS_RUN_DIR": str(root / f"run-{name}"),
                    "IMAGEFS_AGENT_SOCKET": str(root / f"{name}.sock"), "IMAGEFS_SUPERVISE": "1" if supervise else "0"}
        self.proc = subprocess.Popen([*IMAGEFS, "agent"], env=self.env, cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.env["IMAGEFS_AGENT_SOCKET"]):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the {name} agent did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def mount(root: Path, agent: Agent, mp: Path, fs: str, cache: str) -> float:
    """Seconds from spawning ``imagefs mount`` to a first answered stat."""
    mp.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([*IMAGEFS, "-q", "mount", "revive", str(mp), "--store", str(root / "store"), "--cache-dir",
                    str(root / cache), "--fs", fs, "--no-prefetch"], env=agent.env, check=True, cwd=REPO)
    os.stat(mp / "usr/lib/d1/f1")
    return time.perf_counter() - t0


def umount(agent: Agent, mp: Path) -> None:
    subprocess.run([*IMAGEFS, "umount", str(mp)], env=agent.env, check=True, cwd=REPO)


def bench_mount(root: Path, agents: dict[str, Agent], repeat: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    names = list(agents)
    for r in range(repeat):
        for fs in ("fuse", "erofs"):
            for name in names if r % 2 == 0 else names[::-1]:
                mp = root / f"mnt-{name}-{fs}"
                out.setdefault(f"{name} {fs}", []).append(mount(root, agents[name], mp, fs, f"cache-{name}"))
                umount(agents[name], mp)
    return out


class Readers:
    def __init__(self, mp: Path, files: dict[str, bytes], n: int = 2) -> None:
        self.mp, self.files = mp, files
        self.done: list[float] = []  # perf_counter of every completed read
        self.errors = self.wrong = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def __enter__(self) -> "Readers":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _run(self, i: int) -> None:
        names = list(self.files)
        random.Random(i).shuffle(names)
        while not self._stop.is_set():
            for name in names:
                if self._stop.is_set():
                    return
                try:
                    with open(self.mp / name, "rb") as f:
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                        ok = f.read() == self.files[name]
                    with self._lock:
                        self.done.append(time.perf_counter())
                        self.wrong += not ok
                except OSError:
                    with self._lock:
                        self.errors += 1

    def longest_gap(self, start: float, end: float) -> float:
        with self._lock:
            times = [t for t in self.done if start <= t <= end]
        times = [start, *times, end]
        return max(b - a for a, b in zip(times, times[1:]))


def bench_kills(root: Path, agent: Agent, files: dict[str, bytes], kills: int, fs: str) -> dict[str, Any]:
    from imagefs.mount import query_stats

    mp = root / f"mnt-kill-{fs}"
    mount(root, agent, mp, fs, "cache-kill")
    os.environ["IMAGEFS_RUN_DIR"] = agent.env["IMAGEFS_RUN_DIR"]
    pauses, quiet = [], []
    try:
        with Readers(mp, files) as readers:
            time.sleep(1.0)
            for _ in range(kills):
                t0 = time.perf_counter()
                time.sleep(1.5)
                quiet.append(readers.longest_gap(t0, time.perf_counter()))  # as long a stretch, no kill
                t1 = time.perf_counter()
                os.kill(int(query_stats(str(mp))["server_pid"]), signal.SIGKILL)
                time.sleep(1.5)
                pauses.append(readers.longest_gap(t1, time.perf_counter()))
            stats = query_stats(str(mp))
        return {"fs": fs, "pauses": pauses, "quiet": quiet, "reads": len(readers.done), "errors": readers.errors,
                "wrong": readers.wrong, "restarts": stats["restarts"]}
    finally:
        umount(agent, mp)


def _ms(xs: Sequence[float]) -> str:
    xs = sorted(xs)
    return f"{statistics.median(xs) * 1000:.1f} ms (p90 {xs[max(0, -(-len(xs) * 9 // 10) - 1)] * 1000:.1f})"


def render(args: argparse.Namespace, mounts: dict[str, list[float]], kills: list[dict[str, Any]], took: float) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["## Mount daemon crashes", "",
             f"`{args.command_line}` on {when}, imagefs {args.commit}; {platform.machine()}, {os.cpu_count()} cores "
             f"(shared), kernel {platform.release()}, Python {platform.python_version()}; run took {took / 60:.1f} min. "
             f"A synthetic image of {args.files} small files and 4 x 2 MiB in a local store; mounts forked from an "
             "`imagefs agent`, no SSD prefetch. Code: bench/revive.py.", "",
             "| figure | supervised | baseline (same run) | ratio |", "|---|---|---|---|"]
    for fs in ("fuse", "erofs"):
        sup, one = mounts[f"supervised {fs}"], mounts[f"one-process {fs}"]
        lines.append(f"| `imagefs mount` until a first stat answers, {fs} | {_ms(sup)} | one process "
                     f"(IMAGEFS_SUPERVISE=0) {_ms(one)} | +{(statistics.median(sup) - statistics.median(one)) * 1000:.1f} ms |")
    for k in kills:
        later = ", ".join(f"{p * 1000:.0f}" for p in k["pauses"][1:])
        lines.append(f"| longest pause of readers around a SIGKILL of the server, {k['fs']} | first kill "
                     f"{k['pauses'][0] * 1000:.1f} ms; later kills (with back-off) {later or '-'} ms | same stretch "
                     f"without a kill {_ms(k['quiet'])} | |")
    lines += [""]
    for k in kills:
        lines.append(f"- {k['fs']}: {len(k['pauses'])} kills, {k['restarts']} restarts, {k['reads']} reads checked "
                     f"byte for byte: {k['errors']} errors, {k['wrong']} wrong. The first kill is answered at once, "
                     "later ones within 5 minutes after a back-off (0.5, 1, 2 ... s): part of each later pause.")
    lines.append(f"- Mount: {args.repeat} interleaved repeats per row; a mount is `imagefs -q mount` from spawn to "
                 "return, then one stat.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench revive", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15, help="interleaved mount repeats (default 15)")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs of the server per way of serving (default 3)")
    ap.add_argument("--files", type=int, default=2000, help="small files in the image (default 2000)")
    ap.add_argument("--write", action="store_true", help="put the section into bench/RESULTS.md")
    args = ap.parse_args(argv)
    args.commit = rp._commit()
    args.command_line = " ".join(["python -m bench revive", *(sys.argv[2:] if argv is None else argv)])
    if os.geteuid() != 0:
        print("bench revive: needs root (mounts)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-revive-") as tmp:
        root = Path(tmp)
        files = build(root, args.files)
        agents = {"supervised": Agent(root, "supervised", True), "one-process": Agent(root, "one-process", False)}
        try:
            mounts = bench_mount(root, agents, args.repeat)
            kills = [bench_kills(root, agents["supervised"], files, args.kills, fs) for fs in ("fuse", "erofs")]
        finally:
            for a in agents.values():
                a.stop()
    text = render(args, mounts, kills, time.monotonic() - t0)
    print(text)
    print(json.dumps({"mounts": mounts, "kills": kills}), file=sys.stderr)
    if args.write:
        rp.write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

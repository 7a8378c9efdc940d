"""Store garbage collection: what ``imagefs gc`` leaves after ``imagefs rm`` of torch, and gc during an index.

``python -m bench gc [--workdir DIR] [--skip-s3] [--write]``, two parts:

1. **Shrink** (local directory stores). The baseline is a store that only ever held numpy.
   A second store gets numpy, then torch (which reuses numpy's chunks); torch's name is
   removed (``imagefs rm``) and the store collected (``imagefs gc``, timed, after a dry
   run whose prediction is checked). Reported: the store's bytes before and after, and
   after / baseline (issue 12 target: within 2%). Then numpy is mounted from the collected
   store and compared with its rootfs on local disk, every entry (type, mode, owner, size,
   symlink target, every byte of every file).
2. **Concurrent** (SeaweedFS in a network namespace of its own, ``gc-bench``). numpy and
   torch indexed, torch's name removed; then a real ``imagefs index`` of torch (under another
   name) runs while ``imagefs gc`` runs back to back in the same store until the index
   exits, then once more. Reported: how many collections overlapped the build, what they
   condemned, deferred and restored, and a check of the new image: every pack it names
   present and every one of its chunks read back and verified against its digest.

Prints a markdown section; ``--write`` appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.images import BenchImage, ensure_images

NS = "gc-bench"
MB = 1_000_000


def store_bytes(store: Any) -> int:
    from cache.blobstore import list_sizes

    return sum(size for prefix in ("indexes/", "profiles/", "packs/", "packtoc/", "gc/", "refs/", "leases/")
               for _k, size in list_sizes(store, prefix))


def compare_trees(mounted: str, reference: str) -> tuple[int, int, list[str]]:
    """(entries, file bytes, differences) of ``mounted`` against ``reference``."""
    entries = nbytes = 0
    diffs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(reference):
        rel = os.path.relpath(dirpath, reference)
        other = os.path.join(mounted, rel) if rel != "." else mounted
        got = set(os.listdir(other))
        want = set(dirnames) | set(filenames)
        if got != want:
            diffs.append(f"{rel}: listing differs ({sorted(got ^ want)[:5]})")
        dirnames.sort()
        for name in sorted(want & got):
            a, b = os.path.join(dirpath, name), os.path.join(other, name)
            sa, sb = os.lstat(a), os.lstat(b)
            entries += 1
            if (stat.S_IFMT(sa.st_mode), stat.S_IMODE(sa.st_mode), sa.st_uid, sa.st_gid) != (
                    stat.S_IFMT(sb.st_mode), stat.S_IMODE(sb.st_mode), sb.st_uid, sb.st_gid):
                diffs.append(f"{rel}/{name}: mode or owner differs")
            elif stat.S_ISLNK(sa.st_mode):
                if os.readlink(a) != os.readlink(b):
                    diffs.append(f"{rel}/{name}: symlink target differs")
            elif stat.S_ISREG(sa.st_mode):
                if sa.st_size != sb.st_size:
                    diffs.append(f"{rel}/{name}: size differs")
                    continue
                with open(a, "rb") as fa, open(b, "rb") as fb:
                    while True:
                        x, y = fa.read(1 << 20), fb.read(1 << 20)
                        if x != y:
                            diffs.append(f"{rel}/{name}: bytes differ")
                            break
                        if not x:
                            break
                        nbytes += len(x)
    return entries, nbytes, diffs


def shrink(images: dict[str, BenchImage], scratch: str) -> dict[str, Any]:
    from cache.localstore import LocalStore
    from imagefs.mount import MountOptions, start_mount, unmount
    from indexer import catalog
    from indexer.build import build_image
    from indexer.gc import collect

    alone = LocalStore(os.path.join(scratch, "numpy-alone"))
    build_image(images["numpy"].layout_zstd, alone, "numpy")
    both = LocalStore(os.path.join(scratch, "numpy-torch"))
    build_image(images["numpy"].layout_zstd, both, "numpy")
    build_image(images["torch"].layout_zstd, both, "torch")
    before = store_bytes(both)
    catalog.remove_ref(both, "torch")
    dry = collect(both, dry_run=True)
    t = time.monotonic()
    report = collect(both)
    gc_s = time.monotonic() - t
    after, baseline = store_bytes(both), store_bytes(alone)

    os.environ["IMAGEFS_RUN_DIR"] = os.path.join(scratch, "run")
    mnt = os.path.join(scratch, "mnt")
    os.makedirs(mnt)
    opts = MountOptions(store=both.root, cache_size=0, prefetch=False, replay=False)
    start_mount("numpy", mnt, opts)
    try:
        t = time.monotonic()
        entries, nbytes, diffs = compare_trees(mnt, str(images["numpy"].rootfs))
        compare_s = time.monotonic() - t
    finally:
        unmount(mnt)
    return {"before": before, "after": after, "baseline": baseline, "ratio": after / baseline, "gc_s": gc_s,
            "dry_freed": dry.freed_bytes, "freed": report.freed_bytes,
            "freed_by_kind": {k: [f.count, f.bytes] for k, f in report.freed.items()},
            "entries": entries, "bytes_compared": nbytes, "diffs": diffs, "compare_s": compare_s}


# -- part 2: inside the namespace -------------------------------------------------------


def concurrent_inner(endpoint: str, numpy_ref: str, torch_ref: str, out: str) -> int:
    """(runs inside the namespace) index, rm, index again while gc loops; JSON to ``out``."""
    from cache.chunk import open_chunk
    from cache.s3store import S3Store
    from cache.stream import plan_spans
    from bench.services import S3_BUCKET, s3_env
    from indexer import catalog
    from indexer.build import build_image
    from indexer.gc import collect
    from indexer.leases import live_lease_keys

    os.environ.update(s3_env())
    prefix = f"gc-{int(time.time())}"
    store = S3Store(S3_BUCKET, prefix, endpoint_url=endpoint)
    build_image(numpy_ref, store, "numpy")
    build_image(torch_ref, store, "torch")
    catalog.remove_ref(store, "torch")
    env = {**os.environ, "IMAGEFS_S3_ENDPOINT": endpoint}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "imagefs", "-q", "index", torch_ref, "--name", "torch2", "--json",
                             "--store", f"s3://{S3_BUCKET}/{prefix}"], env=env, stdout=subprocess.PIPE)
    while proc.poll() is None and not live_lease_keys(store):
        time.sleep(0.01)
    runs, overlapped, condemned, deferred, freed, restored = 0, 0, 0, 0, 0, 0
    while proc.poll() is None or runs == 0:
        r = collect(store)
        runs += 1
        overlapped += bool(r.waiting_for)
        deferred = max(deferred, r.deferred.count)
        freed += r.freed_bytes
        restored += r.restored
    stdout, _ = proc.communicate(timeout=600)
    build_s = time.monotonic() - t0
    result = json.loads(stdout)
    final = collect(store)
    restored += final.restored
    index = catalog.open_image(store, "torch2")
    present = set(store.list("packs/"))
    missing = [k for k in index.pack_keys() if k not in present]
    refs = list(index.all_chunks())
    bad = 0
    t = time.monotonic()
    if not missing:
        for span in plan_spans(refs, max_range=16 << 20, max_gap=1 << 20, first_range=16 << 20):
            raw = store.get_range(span.pack, span.start, span.end - span.start)
            for r in span.refs:
                try:
                    open_chunk(r, raw[r.offset - span.start: r.offset - span.start + r.clen])
                except Exception:
                    bad += 1
    verify_s = time.monotonic() - t
    doc = {"gc_runs": runs, "gc_runs_with_writer": overlapped, "max_deferred_packs": deferred,
           "freed_during": freed, "restored": restored, "new_chunks": result["new_chunks"],
           "reused_chunks": result["reused_chunks"], "build_s": build_s, "packs": len(index.pack_keys()),
           "missing_packs": missing, "chunks": len(refs), "bad_chunks": bad, "verify_s": verify_s,
           "final_freed": final.freed_bytes}
    Path(out).write_text(json.dumps(doc))
    return 0


def concurrent(images: dict[str, BenchImage], scratch: str) -> dict[str, Any]:
    from bench.services import start_seaweed

    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up"], check=True)
        svc = start_seaweed(NS, Path(scratch) / "seaweed")
        try:
            out = os.path.join(scratch, "concurrent.json")
            subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-m", "bench", "gc", "--inner",
                            "http://" + svc.address, images["numpy"].layout_zstd, images["torch"].layout_zstd, out],
                           check=True, cwd=str(Path(__file__).resolve().parent.parent))
            return json.loads(Path(out).read_text())
        finally:
            svc.stop()
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench gc", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="bench image work dir (default: bench.images default)")
    ap.add_argument("--skip-s3", action="store_true", help="skip part 2 (SeaweedFS, gc during an index)")
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    ap.add_argument("--inner", nargs=4, metavar=("ENDPOINT", "NUMPY", "TORCH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        return concurrent_inner(*args.inner)

    images = ensure_images(args.workdir)
    scratch = tempfile.mkdtemp(prefix="imagefs-bench-gc-", dir="/var/tmp")
    os.environ["XDG_CACHE_HOME"] = os.path.join(scratch, "xdg")  # no packtoc cache carried between stores
    try:
        s = shrink(images, scratch)
        c = None if args.skip_s3 else concurrent(images, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Store garbage collection (`python -m bench gc`)", "",
        f"`python -m bench gc{' --skip-s3' if args.skip_s3 else ''}` on {when}; {platform.node()}, {os.cpu_count()} "
        f"cores, Python {platform.python_version()}; bench images numpy and torch (zstd layouts), local directory "
        "stores.", "",
        "| store | bytes |", "|---|---|",
        f"| numpy alone (baseline) | {s['baseline']:,} |",
        f"| numpy + torch | {s['before']:,} |",
        f"| numpy + torch, `imagefs rm torch`, `imagefs gc` | {s['after']:,} |", "",
        f"After / baseline: **{s['ratio']:.4f}** (target: within 2%, i.e. 0.98-1.02). gc took {s['gc_s']:.2f} s and "
        f"freed {s['freed']:,} bytes ({', '.join(f'{n} {k}' for k, (n, _b) in s['freed_by_kind'].items() if n)}); "
        f"its dry run predicted {s['dry_freed']:,}.",
        f"numpy mounted from the collected store vs its rootfs on local disk: {s['entries']:,} entries, "
        f"{s['bytes_compared']:,} file bytes compared in {s['compare_s']:.1f} s, "
        f"**{len(s['diffs'])} differences**" + (f" ({'; '.join(s['diffs'][:5])})" if s["diffs"] else "") + ".",
    ]
    if c is not None:
        lines += [
            "",
            "gc during an index (SeaweedFS in a namespace of its own): numpy and torch indexed, torch's name removed, "
            "then `imagefs index` of torch again (a separate process) while `imagefs gc` ran back to back in the "
            f"same store: {c['gc_runs']} collections during the {c['build_s']:.1f} s build, {c['gc_runs_with_writer']} "
            f"of them with the build's lease live (up to {c['max_deferred_packs']} condemned packs deferred); the build "
            f"reused {c['reused_chunks']:,} chunks and stored {c['new_chunks']:,}; {c['restored']} condemned pack(s) "
            f"restored once the build had named them. The new image names {c['packs']} packs: "
            f"**{len(c['missing_packs'])} missing**; all {c['chunks']:,} of its chunks read back from the store and "
            f"verified against their digests in {c['verify_s']:.1f} s: **{c['bad_chunks']} bad**.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "a") as f:
            f.write("\n" + text)
    ok = abs(s["ratio"] - 1) <= 0.02 and not s["diffs"] and (c is None or (not c["missing_packs"] and not c["bad_chunks"]))
    return 0 if ok else 1

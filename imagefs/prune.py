"""Remove what this host keeps for images and runs that nothing uses any more.

The store shrinks with :mod:`indexer.gc`; this is the host's side (``imagefs prune``):

- **Runs** killed with SIGKILL (or a crashed ``imagefs run``): their containers,
  overlays, bundles, image mounts no live run uses, and runc state, through
  :func:`imagefs.stale_runs.sweep` (what the next ``imagefs run`` also does).
- **Mount daemons that are gone**: their record, stats socket and log in the run
  directory, and the private directories of their EROFS blob and kernel probe. A
  daemon being started has a log and no record yet: files without a record are left
  alone for :data:`YOUNG_S` seconds.
- **Index copies** (``<cache dir>/indexes/<hex>.body``), **profile copies**
  (``<cache dir>/profiles/<hex>.profile``, :mod:`imagefs.profile_cache`) and **EROFS
  metadata** (``<cache dir>/erofs/imagefs-<hex>.erofs``) of images no live mount on this
  host serves. All are caches: a later mount fetches or writes them again (one index
  fetch with the profile beside it, ~300 ms of EROFS metadata for a large image). A live mount's are kept even
  though deleting them would not hurt it (it has them mapped or mounted), so that
  its remount stays fast.

What it never touches: the SSD chunk cache (bounded and evicting on its own), a mount
that is still mounted (a dead one is reported: ``imagefs umount`` removes it), files
that are not imagefs's (only names it writes are matched).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field

from imagefs import stale_runs
from imagefs.mount import (EROFS_META_PREFIX, EROFS_META_SUFFIX, find_mounts, is_mountpoint, process_start_time,
                           run_dir)

YOUNG_S = stale_runs.YOUNG_S
_RUN_FILE = re.compile(r"^([0-9a-f]{16})(\.json|\.sock|\.log|\.blob|\.probe|\.probe-blob|\.json\.tmp)$")
_INDEX_COPY = re.compile(r"^(?:([0-9a-f]{64})\.body|\.tmp-.*)$")
_PROFILE_COPY = re.compile(r"^(?:([0-9a-f]{64})\.profile|\.tmp-.*)$")
_EROFS_META = re.compile(rf"^{re.escape(EROFS_META_PREFIX)}(?:([0-9a-f]{{64}})|\.tmp-.*){re.escape(EROFS_META_SUFFIX)}$")


@dataclass(frozen=True)
class Item:
    """One thing prune removed (or would remove)."""

    kind: str  # "run", "daemon files", "index copy", "erofs metadata"
    what: str
    bytes: int = 0


@dataclass
class PruneReport:
    dry_run: bool
    removed: list[Item] = field(default_factory=list)
    dead_mounts: list[str] = field(default_factory=list)  # mounted, daemon gone: 'imagefs umount' them

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.removed)


def _size(path: str) -> int:
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _age(path: str, now: float) -> float:
    try:
        return now - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@dataclass(frozen=True)
class _Daemon:
    key: str
    record: dict[str, object]
    alive: bool


def _daemons(rdir: str) -> dict[str, _Daemon]:
    """Every daemon record in the run directory, by key, with whether it is alive."""
    out: dict[str, _Daemon] = {}
    for name in os.listdir(rdir):
        m = _RUN_FILE.match(name)
        if not m or m.group(2) != ".json":
            continue
        try:
            with open(os.path.join(rdir, name)) as f:
                rec = json.load(f)
            pid = int(rec["pid"])
            alive = process_start_time(pid) == rec.get("start_time")
        except (OSError, ValueError, KeyError, TypeError):
            rec, alive = {}, False
        out[m.group(1)] = _Daemon(m.group(1), rec, alive)
    return out


def live_digests(rdir: str | None = None) -> set[str]:
    """The index digests that live mount daemons on this host serve."""
    rdir = rdir or run_dir()
    if not os.path.isdir(rdir):
        return set()
    return {str(d.record.get("digest")) for d in _daemons(rdir).values() if d.alive and d.record.get("digest")}


def prune_run_files(rdir: str, report: PruneReport, now: float) -> None:
    """Files of mount daemons that are gone (see the module docstring)."""
    if not os.path.isdir(rdir):
        return
    daemons = _daemons(rdir)
    mounted = {m.mountpoint for m in find_mounts()}
    groups: dict[str, list[str]] = {}
    for name in sorted(os.listdir(rdir)):
        m = _RUN_FILE.match(name)
        if m:
            groups.setdefault(m.group(1), []).append(name)
    for key, names in sorted(groups.items()):
        d = daemons.get(key)
        if d is not None and d.alive:
            continue
        paths = [os.path.join(rdir, n) for n in names]
        if d is None and any(_age(p, now) < YOUNG_S for p in paths):
            continue  # a daemon being started: it has a log and no record yet
        if d is not None and str(d.record.get("mountpoint")) in mounted:
            report.dead_mounts.append(str(d.record["mountpoint"]))
            continue  # its files say what it was; 'imagefs umount' cleans both
        if any(is_mountpoint(p) for p in paths):
            continue  # a blob or probe still mounted: not ours to detach here
        size = sum(_size(p) for p in paths)
        report.removed.append(Item("daemon files", f"{rdir}/{key}.* ({', '.join(n[16:] for n in names)})", size))
        if not report.dry_run:
            for p in paths:
                _remove(p)


def prune_cache(cache_dir: str, keep: set[str], in_use: set[str], report: PruneReport, now: float) -> None:
    """Index copies and EROFS metadata of images no live mount serves."""
    for sub, pattern, kind in (("indexes", _INDEX_COPY, "index copy"), ("profiles", _PROFILE_COPY, "profile copy"),
                               ("erofs", _EROFS_META, "erofs metadata")):
        directory = os.path.join(cache_dir, sub)
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            m = pattern.match(name)
            if not m:
                continue
            path = os.path.join(directory, name)
            hexd = m.group(1)
            if hexd is None and _age(path, now) < YOUNG_S:
                continue  # a temporary file being written right now
            if (hexd is not None and "blake3:" + hexd in keep) or path in in_use:
                continue
            report.removed.append(Item(kind, path, _size(path)))
            if not report.dry_run:
                _remove(path)


def survey_runs(containers: str, images: str, runc_root: str, now: float) -> list[str]:
    """What :func:`stale_runs.sweep` would remove, found without removing anything."""
    out = []
    if os.path.isdir(containers):
        for cid in sorted(os.listdir(containers)):
            bundle = os.path.join(containers, cid)
            alive = stale_runs.owner_alive(bundle)
            if alive or (alive is None and _age(bundle, now) < YOUNG_S):
                continue
            out.append(f"container {cid}")
    if os.path.isdir(images):
        for name in sorted(os.listdir(images)):
            if not name.endswith(".users"):
                continue
            fd = os.open(os.path.join(images, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                out.append(f"image mount {name[:-len('.users')]}")
            except BlockingIOError:
                pass  # a live run uses it
            finally:
                os.close(fd)
    return out


def prune(cache_dir: str, *, dry_run: bool = False, runs: bool = True) -> PruneReport:
    """Prune this host (see the module docstring)."""
    from imagefs.run import containers_dir, images_dir, runc_root

    report = PruneReport(dry_run=dry_run)
    now = time.time()
    if runs:
        containers, images, rroot = containers_dir(), images_dir(), runc_root()
        found = (survey_runs(containers, images, rroot, now) if dry_run
                 else stale_runs.sweep(containers, images, rroot))
        report.removed += [Item("run", what) for what in found]
    rdir = run_dir()
    keep = live_digests(rdir)
    in_use = {m.source for m in find_mounts()}  # EROFS mounts name their metadata file
    prune_run_files(rdir, report, now)
    prune_cache(cache_dir, keep, in_use, report, now)
    return report


__all__ = ["prune", "PruneReport", "Item", "live_digests", "prune_run_files", "prune_cache", "survey_runs"]

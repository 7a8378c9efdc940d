"""Garbage collection of a store: mark from the names, sweep the rest, never a live pack.

What is live: every index a name (``refs/<name>``) points at; the startup profile
(``profiles/<index hex>``) and the EROFS metadata (``erofs/<index hex>.v<N>``, counted
with the profiles) of each live index; every pack a live index names, and every
startup pack a live profile names. Everything else is garbage: indexes no name points at
(docker's dangling ``<none>`` images, such as the old image of a re-pointed name, or
one whose last name ``imagefs rm`` removed), profiles of such indexes, packs no live
object names (an interrupted build's, a removed image's, superseded startup packs),
their tables of contents, and leases of writers dead for long.

Why a pack is not deleted at once. A build reads the packs' tables of contents when it
starts and may name any of those packs in an index it writes minutes later; until then
nothing in the store shows that it depends on them except its lease
(:mod:`indexer.leases`). So collection is two-step:

1. **Condemn.** The collector writes a plan (``gc/plans/<id>``) listing the dead
   objects, then moves the table of contents of each dead pack aside
   (``gc/packtoc/<hex>``), so that a writer starting from now on cannot pick the pack up,
   and then records in the plan which leases are live. Only writers holding those
   leases can have seen the packs.
2. **Sweep.** Once none of the plan's leases is live (at once, when no writer is
   running; else at a later ``imagefs gc``), the collector marks again from scratch
   (the writers that ended have written their indexes and names by then) and deletes
   what is still dead: indexes and profiles first, then packs, so that an interrupted
   sweep never leaves a live-looking object pointing at a deleted pack. A condemned pack
   that a finished writer did name is restored: its table of contents goes back.

Killing the collector at any point is safe: each step is idempotent and the plan says
what was condemned. The next run finishes old plans (it redoes a condemnation whose
lease list was never recorded, with the leases live then), and deletes tables of
contents moved aside whose pack is gone and tables of contents whose pack is missing
(a build would name a missing pack through one).

Cost of safety: while a build runs, the packs it is writing are not named yet and get
condemned; their tables of contents are hidden from other builds until the next
collection restores them, so a concurrent build may store those chunks again (the
duplicate is garbage at the following collection). What this does not protect: a mount
on another host of an image whose last name was removed (as ``docker rmi`` it is the
user's decision; ``imagefs rm`` refuses for mounts on its own host), and a profile merged
by a mount daemon (which holds no lease) from a profile read before ``imagefs optimize``
replaced its startup packs: that profile can name a deleted startup pack, which costs
its replay, never a wrong byte (replays fall back to the image's own packs).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from cache.blobstore import BlobNotFound, BlobStore, list_sizes
from indexer import profile as profiles
from indexer.catalog import INDEX_PREFIX, REF_PREFIX, ImageNotFound, RefRecord
from indexer.format import DIGEST_PREFIX, IndexFormatError
from indexer.index import Index
from indexer.leases import LEASE_PREFIX, TTL_S, read_leases
from indexer.packer import TOC_PREFIX
from indexer.progress import NullProgress, Progress

log = logging.getLogger(__name__)

PACK_PREFIX = "packs/"
PROFILE_PREFIX = profiles.PROFILE_PREFIX
EROFS_PREFIX = "erofs/"  # indexer.erofs.store.PREFIX (not imported: it pulls in the EROFS writer)
PLAN_PREFIX = "gc/plans/"
TRASH_TOC_PREFIX = "gc/packtoc/"
WORKERS = 8
KINDS = ("indexes", "profiles", "packs", "packtocs", "leases")


class GcError(Exception):
    """Collection cannot proceed safely; nothing was deleted for the reason given."""


@dataclass
class Marks:
    """What is live, from one pass over the names."""

    indexes: set[str] = field(default_factory=set)  # index keys
    profiles: set[str] = field(default_factory=set)  # profile keys
    packs: set[str] = field(default_factory=set)  # pack keys
    broken_names: list[str] = field(default_factory=list)  # names whose index is missing


@dataclass
class Freed:
    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size


@dataclass
class GcReport:
    """What a collection did (or, with ``dry_run``, would do)."""

    dry_run: bool
    live_images: int = 0
    live_packs: int = 0
    store_bytes_before: int = 0  # every object imagefs keeps in the store (refs and leases aside)
    store_bytes_after: int = 0  # the same after the collection (with ``dry_run``: what it would be)
    freed: dict[str, Freed] = field(default_factory=lambda: {k: Freed() for k in KINDS})
    deferred: Freed = field(default_factory=Freed)  # condemned, deleted once these writers end
    waiting_for: list[str] = field(default_factory=list)
    restored: int = 0  # condemned packs a finished writer named: kept, tables of contents back
    broken_names: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def freed_bytes(self) -> int:
        return sum(f.bytes for f in self.freed.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run, "live_images": self.live_images, "live_packs": self.live_packs,
            "store_bytes_before": self.store_bytes_before, "store_bytes_after": self.store_bytes_after,
            "freed_bytes": self.freed_bytes,
            "freed": {k: {"count": f.count, "bytes": f.bytes} for k, f in self.freed.items()},
            "deferred": {"count": self.deferred.count, "bytes": self.deferred.bytes},
            "waiting_for": self.waiting_for, "restored": self.restored, "broken_names": self.broken_names,
            "seconds": round(self.seconds, 3),
        }


class _IndexPacks:
    """Pack keys per index digest, read once per collection (indexes are immutable)."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._packs: dict[str, list[str] | None] = {}

    def get(self, key: str) -> list[str] | None:
        """The packs index ``key`` names; None if the index is missing."""
        if key not in self._packs:
            digest = DIGEST_PREFIX + key[len(INDEX_PREFIX):]
            try:
                blob = self.store.get(key)
            except BlobNotFound:
                return None  # not cached: it may yet appear
            try:
                self._packs[key] = Index.from_blob(blob, digest).pack_keys()
            except (IndexFormatError, ValueError) as e:
                raise GcError(f"{self.store.url}/{key} cannot be read ({e}): its packs are unknown, so nothing "
                              "is collected; remove the names that point at it ('imagefs rm') first") from e
        return self._packs[key]


def mark(store: BlobStore, indexes: _IndexPacks, progress: Progress | None = None) -> Marks:
    """Everything live, from the names down (see the module docstring)."""
    progress = progress or NullProgress()
    m = Marks()
    names: dict[str, str] = {}
    for key in store.list(REF_PREFIX):
        name = key[len(REF_PREFIX):]
        try:
            rec = RefRecord.decode(store.get(key), f"{name} in {store.url}")
        except BlobNotFound:
            continue
        except ImageNotFound as e:
            m.broken_names.append(f"{name} (corrupt reference: {e})")
            continue
        names[name] = INDEX_PREFIX + rec.digest[len(DIGEST_PREFIX):]
    progress.phase(f"reading {len(set(names.values()))} named images")
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="gc-mark") as pool:
        keys = sorted(set(names.values()))
        for key, packs in zip(keys, pool.map(indexes.get, keys)):
            if packs is None:
                m.broken_names += [f"{n} (its index {key} is missing)" for n, k in names.items() if k == key]
                continue
            m.indexes.add(key)
            m.packs.update(packs)
        for pkey, packs in zip(*_profiles_of(store, pool, sorted(m.indexes))):
            if packs is not None:
                m.profiles.add(pkey)
                m.packs.update(packs)
    # An index's EROFS metadata (indexer.erofs.store) lives and dies with it; it is
    # counted with the profiles, the index's other companion.
    live = {_hex(k) for k in m.indexes}
    for key in store.list(EROFS_PREFIX):
        if _hex(key).partition(".")[0] in live:
            m.profiles.add(key)
    return m


def _profiles_of(store: BlobStore, pool: ThreadPoolExecutor, index_keys: list[str]) -> tuple[list[str], list[list[str] | None]]:
    pkeys = [PROFILE_PREFIX + k[len(INDEX_PREFIX):] for k in index_keys]

    def read(pkey: str) -> list[str] | None:
        try:
            blob = store.get(pkey)
        except BlobNotFound:
            return None
        try:
            return profiles.referenced_packs(profiles.decode(blob, f"{store.url}/{pkey}"))
        except profiles.ProfileError as e:
            raise GcError(f"{e}: the startup packs it names are unknown, so nothing is collected; "
                          "record the profile again or delete it") from e

    return pkeys, list(pool.map(read, pkeys))


@dataclass
class _Stock:
    """What the store holds, by kind (key -> size)."""

    indexes: dict[str, int]
    profiles: dict[str, int]
    packs: dict[str, int]
    tocs: dict[str, int]
    trash_tocs: dict[str, int]

    @property
    def total(self) -> int:
        return sum(sum(d.values()) for d in (self.indexes, self.profiles, self.packs, self.tocs, self.trash_tocs))

    @classmethod
    def take(cls, store: BlobStore) -> "_Stock":
        stock = cls(*(dict(list_sizes(store, p)) for p in
                      (INDEX_PREFIX, PROFILE_PREFIX, PACK_PREFIX, TOC_PREFIX, TRASH_TOC_PREFIX)))
        stock.profiles.update(list_sizes(store, EROFS_PREFIX))
        return stock


def _hex(key: str) -> str:
    return key.rsplit("/", 1)[1]


def collect(store: BlobStore, *, dry_run: bool = False, progress: Progress | None = None,
            now: Callable[[], float] = time.time) -> GcReport:
    """Collect ``store`` (see the module docstring); returns what was freed."""
    t0 = time.monotonic()
    progress = progress or NullProgress()
    report = GcReport(dry_run=dry_run)
    indexes = _IndexPacks(store)
    try:
        m = mark(store, indexes, progress)
        report.broken_names = m.broken_names
        stock = _Stock.take(store)
        dead_indexes = sorted(set(stock.indexes) - m.indexes)
        dead_profiles = sorted(set(stock.profiles) - m.profiles)
        dead_packs = sorted(set(stock.packs) - m.packs)
        # Tables of contents with no pack: a build would name a missing pack through one.
        stray_tocs = sorted(k for k in stock.tocs if PACK_PREFIX + _hex(k) not in stock.packs)
        stale_trash = sorted(k for k in stock.trash_tocs if PACK_PREFIX + _hex(k) not in stock.packs)
        leases = list(read_leases(store))
        expired = sorted(l.key for l in leases if l.readable and now() > l.renewed + l.ttl + TTL_S)

        if dry_run:
            for kind, keys, sizes in (("indexes", dead_indexes, stock.indexes), ("profiles", dead_profiles, stock.profiles),
                                      ("packs", dead_packs, stock.packs)):
                for k in keys:
                    report.freed[kind].add(sizes[k])
            for k in dead_packs:
                toc = TOC_PREFIX + _hex(k)
                if toc in stock.tocs:
                    report.freed["packtocs"].add(stock.tocs[toc])
            for k in stray_tocs:
                report.freed["packtocs"].add(stock.tocs[k])
            report.freed["leases"].count = len(expired)
            report.waiting_for = [l.describe() for l in leases if l.live(now())]
            report.live_images, report.live_packs = len(m.indexes), len(m.packs)
            report.store_bytes_before = stock.total
            report.store_bytes_after = stock.total - report.freed_bytes
            return report
        report.store_bytes_before = stock.total

        # 1. Condemn: plan first, then hide the tables of contents, then note the leases.
        plan: dict[str, Any] = {
            "id": f"{int(now())}-{secrets.token_hex(6)}", "host": socket.gethostname(), "pid": os.getpid(),
            "created": now(), "indexes": dead_indexes, "profiles": dead_profiles, "packs": dead_packs, "leases": None,
        }
        plans = _read_plans(store)
        # What an earlier plan condemned is its to finish (a gc run every minute while a
        # long build runs would otherwise pile up plans naming the same packs).
        for kind in ("indexes", "profiles", "packs"):
            taken = {k for p in plans for k in p[kind]}
            plan[kind] = [k for k in plan[kind] if k not in taken]
        if plan["indexes"] or plan["profiles"] or plan["packs"]:
            _put_plan(store, plan)
            plans.append(plan)
        progress.phase(f"condemning {len(plan['packs'])} packs")
        for p in plans:
            if p["leases"] is None:  # ours, or one whose collector died before noting its leases
                _hide_tocs(store, p["packs"])
        live_now = {l.key for l in read_leases(store) if l.live(now())}
        for p in plans:
            if p["leases"] is None:
                p["leases"] = sorted(live_now)
                _put_plan(store, p)

        # 2. Sweep the plans none of whose writers is still running.
        ripe = [p for p in plans if not set(p["leases"]) & live_now]
        waiting = [p for p in plans if p not in ripe]
        if ripe:
            again = mark(store, indexes, progress)
            sizes = _Stock.take(store)
            gone_indexes = sorted({k for p in ripe for k in p["indexes"]} - again.indexes)
            gone_profiles = sorted({k for p in ripe for k in p["profiles"]} - again.profiles)
            condemned_packs = {k for p in ripe for k in p["packs"]}
            gone_packs = sorted(condemned_packs - again.packs)
            revived = sorted(condemned_packs & again.packs)
            total = sum(sizes.indexes.get(k, 0) for k in gone_indexes) + sum(
                sizes.profiles.get(k, 0) for k in gone_profiles) + sum(sizes.packs.get(k, 0) for k in gone_packs)
            progress.phase("deleting", total or None)
            _delete(store, gone_indexes, sizes.indexes, report.freed["indexes"], progress)
            _delete(store, gone_profiles, sizes.profiles, report.freed["profiles"], progress)
            _delete(store, gone_packs, sizes.packs, report.freed["packs"], progress)
            trash = [TRASH_TOC_PREFIX + _hex(k) for k in gone_packs]
            _delete(store, [k for k in trash if k in sizes.trash_tocs], sizes.trash_tocs, report.freed["packtocs"], None)
            report.restored = _restore_tocs(store, revived, sizes)
            for p in ripe:
                store.delete(PLAN_PREFIX + p["id"])
            m = again
            stock = _Stock.take(store)
        still = {l.key: l for l in read_leases(store)}
        report.waiting_for = sorted({still[k].describe() for p in waiting for k in p["leases"] if k in still})
        for k in sorted({k for p in waiting for k in p["packs"]}):
            report.deferred.add(stock.packs.get(k, 0))
        # Checked again one by one: a build writes a pack, then its table of contents.
        _delete(store, [k for k in stray_tocs if k in stock.tocs and not store.exists(PACK_PREFIX + _hex(k))],
                stock.tocs, report.freed["packtocs"], None)
        _delete(store, [k for k in stale_trash if k in stock.trash_tocs and not store.exists(PACK_PREFIX + _hex(k))],
                stock.trash_tocs, report.freed["packtocs"], None)
        for k in expired:
            store.delete(k)
            report.freed["leases"].add(0)
        report.live_images, report.live_packs = len(m.indexes), len(m.packs)
        report.store_bytes_after = _Stock.take(store).total
        return report
    finally:
        report.seconds = time.monotonic() - t0
        progress.close()


def _read_plans(store: BlobStore) -> list[dict[str, Any]]:
    plans = []
    for key in store.list(PLAN_PREFIX):
        try:
            p = json.loads(store.get(key))
            for kind, prefixes in (("indexes", (INDEX_PREFIX,)), ("profiles", (PROFILE_PREFIX, EROFS_PREFIX)),
                                   ("packs", (PACK_PREFIX,))):
                items = p.get(kind)
                # A plan names only objects of its kind: never a name, a lease or anything else.
                if not isinstance(items, list) or not all(
                        isinstance(k, str) and any(k.startswith(x) and "/" not in k[len(x):] for x in prefixes)
                        for k in items):
                    raise ValueError(f"bad {kind} list")
            if p.get("leases") is not None and not (
                    isinstance(p["leases"], list) and all(isinstance(k, str) for k in p["leases"])):
                raise ValueError("bad leases list")
            p["id"] = key[len(PLAN_PREFIX):]
            plans.append(p)
        except BlobNotFound:
            continue
        except ValueError as e:  # not ours to judge: report and keep
            log.warning("%s/%s: unreadable collection plan (%s); ignored", store.url, key, e)
    return plans


def _put_plan(store: BlobStore, plan: dict[str, Any]) -> None:
    store.put(PLAN_PREFIX + plan["id"], json.dumps(plan).encode())


def _hide_tocs(store: BlobStore, packs: list[str]) -> None:
    """Move each pack's table of contents to the trash (copy, then delete): from now
    on no build that starts can name the pack."""

    def hide(pack: str) -> None:
        toc = TOC_PREFIX + _hex(pack)
        try:
            blob = store.get(toc)
        except BlobNotFound:
            return  # a startup pack, or hidden already
        store.put(TRASH_TOC_PREFIX + _hex(pack), blob)
        store.delete(toc)

    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="gc-condemn") as pool:
        list(pool.map(hide, packs))


def _restore_tocs(store: BlobStore, packs: list[str], stock: _Stock) -> int:
    n = 0
    for pack in packs:
        trash = TRASH_TOC_PREFIX + _hex(pack)
        try:
            blob = store.get(trash)
        except BlobNotFound:
            continue
        store.put(TOC_PREFIX + _hex(pack), blob)
        store.delete(trash)
        n += 1
    return n


def _delete(store: BlobStore, keys: list[str], sizes: dict[str, int], freed: Freed, progress: Progress | None) -> None:
    def rm(key: str) -> int:
        store.delete(key)
        return sizes.get(key, 0)

    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="gc-delete") as pool:
        for size in pool.map(rm, keys):
            freed.add(size)
            if progress:
                progress.advance(size)


__all__ = ["collect", "mark", "GcReport", "GcError", "Marks", "PLAN_PREFIX", "TRASH_TOC_PREFIX", "LEASE_PREFIX"]

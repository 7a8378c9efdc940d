"""Counters for the chunk tiers, and the frozen snapshots they hand out.

Every tier keeps one :class:`Counters` (mutable, thread-safe, cheap to bump on the hot
path) and hands out :class:`TierStats` snapshots (frozen, safe to keep, print or send
as JSON). The chain gathers them into one :class:`ChainStats` that ``imagefs stats``
prints. Snapshots rather than live objects so that a reader never sees a half-updated
set of numbers and never holds a lock.

Latency goes into a small fixed-bucket histogram: the bucket bounds are spread over the
tiers' physics (memory ~µs, SSD ~100 µs, AZ cache ~1 ms, blob store ~200 ms), so one
glance tells which tier a request was really served from.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

# Upper bounds (seconds) of the latency buckets; a last, open bucket holds the rest.
LATENCY_BOUNDS: tuple[float, ...] = (0.0001, 0.001, 0.01, 0.1, 1.0)


def bucket_label(i: int) -> str:
    """``le_0.001``-style name of bucket ``i`` (``inf`` for the last, open one)."""
    return f"le_{LATENCY_BOUNDS[i]:g}" if i < len(LATENCY_BOUNDS) else "le_inf"


@dataclass(frozen=True, slots=True)
class TierStats:
    """One tier's counters at one instant.

    ``requests`` lookups or fetches asked of the tier, ``hits``/``misses`` chunks it
    did/did not serve, ``bytes`` bytes it served (the memory and SSD tiers: uncompressed;
    the blob store and remote tiers: compressed, as they cross the network),
    ``errors`` failures (I/O, timeouts),
    ``corrupt`` copies that failed verification and were dropped, ``evictions`` chunks
    it dropped for room, ``stored_bytes``/``entries`` what it holds now (0 when it
    holds nothing, e.g. the blob store).
    """

    name: str
    requests: int = 0
    hits: int = 0
    misses: int = 0
    bytes: int = 0
    errors: int = 0
    corrupt: int = 0
    evictions: int = 0
    stored_bytes: int = 0
    entries: int = 0
    latency_count: int = 0
    latency_sum: float = 0.0
    latency_buckets: tuple[int, ...] = field(default=(0,) * (len(LATENCY_BOUNDS) + 1))

    @property
    def latency_mean(self) -> float:
        return self.latency_sum / self.latency_count if self.latency_count else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_buckets"] = {bucket_label(i): n for i, n in enumerate(self.latency_buckets)}
        return d


class Counters:
    """The mutable side of :class:`TierStats`: bumped under one lock, read as a snapshot."""

    __slots__ = ("name", "_lock", "requests", "hits", "misses", "bytes", "errors", "corrupt",
                 "evictions", "latency_count", "latency_sum", "buckets")

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.requests = self.hits = self.misses = self.bytes = 0
        self.errors = self.corrupt = self.evictions = 0
        self.latency_count = 0
        self.latency_sum = 0.0
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)

    def lookup(self, nbytes: int | None, seconds: float) -> None:
        """One request that was a hit of ``nbytes`` bytes, or a miss (``nbytes`` None)."""
        b = bisect.bisect_left(LATENCY_BOUNDS, seconds)
        with self._lock:
            self.requests += 1
            if nbytes is None:
                self.misses += 1
            else:
                self.hits += 1
                self.bytes += nbytes
            self.latency_count += 1
            self.latency_sum += seconds
            self.buckets[b] += 1

    def fetch(self, chunks: int, nbytes: int, seconds: float, *, wanted: int | None = None) -> None:
        """One request that brought ``chunks`` chunks (``nbytes`` bytes) of ``wanted``."""
        b = bisect.bisect_left(LATENCY_BOUNDS, seconds)
        with self._lock:
            self.requests += 1
            self.hits += chunks
            if wanted is not None and wanted > chunks:
                self.misses += wanted - chunks
            self.bytes += nbytes
            self.latency_count += 1
            self.latency_sum += seconds
            self.buckets[b] += 1

    def add(self, *, hits: int = 0, misses: int = 0, errors: int = 0, corrupt: int = 0,
            evictions: int = 0) -> None:
        """Bump counts that are not tied to one timed request."""
        with self._lock:
            self.hits += hits
            self.errors += errors
            self.corrupt += corrupt
            self.evictions += evictions
            self.misses += misses

    def snapshot(self, *, stored_bytes: int = 0, entries: int = 0) -> TierStats:
        with self._lock:
            return TierStats(
                name=self.name, requests=self.requests, hits=self.hits, misses=self.misses,
                bytes=self.bytes, errors=self.errors, corrupt=self.corrupt,
                evictions=self.evictions, stored_bytes=stored_bytes, entries=entries,
                latency_count=self.latency_count, latency_sum=self.latency_sum,
                latency_buckets=tuple(self.buckets),
            )


@dataclass(frozen=True, slots=True)
class ChainStats:
    """The whole read-through chain at one instant: its tiers, fastest first, and the
    chain's own counters.

    ``gets`` demand requests, ``joined`` gets that waited on a fetch already in flight
    (single flight), ``fetches`` ranged fetches started below the local tiers,
    ``retries`` blob-store retries, ``unavailable`` gets that failed on every tier,
    ``prefetched``/``prefetch_failed`` chunks brought in (or not) ahead of demand,
    ``fill_pending``/``fill_dropped`` SSD write-behind bytes queued now / chunks not
    written because the queue was full, ``stored``/``store_failed`` chunks the
    write-behind left on the SSD tier / could not (a full or broken disk); with remote
    tiers (a zone cache), ``direct_reads`` blob-store reads this host made itself because the remote tiers
    lacked a chunk (down, broken, or the chunk missing), within the store budget, and
    ``direct_waits`` times a read had to wait for that budget (or, a background read,
    for a zone that had just gone down to come back).
    """

    tiers: tuple[TierStats, ...]
    gets: int = 0
    joined: int = 0
    fetches: int = 0
    retries: int = 0
    unavailable: int = 0
    prefetched: int = 0
    prefetch_failed: int = 0
    fill_pending: int = 0
    fill_dropped: int = 0
    direct_reads: int = 0
    direct_waits: int = 0
    stored: int = 0
    store_failed: int = 0

    def tier(self, name: str) -> TierStats:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tiers": {t.name: t.as_dict() for t in self.tiers}}
        for k in ("gets", "joined", "fetches", "retries", "unavailable", "prefetched",
                  "prefetch_failed", "fill_pending", "fill_dropped", "direct_reads", "direct_waits",
                  "stored", "store_failed"):
            d[k] = getattr(self, k)
        return d

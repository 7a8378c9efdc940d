"""The in-process hot-chunk tier: an LRU of verified chunk bytes, bounded by bytes.

It sits between the kernel page cache and the SSD so that the reads the kernel does
not keep (a file read in small pieces, several files sharing a chunk, the chunk a
file ends in and the next one starts in) cost a dict lookup instead of a thread hop,
a disk read and a hash. The chain calls it on the trio thread, so ``get`` never
blocks on I/O: one lock, one ``OrderedDict`` move. Everything put here was verified
by the caller; nothing here is re-verified.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from cache.chunk import ChunkRef
from cache.stats import Counters, TierStats


class MemoryTier:
    """digest -> bytes, least recently used evicted first, ``size <= max_bytes`` always."""

    name = "memory"

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"memory tier: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._size = 0
        self.counters = Counters(self.name)

    def get(self, ref: ChunkRef) -> bytes | None:
        t0 = time.perf_counter()
        with self._lock:
            data = self._items.get(ref.digest)
            if data is not None:
                self._items.move_to_end(ref.digest)
        self.counters.lookup(None if data is None else len(data), time.perf_counter() - t0)
        return data

    def peek(self, digest: bytes) -> bytes | None:
        """The bytes for ``digest`` without touching LRU order or counters."""
        with self._lock:
            return self._items.get(digest)

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._items

    def put(self, ref: ChunkRef, data: bytes) -> None:
        """Keep ``data`` (verified by the caller); a chunk larger than the whole tier is declined."""
        n = len(data)
        if n > self.max_bytes:
            return
        evicted = 0
        with self._lock:
            old = self._items.pop(ref.digest, None)
            if old is not None:
                self._size -= len(old)
            while self._size + n > self.max_bytes:  # make room first: size never overshoots
                _, victim = self._items.popitem(last=False)
                self._size -= len(victim)
                evicted += 1
            self._items[ref.digest] = data
            self._size += n
        if evicted:
            self.counters.add(evictions=evicted)

    def discard(self, digest: bytes) -> None:
        with self._lock:
            old = self._items.pop(digest, None)
            if old is not None:
                self._size -= len(old)

    @property
    def size(self) -> int:
        """Bytes held now."""
        return self._size

    def __len__(self) -> int:
        return len(self._items)

    def digests(self) -> list[bytes]:
        """Held digests, least recently used first."""
        with self._lock:
            return list(self._items)

    def stats(self) -> TierStats:
        with self._lock:
            size, entries = self._size, len(self._items)
        return self.counters.snapshot(stored_bytes=size, entries=entries)

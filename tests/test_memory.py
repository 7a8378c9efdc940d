"""MemoryTier: bounded by bytes, least recently used out first, safe across threads."""

from __future__ import annotations

import threading

from cache.chunk import ChunkRef, digest_of
from cache.memory import MemoryTier


def ref_for(data: bytes) -> ChunkRef:
    return ChunkRef(digest_of(data), "packs/x", 0, len(data), len(data))


def chunk(i: int, size: int = 1000) -> bytes:
    return i.to_bytes(4, "big") * (size // 4)


def test_get_put_and_counters() -> None:
    m = MemoryTier(10_000)
    a = chunk(1)
    r = ref_for(a)
    assert m.get(r) is None
    m.put(r, a)
    assert m.get(r) == a
    s = m.stats()
    assert (s.requests, s.hits, s.misses, s.bytes) == (2, 1, 1, len(a))
    assert (s.stored_bytes, s.entries) == (len(a), 1)
    assert s.latency_count == 2 and sum(s.latency_buckets) == 2


def test_bounded_by_bytes_and_evicts_least_recently_used() -> None:
    m = MemoryTier(5_000)  # room for five 1000-byte chunks
    chunks = [chunk(i) for i in range(5)]
    refs = [ref_for(c) for c in chunks]
    for r, c in zip(refs, chunks):
        m.put(r, c)
    assert m.size == 5_000
    m.get(refs[0])  # 0 is now the most recent; 1 is the oldest
    m.put(ref_for(chunk(99)), chunk(99))
    assert m.size <= 5_000
    assert refs[1].digest not in m
    assert refs[0].digest in m
    assert m.digests()[0] == refs[2].digest  # next to go
    assert m.stats().evictions == 1


def test_mixed_sizes_never_exceed_bound() -> None:
    m = MemoryTier(64_000)
    for i in range(500):
        c = chunk(i, 400 + (i * 997) % 20_000)
        m.put(ref_for(c), c)
        assert m.size <= 64_000
    assert m.size == sum(len(m.peek(d) or b"") for d in m.digests())


def test_oversized_chunk_is_declined_and_reput_does_not_double_count() -> None:
    m = MemoryTier(1_500)
    big = chunk(1, 2_000)
    m.put(ref_for(big), big)
    assert len(m) == 0 and m.size == 0
    small = chunk(2)
    m.put(ref_for(small), small)
    m.put(ref_for(small), small)
    assert m.size == 1_000 and len(m) == 1


def test_threads_hammering_keep_it_consistent() -> None:
    m = MemoryTier(50_000)
    chunks = [chunk(i, 1_000 + 8 * i) for i in range(200)]
    refs = [ref_for(c) for c in chunks]
    errors: list[str] = []

    def worker(seed: int) -> None:
        for k in range(3_000):
            i = (k * 31 + seed * 17) % len(chunks)
            got = m.get(refs[i])
            if got is None:
                m.put(refs[i], chunks[i])
            elif got != chunks[i]:
                errors.append(f"wrong bytes for {i}")
            if m.size > 50_000:
                errors.append(f"over bound: {m.size}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert m.size == sum(len(m.peek(d) or b"") for d in m.digests()) <= 50_000
    s = m.stats()
    assert s.requests == 4 * 3_000 == s.hits + s.misses

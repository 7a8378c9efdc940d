"""The bottom tier: chunks read out of pack objects in the blob store.

A blob-store round trip costs ~200 ms whatever its size up to several MiB, so the one
thing this tier does is turn a chunk request into *one* ranged read that also covers
the chunks stored right after it in the same pack (the caller names them as
``neighbours``: what the layout put next to a chunk is what is read next). Each chunk
in the range is decompressed and verified on its own; a bad neighbour is dropped
(the chain fetches it again when it is asked for), a bad requested chunk is read
again by itself once and then reported as :class:`~cache.chunk.CorruptChunk`.

Synchronous and thread-safe: the chain calls it from worker threads. Store errors
(:class:`~cache.blobstore.BlobStoreError`) pass through; retrying is the chain's job.
"""

from __future__ import annotations

import time
from typing import Sequence

from cache.blobstore import BlobStore
from cache.chunk import ChunkRef, CorruptChunk, open_chunk
from cache.stats import Counters, TierStats

DEFAULT_MAX_RANGE = 8 << 20


def contiguous_run(ref: ChunkRef, neighbours: Sequence[ChunkRef], max_range: int) -> list[ChunkRef]:
    """The leading neighbours that sit back to back after ``ref`` in its pack, as long as
    the whole span stays within ``max_range`` bytes (``ref`` itself is always read)."""
    run: list[ChunkRef] = []
    end = ref.offset + ref.clen
    for n in neighbours:
        if n.pack != ref.pack or n.offset != end or n.offset + n.clen - ref.offset > max_range:
            break
        run.append(n)
        end = n.offset + n.clen
    return run


class BlobTier:
    """Ranged, verified chunk reads from a :class:`~cache.blobstore.BlobStore`."""

    name = "blob"

    def __init__(self, store: BlobStore, max_range: int = DEFAULT_MAX_RANGE) -> None:
        self.store = store
        self.max_range = max_range
        self.counters = Counters(self.name)

    def _get_range(self, pack: str, start: int, length: int) -> bytes:
        t0 = time.perf_counter()
        try:
            data = self.store.get_range(pack, start, length)
        except Exception:
            self.counters.add(errors=1)
            raise
        self.counters.fetch(0, len(data), time.perf_counter() - t0)
        return data

    def fetch(self, ref: ChunkRef, neighbours: Sequence[ChunkRef] = ()) -> dict[bytes, bytes]:
        """digest -> verified uncompressed bytes for ``ref`` and the contiguous leading
        part of ``neighbours``, read with one ``get_range``.

        Raises :class:`CorruptChunk` if ``ref`` is bad twice, and whatever the store
        raises if it cannot read.
        """
        return self._fetch(ref, neighbours, frames=False)

    def fetch_frames(self, ref: ChunkRef, neighbours: Sequence[ChunkRef] = ()) -> dict[bytes, bytes]:
        """Like :meth:`fetch`, but each value is the chunk's zstd frame as the pack
        stores it (verified: it decompresses to the bytes its digest names). What the
        AZ cache server keeps and sends, so chunks cross the zone's links compressed."""
        return self._fetch(ref, neighbours, frames=True)

    def _fetch(self, ref: ChunkRef, neighbours: Sequence[ChunkRef], *, frames: bool) -> dict[bytes, bytes]:
        run = contiguous_run(ref, neighbours, self.max_range)
        start = ref.offset
        end = run[-1].offset + run[-1].clen if run else ref.offset + ref.clen
        raw = memoryview(self._get_range(ref.pack, start, end - start))
        out: dict[bytes, bytes] = {}
        corrupt = 0
        for c in [ref, *run]:
            lo = c.offset - start
            try:
                out[c.digest] = _open(c, raw[lo:lo + c.clen], frames)
            except CorruptChunk:
                corrupt += 1
        if ref.digest not in out:
            # Perhaps damaged in transit: read it once more, by itself.
            again = self._get_range(ref.pack, ref.offset, ref.clen)
            try:
                out[ref.digest] = _open(ref, memoryview(again), frames)
            except CorruptChunk as e:
                self.counters.add(corrupt=corrupt + 1, misses=len(run) + 1 - len(out))
                raise CorruptChunk(f"{ref}: corrupt in the blob store ({e})") from e
        self.counters.add(hits=len(out), misses=len(run) + 1 - len(out), corrupt=corrupt)
        return out

    def fetch_span(self, refs: Sequence[ChunkRef]) -> tuple[dict[bytes, bytes], int]:
        """digest -> verified uncompressed bytes of ``refs`` (one pack, offset order, not
        overlapping), read with one ``get_range`` from the first to the end of the last:
        the gaps between them are read and thrown away (cheaper than a round trip each).
        A bad chunk is left out (the caller fetches it again on demand); returns the
        chunks and the bytes read. What a profile replay streams (:mod:`cache.stream`)."""
        if not refs:
            return {}, 0
        start = refs[0].offset
        end = refs[-1].offset + refs[-1].clen
        raw = memoryview(self._get_range(refs[0].pack, start, end - start))
        out: dict[bytes, bytes] = {}
        corrupt = 0
        for c in refs:
            lo = c.offset - start
            try:
                out[c.digest] = _open(c, raw[lo:lo + c.clen], False)
            except CorruptChunk:
                corrupt += 1
        self.counters.add(hits=len(out), misses=len(refs) - len(out), corrupt=corrupt)
        return out, len(raw)

    def stats(self) -> TierStats:
        return self.counters.snapshot()


def _open(ref: ChunkRef, frame: memoryview, keep_frame: bool) -> bytes:
    """The verified chunk in ``frame`` (its slice of a pack): uncompressed, or the frame itself."""
    if len(frame) != ref.clen:
        raise CorruptChunk(f"{ref}: pack ends before the chunk does")
    data = open_chunk(ref, frame)
    return bytes(frame) if keep_frame else data

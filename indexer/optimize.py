"""Lay a startup profile out: copy its scattered chunks into startup packs, in access order.

A profile's chunks sit in the image's packs in tree order, scattered among chunks the
workload never reads, so a replay straight from them needs many ranged reads. Here the
chunks that are not already in long runs of their pack (those are read where they are:
a copy would cost store bytes and save no round trip) are copied, in the order they are
first read, into one or a few new packs
(``packs/<blake3>``, like any pack), and the profile records where each copy is. A
replay then reads the whole working set in a handful of sequential ranged reads.

What does not change: the index (so the image digest, the mounted tree, and dedup
with other images: every chunk keeps its place in the image's own packs; the startup
packs are extra copies, reported as such), and chunk identity (each copy is the same
zstd frame, checked against its digest before it is copied, and verified again by
every reader). A startup pack has no table of contents, so a build never dedups
against it: it lives exactly as long as a profile names it (garbage collection keeps
the packs of every profile whose index is kept).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

from cache.blobstore import BlobStore
from cache.chunk import ChunkRef, CorruptChunk, check_frame, digest_of
from cache.stream import Span, plan_spans
from indexer import profile as profiles
from indexer.index import Index, pack_key
from indexer.leases import Lease

# A startup pack is at most this big: large enough that a replay needs a handful of
# reads, small enough that a failed upload costs little to redo.
STARTUP_PACK_SIZE = 64 << 20
# Reading the copies from the image's packs: ranges over gaps up to this, this large.
READ_GAP = 1 << 20
READ_RANGE = 16 << 20
READERS = 8
# Chunks already in runs of at least KEEP_RUN bytes of their pack (over gaps of at most
# KEEP_GAP) stay where they are: measured on the torch image's `import torch` profile
# (53 MiB stored), such runs hold 51% of it, so copying the rest costs 7% of the image's
# packs instead of 15%, for ~15 more ranged reads in a replay that keeps 8 in flight.
KEEP_RUN = 1 << 20
KEEP_GAP = 64 << 10
# The first this-many compressed bytes of the working set also go inline in the profile
# (its head), which a cold host fetches beside the index: they are there before the
# replay's first ranged read can answer (a blob-store round trip, ~200 ms).
HEAD_BYTES = 4 << 20


class OptimizeError(Exception):
    """The profile could not be laid out; the message says why."""


@dataclass(frozen=True)
class OptimizeResult:
    profile: profiles.Profile
    chunks: int  # chunks copied to startup packs (the others are read where they are)
    startup_bytes: int  # bytes of the new startup packs and the head (the extra storage)
    image_bytes: int  # compressed bytes of the image's own chunks
    packs: int
    seconds: float
    changed: bool  # False: the profile was laid out in this order already

    @property
    def extra_ratio(self) -> float:
        return self.startup_bytes / self.image_bytes if self.image_bytes else 0.0


def is_laid_out(profile: profiles.Profile) -> bool:
    """Whether ``imagefs optimize`` laid the profile out in its current order."""
    return profile.optimized


def in_place(refs: list[ChunkRef], *, min_run: int = KEEP_RUN, max_gap: int = KEEP_GAP) -> set[bytes]:
    """The digests of ``refs`` that sit in runs of their own pack long enough to be read
    where they are: ``min_run`` bytes or more in one ranged read, over gaps of at most
    ``max_gap``. A copy of those would cost store bytes and save no round trip."""
    keep: set[bytes] = set()
    for span in plan_spans(refs, max_range=1 << 62, max_gap=max_gap, first_range=1 << 62):
        if span.end - span.start >= min_run:
            keep.update(r.digest for r in span.refs)
    return keep


def _read_frames(store: BlobStore, refs: list[ChunkRef]) -> dict[bytes, bytes]:
    """The verified zstd frames of ``refs``, read from their packs in merged ranges."""
    spans = plan_spans(refs, max_range=READ_RANGE, max_gap=READ_GAP, first_range=READ_RANGE)

    def read(s: Span) -> dict[bytes, bytes]:
        raw = memoryview(store.get_range(s.pack, s.start, s.end - s.start))
        out: dict[bytes, bytes] = {}
        for r in s.refs:
            frame = raw[r.offset - s.start: r.offset - s.start + r.clen]
            try:
                if len(frame) != r.clen or check_frame(r.digest, frame, r.ulen) != r.ulen:
                    raise CorruptChunk(f"{r}: short or wrong size")
            except CorruptChunk as e:
                raise OptimizeError(f"{r}: damaged in the store ({e}); not copied") from e
            out[r.digest] = bytes(frame)
        return out

    frames: dict[bytes, bytes] = {}
    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="optimize-read") as pool:
        for part in pool.map(read, spans):
            frames.update(part)
    return frames


def optimize(store: BlobStore, index: Index, profile: profiles.Profile, *, force: bool = False,
             pack_size: int = STARTUP_PACK_SIZE, head_budget: int = HEAD_BYTES,
             on_bytes: Callable[[int], None] | None = None) -> OptimizeResult:
    """Write startup packs for ``profile`` (of ``index``) and save the laid-out profile,
    with the first ``head_budget`` bytes of frames inline (its head).

    The packs are written (and durable) before the profile that names them, so a
    reader never finds a profile whose packs are missing. A lease is held from before
    the first read to after the profile is saved: until then nothing names the new
    startup packs (see :mod:`indexer.leases`).
    """
    with Lease(store, f"optimize {index.digest}"):
        return _optimize(store, index, profile, force=force, pack_size=pack_size, head_budget=head_budget,
                         on_bytes=on_bytes)


def _optimize(store: BlobStore, index: Index, profile: profiles.Profile, *, force: bool,
              pack_size: int, head_budget: int, on_bytes: Callable[[int], None] | None) -> OptimizeResult:
    t0 = time.monotonic()
    profiles.check_against(profile, index)
    image_bytes = sum(r.clen for r in index.all_chunks())
    if not force and is_laid_out(profile):
        return OptimizeResult(profile, profile.laid_out, _startup_bytes(index, profile), image_bytes,
                              len(profile.packs), time.monotonic() - t0, changed=False)
    refs = [index.chunk(e.chunk) for e in profile.entries]
    keep = in_place(refs)
    frames = _read_frames(store, refs)
    packs: list[bytes] = []
    entries: list[profiles.Entry] = []
    parts: list[bytes] = []
    size = 0
    written = 0

    def flush() -> None:
        nonlocal parts, size, written
        if not parts:
            return
        blob = b"".join(parts)
        d = digest_of(blob)
        store.put(pack_key(d), blob)
        written += len(blob)
        if on_bytes:
            on_bytes(len(blob))
        packs.append(d)
        parts, size = [], 0

    pending: list[tuple[profiles.Entry, int]] = []  # entries of the pack being filled, offsets
    for e, r in zip(profile.entries, refs):
        if r.digest in keep:
            entries.append(replace(e, pack=profiles.NO_PACK, offset=0))  # read where it is
            continue
        frame = frames[r.digest]
        if size and size + len(frame) > pack_size:
            flush()
            entries.extend(replace(pe, pack=len(packs) - 1, offset=off) for pe, off in pending)
            pending = []
        pending.append((e, size))
        parts.append(frame)
        size += len(frame)
    flush()
    entries.extend(replace(pe, pack=len(packs) - 1, offset=off) for pe, off in pending)
    head: list[bytes] = []
    head_bytes = 0
    for r in refs:
        if head_bytes + r.clen > head_budget:
            break
        head.append(frames[r.digest])
        head_bytes += r.clen
    by_chunk = {e.chunk: e for e in entries}
    laid = replace(profile, entries=tuple(by_chunk[e.chunk] for e in profile.entries), packs=tuple(packs),
                   head_chunks=len(head), head=b"".join(head), optimized=True)
    profiles.save(store, laid)
    return OptimizeResult(laid, len(entries) - len(keep), written + head_bytes, image_bytes, len(packs),
                          time.monotonic() - t0, changed=True)


def _startup_bytes(index: Index, profile: profiles.Profile) -> int:
    return sum(index.chunk(e.chunk).clen for e in profile.entries if e.pack != profiles.NO_PACK) + len(profile.head)


__all__ = ["optimize", "OptimizeResult", "OptimizeError", "is_laid_out", "STARTUP_PACK_SIZE"]

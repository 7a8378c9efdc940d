"""Lay new chunks out in pack objects and write them, with a table of contents each.

A pack is a plain concatenation of zstd-compressed chunks, named by the blake3 of its
bytes (``packs/<hex>``), so one ranged GET returns many neighbouring chunks. Chunks are
laid out in the order given (tree order, until a profile exists), so what a container
reads together sits together. Each pack gets a table of contents (``packtoc/<hex>``,
written after its pack) that later builds read to learn what the store already holds:
that is how a chunk is never stored twice, across images and across interrupted builds.
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable

from cache.blobstore import BlobNotFound, BlobStore
from cache.chunk import digest_of
from indexer.chunker import ChunkSpill
from indexer.format import ChunkLocation
from indexer.index import pack_key

TOC_PREFIX = "packtoc/"
TOC_RECORD = struct.Struct("<32sQII")  # digest, offset, clen, ulen
TARGET_PACK_SIZE = 32 << 20
UPLOAD_WORKERS = 4
HASH_WORKERS = 2  # joining and hashing packs is CPU work: one per core here


def toc_key(pack_digest: bytes) -> str:
    return TOC_PREFIX + pack_digest.hex()


def encode_toc(entries: Iterable[tuple[bytes, int, int, int]]) -> bytes:
    return b"".join(TOC_RECORD.pack(*e) for e in entries)


def decode_toc(pack_digest: bytes, blob: bytes) -> dict[bytes, ChunkLocation]:
    if len(blob) % TOC_RECORD.size:
        raise ValueError(f"{toc_key(pack_digest)}: truncated table of contents")
    out = {}
    for digest, offset, clen, ulen in TOC_RECORD.iter_unpack(blob):
        out[digest] = ChunkLocation(pack_digest, offset, clen, ulen)
    return out


def _toc_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "imagefs", "packtoc")


def load_known_chunks(store: BlobStore, use_cache: bool = True) -> dict[bytes, ChunkLocation]:
    """Every chunk the store already holds, from the packs' tables of contents.

    Tables of contents are immutable and content-addressed, so a local copy is kept
    (``~/.cache/imagefs/packtoc``) and only new ones are fetched on later builds.
    """
    keys = list(store.list(TOC_PREFIX))
    cache_dir = _toc_cache_dir() if use_cache else None
    known: dict[bytes, ChunkLocation] = {}

    def load(key: str) -> dict[bytes, ChunkLocation]:
        hexd = key[len(TOC_PREFIX):]
        try:
            pack_digest = bytes.fromhex(hexd)
        except ValueError:
            return {}
        cached = os.path.join(cache_dir, hexd) if cache_dir else None
        if cached and os.path.exists(cached):
            with open(cached, "rb") as f:
                return decode_toc(pack_digest, f.read())
        try:
            blob = store.get(key)
        except BlobNotFound:
            return {}
        if cached:
            os.makedirs(cache_dir, exist_ok=True)  # type: ignore[arg-type]
            tmp = f"{cached}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, cached)
        return decode_toc(pack_digest, blob)

    with ThreadPoolExecutor(max_workers=8) as pool:
        for part in pool.map(load, keys):
            known.update(part)
    return known


class PackWriter:
    """Packs being written: where every chunk lands is known before they are durable.

    :func:`start_packs` lays the packs out and queues each to a hashing worker, which
    joins the pack's pieces (held chunks and coalesced spill-file reads: one copy),
    hashes it, releases the held chunks it now contains and queues the pack to an
    upload worker, which puts the pack and then its table of contents. Hashing is a
    fraction of the write time (blake3 at several GB/s against a disk write and an
    fsync), so :meth:`hashed` returns every chunk's location long before the packs are
    durable and the build encodes its index meanwhile; :meth:`wait` returns only once
    every pack and toc is in the store. Separate pools keep hashing from queueing
    behind slow writes.

    Memory: a joined pack replaces the held chunks it is made of; packs not yet
    written are capped at ``max_inflight`` bytes (only spill-file reads add memory).
    """

    def __init__(
        self, store: BlobStore, spill: ChunkSpill, on_bytes: Callable[[int], None] | None, max_inflight: int
    ) -> None:
        self._store = store
        self._spill = spill
        self._on_bytes = on_bytes
        self._max_inflight = max_inflight
        self._hash_pool = ThreadPoolExecutor(max_workers=HASH_WORKERS, thread_name_prefix="pack-hash")
        self._upload_pool = ThreadPoolExecutor(max_workers=UPLOAD_WORKERS, thread_name_prefix="upload")
        # Oldest first: (pack bytes, entries, future of (pack digest, upload future)).
        self._packs: list[tuple[int, list[tuple[bytes, int, int, int]], Future[tuple[bytes, Future[None]]]]] = []
        self._located = 0  # packs whose chunks are in self.locations
        self._waited = 0  # packs whose upload has been .result()-ed
        self._inflight = 0
        self.locations: dict[bytes, ChunkLocation] = {}
        self.written = 0

    def _assemble(self, digests: list[bytes], entries: list[tuple[bytes, int, int, int]]) -> tuple[bytes, Future[None]]:
        pieces = self._spill.pieces(digests)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        del pieces
        self._spill.release(digests)
        pack_digest = digest_of(data)
        return pack_digest, self._upload_pool.submit(self._upload, pack_digest, data, encode_toc(entries))

    def _upload(self, pack_digest: bytes, data: bytes, toc: bytes) -> None:
        self._store.put(pack_key(pack_digest), data)
        self._store.put(toc_key(pack_digest), toc)  # after the pack: a toc means the pack is there

    def add(self, digests: list[bytes], entries: list[tuple[bytes, int, int, int]], size: int) -> None:
        """Queue one pack of ``digests``, laid out as ``entries``, to be hashed and written."""
        while self._inflight + size > self._max_inflight and self._waited < len(self._packs):
            self._wait_one()
        self._packs.append((size, entries, self._hash_pool.submit(self._assemble, digests, entries)))
        self._inflight += size
        self.written += size

    def hashed(self) -> dict[bytes, ChunkLocation]:
        """Wait until every pack is hashed; returns where each new chunk is."""
        while self._located < len(self._packs):
            _size, entries, hashing = self._packs[self._located]
            pack_digest, _upload = hashing.result()  # raises this pack's assembly error
            for d, off, clen, ulen in entries:
                self.locations[d] = ChunkLocation(pack_digest, off, clen, ulen)
            self._located += 1
        return self.locations

    def _wait_one(self) -> None:
        size, _entries, hashing = self._packs[self._waited]
        _digest, upload = hashing.result()
        upload.result()  # raises this pack's upload error
        self._waited += 1
        self._inflight -= size
        if self._on_bytes:
            self._on_bytes(size)

    def wait(self) -> None:
        """Wait for every upload, oldest first, raising the first error (none is lost)."""
        self.hashed()
        while self._waited < len(self._packs):
            self._wait_one()

    def close(self) -> None:
        """Stop: packs not started yet are cancelled, running ones finish."""
        self._hash_pool.shutdown(wait=True, cancel_futures=True)  # no more uploads queued after this
        self._upload_pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PackWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_packs(
    store: BlobStore,
    spill: ChunkSpill,
    order: Iterable[bytes],
    target_size: int = TARGET_PACK_SIZE,
    on_bytes: Callable[[int], None] | None = None,
) -> PackWriter:
    """Lay every spilled chunk out in packs, in ``order`` (digests; repeats and digests
    not in the spill are skipped), hash them and start writing them (see
    :class:`PackWriter`). The caller gets the locations from
    :meth:`~PackWriter.hashed`, must :meth:`~PackWriter.wait` for the writes, and
    closes the writer (a context manager)."""
    writer = PackWriter(store, spill, on_bytes, max(spill.memory_budget, UPLOAD_WORKERS * target_size))
    try:
        batch: list[bytes] = []
        entries: list[tuple[bytes, int, int, int]] = []
        size = 0
        seen: set[bytes] = set()
        spilled = spill.spilled
        for d in order:
            if d in seen:
                continue
            seen.add(d)
            sc = spilled.get(d)
            if sc is None:
                continue
            entries.append((d, size, sc.clen, sc.ulen))
            batch.append(d)
            size += sc.clen
            if size >= target_size:
                writer.add(batch, entries, size)
                batch, entries, size = [], [], 0
        if entries:
            writer.add(batch, entries, size)
    except BaseException:
        writer.close()
        raise
    return writer


def write_packs(
    store: BlobStore,
    spill: ChunkSpill,
    order: Iterable[bytes],
    target_size: int = TARGET_PACK_SIZE,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[dict[bytes, ChunkLocation], int]:
    """Write every spilled chunk into packs, in ``order``, and wait until they are all
    in the store. Returns (locations, bytes written)."""
    with start_packs(store, spill, order, target_size, on_bytes) as writer:
        writer.wait()
        return writer.hashed(), writer.written

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import blake3

from cache.blobstore import BlobNotFound, BlobStore
from cache.chunk import digest_of
from cache.private import open_private, private_dir
from cache.packtoc import TOC_PREFIX, decode_toc_entries, encode_toc, toc_key
from indexer.chunker import ChunkSpill
from indexer.format import ChunkLocation
from indexer.index import pack_key

TARGET_PACK_SIZE = 32 << 20
UPLOAD_WORKERS = 4
HASH_WORKERS = 2  # joining and hashing packs is CPU work: one per core here


def decode_toc(pack_digest: bytes, blob: bytes) -> dict[bytes, ChunkLocation]:
    entries = decode_toc_entries(toc_key(pack_digest), blob)
    return {d: ChunkLocation(pack_digest, offset, clen, ulen) for d, (offset, clen, ulen) in entries.items()}


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
    if cache_dir:  # private, as every cache of imagefs (cache.private)
        private_dir(os.path.dirname(cache_dir))
        private_dir(cache_dir)
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
            tmp = f"{cached}.tmp{os.getpid()}"
            with open(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
                f.write(blob)
            os.replace(tmp, cached)
        return decode_toc(pack_digest, blob)

    with ThreadPoolExecutor(max_workers=8) as pool:
        for part in pool.map(load, keys):
            known.update(part)
    return known


def digest_of_parts(parts: Iterable[bytes | memoryview]) -> bytes:
    """``digest_of`` the concatenation of ``parts``, without making it."""
    h = blake3.blake3()
    for part in parts:
        h.update(part)
    return h.digest()


def _parts_writer(store: BlobStore) -> Callable[[str, Sequence[bytes | memoryview]], None] | None:
    """The store's ``put_parts``, if it has one that writes what its ``put`` would: a
    subclass that overrides ``put`` alone (to wrap or check writes) is not bypassed."""
    fn = getattr(store, "put_parts", None)
    if fn is None:
        return None
    mro = type(store).__mro__
    owner_parts = next((c for c in mro if "put_parts" in c.__dict__), None)
    owner_put = next((c for c in mro if "put" in c.__dict__), None)
    if owner_parts is None or owner_put is None or not issubclass(owner_parts, owner_put):
        return None
    return fn  # type: ignore[no-any-return]


class PackWriter:
    """Packs being written: where every chunk lands is known before they are durable.

    :func:`start_packs` lays the packs out and queues each to a hashing worker, which
    gathers the pack's pieces (slices of held segments and coalesced spill-file reads,
    see :meth:`ChunkSpill.pieces`) and hashes them. :meth:`hashed` waits for every
    pack's digest, then queues the packs to upload workers, which put each pack (from
    its pieces where the store can, else joined) and then its table of contents.
    Hashing first and writing after keeps the writes' CPU (the kernel's copies into
    the page cache) from delaying the digests the index waits for: the build encodes
    its index while the packs are written and fsynced, and :meth:`wait` returns only
    once every pack and toc is in the store.

    Memory: packs not yet written are capped at ``max_inflight`` bytes; slices of
    held segments add none, spill-file reads and joins do.
    """

    def __init__(
        self, store: BlobStore, spill: ChunkSpill, on_bytes: Callable[[int], None] | None, max_inflight: int
    ) -> None:
        self._store = store
        self._spill = spill
        self._on_bytes = on_bytes
        self._max_inflight = max_inflight
        # A store that writes a blob from pieces (the local store: writev) is handed
        # the pack's pieces as they are; any other gets them joined.
        self._put_parts = _parts_writer(store)
        self._hash_pool = ThreadPoolExecutor(max_workers=HASH_WORKERS, thread_name_prefix="pack-hash")
        self._upload_pool = ThreadPoolExecutor(max_workers=UPLOAD_WORKERS, thread_name_prefix="upload")
        self._packs: list[_Pack] = []  # oldest first
        self._located = 0  # packs whose chunks are in self.locations and whose upload is queued
        self._waited = 0  # packs whose upload has been .result()-ed
        self._inflight = 0
        self.locations: dict[bytes, ChunkLocation] = {}
        self.written = 0

    def _assemble(self, digests: list[bytes]) -> tuple[bytes, list[bytes | memoryview]]:
        pieces = self._spill.pieces(digests)
        if self._put_parts is None and not (len(pieces) == 1 and isinstance(pieces[0], bytes)):
            pieces = [b"".join(pieces)]
        return (digest_of(pieces[0]) if len(pieces) == 1 else digest_of_parts(pieces)), pieces

    def _upload(self, pack_digest: bytes, pieces: list[bytes | memoryview], toc: bytes) -> None:
        if self._put_parts is not None:
            self._put_parts(pack_key(pack_digest), pieces)
        else:
            self._store.put(pack_key(pack_digest), pieces[0])  # type: ignore[arg-type]  # joined: bytes
        self._store.put(toc_key(pack_digest), toc)  # after the pack: a toc means the pack is there

    def add(self, digests: list[bytes], entries: list[tuple[bytes, int, int, int]], size: int) -> None:
        """Queue one pack of ``digests``, laid out as ``entries``, to be hashed."""
        while self._inflight + size > self._max_inflight and self._waited < len(self._packs):
            self._wait_one()
        self._packs.append(_Pack(size, entries, self._hash_pool.submit(self._assemble, digests)))
        self._inflight += size
        self.written += size

    def _locate(self, upto: int) -> None:
        """Wait for the digests of packs before ``upto``, record their chunks'
        locations, and queue their uploads (hashes first, then uploads)."""
        first = self._located
        for pack in self._packs[first:upto]:
            assert pack.hashing is not None
            pack_digest, _pieces = pack.hashing.result()  # raises this pack's assembly error
            for d, off, clen, ulen in pack.entries:
                self.locations[d] = ChunkLocation(pack_digest, off, clen, ulen)
        for pack in self._packs[first:upto]:
            assert pack.hashing is not None
            pack_digest, pieces = pack.hashing.result()
            pack.upload = self._upload_pool.submit(self._upload, pack_digest, pieces, encode_toc(pack.entries))
            pack.hashing = None  # the upload holds the pieces now
        self._located = max(self._located, upto)

    def hashed(self) -> dict[bytes, ChunkLocation]:
        """Wait until every pack is hashed (and queued for upload); returns where each
        new chunk is."""
        self._locate(len(self._packs))
        return self.locations

    def _wait_one(self) -> None:
        if self._waited >= self._located:
            self._locate(self._waited + 1)
        pack = self._packs[self._waited]
        assert pack.upload is not None
        pack.upload.result()  # raises this pack's upload error
        self._waited += 1
        self._inflight -= pack.size
        if self._on_bytes:
            self._on_bytes(pack.size)

    def wait(self) -> None:
        """Wait for every upload, oldest first, raising the first error (none is lost)."""
        self.hashed()
        while self._waited < len(self._packs):
            self._wait_one()

    def close(self) -> None:
        """Stop: packs not started yet are cancelled, running ones finish."""
        self._hash_pool.shutdown(wait=True, cancel_futures=True)
        self._upload_pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PackWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class _Pack:
    size: int
    entries: list[tuple[bytes, int, int, int]]
    hashing: "Future[tuple[bytes, list[bytes | memoryview]]] | None"  # None once the upload is queued
    upload: "Future[None] | None" = None


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

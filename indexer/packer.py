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
from collections import deque
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


def write_packs(
    store: BlobStore,
    spill: ChunkSpill,
    order: Iterable[bytes],
    target_size: int = TARGET_PACK_SIZE,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[dict[bytes, ChunkLocation], int]:
    """Write every spilled chunk into packs, in ``order`` (digests; repeats and
    digests not in the spill are skipped). Returns (locations, bytes written)."""
    locations: dict[bytes, ChunkLocation] = {}
    written = 0
    pending: deque[Future[None]] = deque()  # oldest first; every one is .result()-ed
    pool = ThreadPoolExecutor(max_workers=UPLOAD_WORKERS, thread_name_prefix="upload")

    def upload(pack_digest: bytes, data: bytes, toc: bytes) -> None:
        store.put(pack_key(pack_digest), data)
        store.put(toc_key(pack_digest), toc)  # after the pack: a toc means the pack is there

    buf = bytearray()
    entries: list[tuple[bytes, int, int, int]] = []

    def flush() -> None:
        nonlocal buf, entries, written
        if not entries:
            return
        data = bytes(buf)
        pack_digest = digest_of(data)
        for d, off, clen, ulen in entries:
            locations[d] = ChunkLocation(pack_digest, off, clen, ulen)
        # Bound memory at UPLOAD_WORKERS packs: wait for the oldest, raising its error.
        while len(pending) >= UPLOAD_WORKERS:
            pending.popleft().result()
        pending.append(pool.submit(upload, pack_digest, data, encode_toc(entries)))
        written += len(data)
        if on_bytes:
            on_bytes(len(data))
        buf = bytearray()
        entries = []

    try:
        seen: set[bytes] = set()
        for d in order:
            if d in seen:
                continue
            seen.add(d)
            sc = spill.spilled.get(d)
            if sc is None:
                continue
            entries.append((d, len(buf), sc.clen, sc.ulen))
            buf += spill.read(sc)
            if len(buf) >= target_size:
                flush()
        flush()
        while pending:
            pending.popleft().result()  # re-raise the first upload error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return locations, written

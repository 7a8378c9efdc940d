"""Real packs for cache tests: chunks compressed and concatenated the way the indexer
stores them, written to a real blob store, plus a LocalStore that counts its reads.

Tests use these instead of mocks so that every tier is exercised against the bytes and
the store calls it meets in production.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time

from cache.blobstore import BlobStore
from cache.chunk import ChunkRef, compress, digest_of
from cache.localstore import LocalStore
from cache.packtoc import encode_toc, toc_key


def random_chunks(n: int, size: int, *, seed: int = 0, compressible: bool = True) -> list[bytes]:
    """``n`` distinct chunks of ``size`` bytes, reproducible from ``seed``.

    Compressible chunks repeat a random 256-byte pattern (so zstd has work to do);
    otherwise they are random bytes.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if compressible:
            pattern = rng.randbytes(256)
            body = (pattern * (size // 256 + 1))[:size]
            out.append(i.to_bytes(8, "big") + body[8:] if size >= 8 else body)
        else:
            out.append(rng.randbytes(size))
    return out


def write_pack(store: BlobStore, chunks: list[bytes], *, toc: bool = True) -> list[ChunkRef]:
    """Store ``chunks`` as one pack ``packs/<blake3 of the pack>`` and, as the indexer
    does (unless ``toc`` is false), its table of contents; their refs, in pack order."""
    parts = [compress(c) for c in chunks]
    pack = b"".join(parts)
    pack_digest = digest_of(pack)
    key = f"packs/{pack_digest.hex()}"
    store.put(key, pack)
    refs = []
    offset = 0
    for c, p in zip(chunks, parts):
        refs.append(ChunkRef(digest_of(c), key, offset, len(p), len(c)))
        offset += len(p)
    if toc:
        store.put(toc_key(pack_digest), encode_toc((r.digest, r.offset, r.clen, r.ulen) for r in refs))
    return refs


def overwrite_in_pack(store: LocalStore, ref: ChunkRef, data: bytes) -> None:
    """Overwrite the compressed bytes of ``ref`` on disk with ``data`` (same length):
    real damage to a real pack file."""
    assert len(data) == ref.clen
    path = os.path.join(store.root, ref.pack)
    with open(path, "r+b") as f:
        f.seek(ref.offset)
        f.write(data)


class CountingStore(LocalStore):
    """A real LocalStore that records every ranged read (key, offset, length), and can
    be made slow (``delay`` seconds per read) to stand in for a distant store."""

    def __init__(self, root: str, delay: float = 0.0) -> None:
        super().__init__(root)
        self.delay = delay
        self.calls: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        with self._lock:
            self.calls.append((key, offset, length))
        if self.delay:
            time.sleep(self.delay)
        return super().get_range(key, offset, length)

    @property
    def range_reads(self) -> int:
        with self._lock:
            return len(self.calls)


def dir_snapshot(root: str) -> dict[str, str]:
    """Every file under ``root`` (a local store) by relative path -> sha256 of its bytes:
    two snapshots are equal exactly when the store holds the same files, byte for byte."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out

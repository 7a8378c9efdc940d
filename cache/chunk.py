"""Chunk identity, verification and compression.

A chunk is addressed by the blake3 digest of its uncompressed bytes. It is stored
zstd-compressed inside a pack object; a :class:`ChunkRef` says where. Every byte that
arrives from another process, host or disk goes through :func:`verify` before a reader
sees it, so a corrupt copy in any tier is dropped instead of served.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import blake3
import zstandard

DIGEST_SIZE = 32
# Compression is most of the indexer's CPU. Level 2 compresses the torch image's
# chunks ~1.24x faster than level 3 for ~4% more stored bytes (level 1: ~1.4x faster,
# ~11% more bytes); see the level sweep in bench/RESULTS.md "Indexing". Chunks are
# named by their uncompressed bytes, so changing the level never changes identity or
# dedup: stores written at another level stay valid and are read the same way.
ZSTD_LEVEL = 2
# Above this size hashing and (de)compression are worth a hop to a worker thread.
LARGE_BUFFER = 64 * 1024


class ChunkError(Exception):
    """A chunk could not be had or was not what its digest says."""


class CorruptChunk(ChunkError):
    """Bytes that do not hash to the digest they were fetched for."""


def digest_of(data: bytes | memoryview) -> bytes:
    """The 32-byte blake3 digest that names ``data``.

    Single-threaded on purpose: every caller is already parallel across chunks (the
    indexer's compression workers, the chain's worker threads), so blake3's own
    threads would only oversubscribe the cores. (Measured on the torch image: indexing
    time unchanged within noise, 9.3-10.3 s, against 9.3 s with multi-threaded hashing.)"""
    return blake3.blake3(data).digest()


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where one chunk lives: its digest and its byte range inside a pack object.

    ``offset``/``clen`` locate the compressed bytes in ``pack`` (a blob-store key);
    ``ulen`` is the uncompressed size, needed to size buffers and check the result.
    """

    digest: bytes
    pack: str
    offset: int
    clen: int
    ulen: int

    @property
    def hex(self) -> str:
        return self.digest.hex()

    def __str__(self) -> str:
        return f"chunk {self.digest.hex()[:16]} ({self.pack}@{self.offset}+{self.clen})"


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def compress(data: bytes | memoryview) -> bytes:
    """zstd-compress one chunk (thread-local compressor: no per-call setup)."""
    return _compressor().compress(data)


def decompress(data: bytes | memoryview, ulen: int) -> bytes:
    """Decompress one chunk whose uncompressed size is ``ulen``.

    Raises :class:`CorruptChunk` for a stream that is not valid zstd or has the wrong size.
    The frame header's size is checked first: zstd would allocate whatever it claims.
    """
    try:
        claimed = zstandard.frame_content_size(data)
        if claimed not in (-1, ulen):
            raise CorruptChunk(f"chunk frame claims {claimed} bytes, expected {ulen}")
        out = _decompressor().decompress(data, max_output_size=ulen)
    except zstandard.ZstdError as e:
        raise CorruptChunk(f"not a valid zstd chunk: {e}") from e
    if len(out) != ulen:
        raise CorruptChunk(f"chunk decompressed to {len(out)} bytes, expected {ulen}")
    return out


def verify(digest: bytes, data: bytes | memoryview) -> None:
    """Raise :class:`CorruptChunk` unless ``data`` hashes to ``digest``."""
    got = digest_of(data)
    if got != digest:
        raise CorruptChunk(f"chunk {digest.hex()[:16]}: bytes hash to {got.hex()[:16]}")


def open_chunk(ref: ChunkRef, compressed: bytes | memoryview) -> bytes:
    """Decompress and verify the compressed bytes of ``ref``: what every tier calls on arrival."""
    data = decompress(compressed, ref.ulen)
    verify(ref.digest, data)
    return data


def check_frame(digest: bytes, frame: bytes | memoryview, max_size: int) -> int:
    """Raise :class:`CorruptChunk` unless ``frame`` is one zstd frame of at most
    ``max_size`` bytes that decompresses to the chunk ``digest`` names; its size if so.

    Unlike :func:`open_chunk` this trusts no caller's idea of the size: the frame's
    own header says it (our compressor always writes it). That is what a cache that
    keeps frames needs: a request that names a wrong size must not make a good copy
    look bad.
    """
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise CorruptChunk(f"chunk {digest.hex()[:16]}: not a zstd frame: {e}") from e
    if not 0 <= size <= max_size:  # -1: the header does not say
        raise CorruptChunk(f"chunk {digest.hex()[:16]}: frame header gives no usable size ({size})")
    verify(digest, decompress(frame, size))
    return size

"""Cut file content into content-addressed chunks, compress the new ones, spill them.

The first pass of a build reads every layer once. For each file it hashes fixed-size
chunks on the calling thread (blake3 is cheap), skips any chunk the store or this build
already has, and compresses the new ones on worker threads (zstandard releases the GIL,
so two cores compress while the main thread parses tar). Compressed chunks go to a
local spill file in arrival order; the packer later lays them out in tree order. Nothing
reaches the store in this pass, so bad input found mid-way changes nothing.

Fixed-size chunks aligned to the file start make identical files (and identical file
prefixes) share chunks across layers and images, and let a reader find the chunk for
any offset by division.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Callable, Container

from cache.chunk import compress, digest_of

DEFAULT_CHUNK_SIZE = 1 << 20  # measured: see bench/RESULTS.md "chunk size"
MAX_PENDING = 64  # compressed chunks in flight: bounds memory at ~64 chunk sizes


@dataclass(frozen=True, slots=True)
class SpilledChunk:
    """A new chunk's compressed bytes in the spill file."""

    offset: int
    clen: int
    ulen: int


class ChunkSpill:
    """Hashes, dedups and compresses chunks into a temporary spill file.

    ``known`` is the set of digests the store already holds (they are never stored
    again). ``spilled`` maps each new digest to its place in the spill file.
    """

    def __init__(
        self,
        known: Container[bytes],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        workers: int | None = None,
        tmpdir: str | None = None,
    ) -> None:
        if chunk_size < 4096 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk size must be a power of two >= 4096, not {chunk_size}")
        self.chunk_size = chunk_size
        self.known = known
        self.spilled: dict[bytes, SpilledChunk] = {}
        self.reused: set[bytes] = set()  # digests found in the store
        self.content_bytes = 0  # logical bytes of every file read
        self.pending: deque[tuple[bytes, int, Future[bytes]]] = deque()
        self.in_flight: set[bytes] = set()
        self._pool = ThreadPoolExecutor(max_workers=workers or max(2, os.cpu_count() or 2), thread_name_prefix="compress")
        self._file = tempfile.TemporaryFile(prefix="imagefs-spill-", dir=tmpdir)
        self._pos = 0
        self.on_bytes: Callable[[int], None] | None = None

    def add_file(self, path: bytes, size: int, reader: BinaryIO) -> list[bytes]:
        """Read exactly ``size`` bytes of one file; returns its chunk digests in order."""
        digests: list[bytes] = []
        remaining = size
        cs = self.chunk_size
        while remaining > 0:
            want = min(cs, remaining)
            data = reader.read(want)
            while len(data) < want:  # short reads are legal for streams
                more = reader.read(want - len(data))
                if not more:
                    raise EOFError(f"{path.decode(errors='replace')}: file data ends {remaining - len(data)} bytes early")
                data += more
            digests.append(self._add_chunk(data))
            remaining -= want
            if self.on_bytes:
                self.on_bytes(want)
        self.content_bytes += size
        return digests

    def _add_chunk(self, data: bytes) -> bytes:
        d = digest_of(data)
        if d in self.spilled or d in self.in_flight:
            return d
        if d in self.known:
            self.reused.add(d)
            return d
        self.in_flight.add(d)
        self.pending.append((d, len(data), self._pool.submit(compress, data)))
        if len(self.pending) > MAX_PENDING:
            self._drain(MAX_PENDING // 2)
        return d

    def _drain(self, keep: int = 0) -> None:
        while len(self.pending) > keep:
            d, ulen, fut = self.pending.popleft()
            blob = fut.result()
            self._file.write(blob)
            self.spilled[d] = SpilledChunk(self._pos, len(blob), ulen)
            self._pos += len(blob)
            self.in_flight.discard(d)

    def finish(self) -> None:
        """Wait for every compression and flush the spill file."""
        self._drain()
        self._file.flush()

    def read(self, chunk: SpilledChunk) -> bytes:
        return os.pread(self._file.fileno(), chunk.clen, chunk.offset)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._file.close()

    def __enter__(self) -> "ChunkSpill":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

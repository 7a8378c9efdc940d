"""Cut file content into content-addressed chunks, compress the new ones, hold them.

The first pass of a build reads every layer once. For each file it hashes fixed-size
chunks on the calling thread (blake3 is cheap), skips any chunk the store or this build
already has, and compresses the new ones on worker threads (zstandard releases the GIL,
so two cores compress while the main thread parses tar). Nothing reaches the store in
this pass, so bad input found mid-way changes nothing; the packer later lays the new
chunks out in tree order.

Compressed chunks are kept in memory up to a budget (``memory_budget``, 512 MiB by
default: the torch bench image stores ~330 MB) and spilled to a local temporary file
beyond it, so a multi-GB image stays bounded in memory. Keeping them in memory is what
makes the pack phase cheap, where a spill file costs a write and a read back of every
compressed byte through the page cache (measured on torch: writing packs 1.30 s with
the spill file for every chunk). Held chunks are copied, in arrival order, into
32 MiB segments: arrival order is tar order, which image builders make the same as
tree order, so a pack is mostly a few long slices of segments, hashed at full speed
and written with no join (a join of ~3,000 separate chunks into a fresh 32 MiB
buffer cost ~28 ms per pack, most of it page faults).

Small chunks are compressed in batches (one worker job per ~``BATCH_BYTES``): a base
image has tens of thousands of files of a few KiB, and one thread hop per file costs
more than compressing it.

Fixed-size chunks aligned to the file start make identical files (and identical file
prefixes) share chunks across layers and images, and let a reader find the chunk for
any offset by division.

One size does not fit every file. Most files are read whole, and 1 MiB chunks keep
their count (and the index) small; but large ELF objects (shared libraries, programs)
are mapped and paged in at random: a cold ``import torch`` touches 31 MiB of the
414 MiB ``libtorch_cpu.so``, and every page fault costs its whole chunk. Such files
(ELF magic, at least ``RANDOM_ACCESS_MIN_SIZE``) are cut into ``random_access_chunk_size``
chunks (64 KiB by default); the index records the size per file. The choice is made
from the file's own bytes, so identical files still get identical chunks everywhere.
Measured on the torch image (bench/RESULTS.md "Chunk grain"): the chunks a cold
``import torch`` needs drop from 182 MiB to 128 MiB at the same readahead.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, BinaryIO, Callable, Container, Sequence

from cache.chunk import compress, digest_of

DEFAULT_CHUNK_SIZE = 1 << 20  # measured: see bench/RESULTS.md "chunk size"
# Large ELF objects are read at random (mapped, paged in): smaller chunks for them.
DEFAULT_RANDOM_ACCESS_CHUNK_SIZE = 64 << 10
RANDOM_ACCESS_MIN_SIZE = 4 << 20
ELF_MAGIC = b"\x7fELF"
# Compressed chunks held in memory before the rest goes to a spill file.
DEFAULT_MEMORY_BUDGET = 512 << 20
# Memory held by chunks in flight to the compressors (a chunk that is a view of a
# 4 MiB stream block counts the block): bounds what waits for a worker.
MAX_PENDING_BYTES = 96 << 20
# Chunks smaller than this are gathered into one compression job of up to BATCH_BYTES.
SMALL_CHUNK = 64 << 10
BATCH_BYTES = 256 << 10
# Spill-file reads are coalesced up to this many bytes.
MAX_READ = 8 << 20
# Held chunks are copied into buffers of this size (at most the budget).
SEGMENT_SIZE = 32 << 20


@dataclass(frozen=True, slots=True)
class SpilledChunk:
    """Where a new chunk's compressed bytes are: at ``offset`` in held segment number
    ``segment``, or (``segment`` -1) at ``offset`` in the spill file."""

    offset: int
    clen: int
    ulen: int
    segment: int = -1


def _compress_all(chunks: Sequence[bytes | memoryview]) -> list[bytes]:
    return [compress(c) for c in chunks]


class ChunkSpill:
    """Hashes, dedups and compresses chunks, holding the compressed bytes of new ones.

    ``known`` is the set of digests the store already holds (they are never stored
    again). ``spilled`` maps each new digest to where its compressed bytes are (see
    :class:`SpilledChunk`); :meth:`pieces` returns them.
    """

    def __init__(
        self,
        known: Container[bytes],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        workers: int | None = None,
        tmpdir: str | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        random_access_chunk_size: int = DEFAULT_RANDOM_ACCESS_CHUNK_SIZE,
    ) -> None:
        for what, n in (("chunk size", chunk_size), ("random-access chunk size", random_access_chunk_size)):
            if n < 4096 or n & (n - 1):
                raise ValueError(f"{what} must be a power of two >= 4096, not {n}")
        self.chunk_size = chunk_size
        self.random_access_chunk_size = min(random_access_chunk_size, chunk_size)
        self.known = known
        self.memory_budget = memory_budget
        self.spilled: dict[bytes, SpilledChunk] = {}
        self.held_chunks = 0  # new chunks held in memory
        self.held_bytes = 0  # their compressed bytes
        self._segments: list[bytearray] = []
        self._segment_size = max(1, min(SEGMENT_SIZE, memory_budget))
        self._segment_pos = self._segment_size  # no room yet: the first held chunk opens a segment
        self.reused: set[bytes] = set()  # digests found in the store
        self.content_bytes = 0  # logical bytes of every file read
        # Jobs in submission order: (digests, uncompressed lengths, memory they pin,
        # future of compressed).
        self.pending: deque[tuple[list[bytes], list[int], int, Future[list[bytes]]]] = deque()
        self.pending_bytes = 0
        self.in_flight: set[bytes] = set()
        self._batch: list[bytes | memoryview] = []
        self._batch_digests: list[bytes] = []
        self._batch_bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=workers or max(2, os.cpu_count() or 2), thread_name_prefix="compress")
        self._tmpdir = tmpdir
        self._file: IO[bytes] | None = None  # created on the first chunk over the budget
        self._pos = 0
        self.on_bytes: Callable[[int], None] | None = None

    def add_file(self, path: bytes, size: int, reader: BinaryIO) -> list[bytes]:
        """Read exactly ``size`` bytes of one file; returns its chunk digests in order.

        A reader with ``read_chunk`` (the layer merge's) may hand over views of its
        stream's blocks instead of copies; any other is read with ``read``."""
        digests: list[bytes] = []
        remaining = size
        cs = self.chunk_size
        read = getattr(reader, "read_chunk", None) or reader.read
        head: bytes | memoryview = b""
        small = self.random_access_chunk_size
        if size >= RANDOM_ACCESS_MIN_SIZE and small < cs:
            # Look at the first small chunk's worth to choose: an ELF object gets small
            # chunks; anything else gets its first big chunk completed from here.
            head = self._read_exact(path, read, reader, small, remaining)
            if bytes(head[:4]) == ELF_MAGIC:
                cs = small
        while remaining > 0:
            want = min(cs, remaining)
            if head:
                rest = self._read_exact(path, read, reader, want - len(head), remaining - len(head))
                data: bytes | memoryview = head if not rest else b"".join((head, rest))
                head = b""
            else:
                data = self._read_exact(path, read, reader, want, remaining)
            digests.append(self._add_chunk(data))
            remaining -= want
            if self.on_bytes:
                self.on_bytes(want)
        self.content_bytes += size
        return digests

    @staticmethod
    def _read_exact(path: bytes, read: Callable[[int], bytes | memoryview], reader: BinaryIO, want: int,
                    remaining: int) -> bytes | memoryview:
        """Exactly ``want`` bytes of the file being read (``remaining`` left in it)."""
        if want <= 0:
            return b""
        data = read(want)
        if len(data) < want:  # short reads are legal for streams
            parts = [data]
            got = len(data)
            while got < want:
                more = reader.read(want - got)
                if not more:
                    raise EOFError(f"{path.decode(errors='replace')}: file data ends {remaining - got} bytes early")
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def _add_chunk(self, data: bytes | memoryview) -> bytes:
        d = digest_of(data)
        if d in self.spilled or d in self.in_flight:
            return d
        if d in self.known:
            self.reused.add(d)
            return d
        self.in_flight.add(d)
        n = len(data)
        if n >= SMALL_CHUNK:
            self._submit_batch()  # first: chunks arrive, and are held, in tar order
            self._submit([d], [data])
        else:
            self._batch.append(data)
            self._batch_digests.append(d)
            self._batch_bytes += n
            if self._batch_bytes >= BATCH_BYTES:
                self._submit_batch()
        return d

    def _submit_batch(self) -> None:
        if self._batch:
            batch, digests = self._batch, self._batch_digests
            self._batch, self._batch_digests, self._batch_bytes = [], [], 0
            self._submit(digests, batch)

    def _submit(self, digests: list[bytes], chunks: list[bytes | memoryview]) -> None:
        lens = [len(c) for c in chunks]
        # A view keeps its whole block alive until compressed: count the block.
        cost = sum(len(c.obj) if isinstance(c, memoryview) else len(c) for c in chunks)  # type: ignore[arg-type]
        self.pending.append((digests, lens, cost, self._pool.submit(_compress_all, chunks)))
        self.pending_bytes += cost
        if self.pending_bytes > MAX_PENDING_BYTES:
            self._drain(MAX_PENDING_BYTES // 2)

    def _drain(self, keep: int = 0) -> None:
        """Collect finished jobs, oldest first, until at most ``keep`` bytes are pending."""
        while self.pending and self.pending_bytes > keep:
            digests, lens, cost, fut = self.pending.popleft()
            for d, ulen, blob in zip(digests, lens, fut.result()):
                self._keep(d, blob, ulen)
                self.in_flight.discard(d)
            self.pending_bytes -= cost

    def _keep(self, d: bytes, blob: bytes, ulen: int) -> None:
        clen = len(blob)
        if self.held_bytes + clen <= self.memory_budget:
            if self._segment_pos + clen > self._segment_size:
                # A new segment (a chunk larger than a segment gets one of its own size).
                self._segments.append(bytearray(max(self._segment_size, clen)))
                self._segment_pos = 0
            pos = self._segment_pos
            self._segments[-1][pos:pos + clen] = blob
            self._segment_pos = pos + clen
            self.held_chunks += 1
            self.held_bytes += clen
            self.spilled[d] = SpilledChunk(pos, clen, ulen, len(self._segments) - 1)
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="imagefs-spill-", dir=self._tmpdir)
        self._file.write(blob)
        self.spilled[d] = SpilledChunk(self._pos, clen, ulen)
        self._pos += clen

    def finish(self) -> None:
        """Wait for every compression and flush the spill file."""
        self._submit_batch()
        self._drain()
        if self._file is not None:
            self._file.flush()

    def pieces(self, digests: Sequence[bytes]) -> list[bytes | memoryview]:
        """The compressed bytes of ``digests`` (all new chunks), concatenated in order,
        as a list of pieces: chunks that sit next to each other in a held segment as
        one slice of it (no copy), and in the spill file as one read."""
        out: list[bytes | memoryview] = []
        segment, start, end = -2, 0, 0  # the current run: -1 spill file, >= 0 a segment
        for d in digests:
            sc = self.spilled[d]
            if sc.segment == segment and sc.offset == end and (segment >= 0 or end - start < MAX_READ):
                end += sc.clen
                continue
            if segment != -2:
                out.append(self._run(segment, start, end))
            segment, start, end = sc.segment, sc.offset, sc.offset + sc.clen
        if segment != -2:
            out.append(self._run(segment, start, end))
        return out

    def _run(self, segment: int, start: int, end: int) -> bytes | memoryview:
        if segment >= 0:
            return memoryview(self._segments[segment])[start:end]
        return self._pread(start, end)

    def _pread(self, start: int, end: int) -> bytes:
        assert self._file is not None
        data = os.pread(self._file.fileno(), end - start, start)
        if len(data) != end - start:
            raise OSError(f"spill file: short read at {start} ({len(data)} of {end - start} bytes)")
        return data

    @property
    def spilled_bytes(self) -> int:
        """Compressed bytes that went to the spill file (over the memory budget)."""
        return self._pos

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._segments.clear()  # (views handed out keep theirs alive)
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "ChunkSpill":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

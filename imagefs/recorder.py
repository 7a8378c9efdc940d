"""Record what a workload reads first: the raw material of a startup profile.

A mount that records notes, for every chunk, the first time any file read touched it
(which chunk, which file, how long after the first read), in that order. That is what
:mod:`indexer.profile` stores and :mod:`imagefs.replay` streams at the next cold start.

Why it is cheap enough to leave on: a read already knows its inode and byte range; the
recorder turns them into chunk numbers by arithmetic on the index and checks one byte
per chunk in a table as large as the image's chunk count (30,000 chunks for the torch
image: 30 KB). A chunk already seen costs one lookup; nothing is allocated for it.

The page cache decides what reaches us: on a fresh mount every first read of a page
reaches the file system, so a recording on a fresh mount sees everything the workload
touches (and what the kernel's readahead asks for around it).

When recording stops: when nothing new has been read for ``quiet_s`` (the workload is
up and idle), after ``max_s`` in all, after ``max_chunks`` chunks, or when the mount
ends, whichever comes first.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from indexer.index import Index
from indexer.profile import Profile, entries_from


class Recorder:
    """First accesses of the chunks of one index, in order."""

    def __init__(self, index: Index, *, quiet_s: float = 10.0, max_s: float = 300.0, max_chunks: int = 1 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = index
        self.quiet_s = quiet_s
        self.max_s = max_s
        self.max_chunks = max_chunks
        self._clock = clock
        self._seen = bytearray(index.n_chunks)
        self.records: list[tuple[int, int, int]] = []  # (chunk number, inode, ms after the first read)
        self.started = clock()
        self._t0: float | None = None  # the first read
        self._last = self.started  # the last read of a new chunk
        self.stopped: str | None = None  # why recording stopped, once it has

    def saw(self, ino: int, offset: int, size: int) -> None:
        """A read of ``size`` bytes at ``offset`` of regular file ``ino``."""
        if self.stopped is not None:
            return
        self.saw_chunks(ino, self.index.chunk_numbers(ino, offset, size))

    def saw_chunks(self, ino: int, numbers: Iterable[int]) -> None:
        """Reads of chunks by number (for readers that do not go by file and offset)."""
        if self.stopped is not None:
            return
        seen = self._seen
        now: float | None = None
        for n in numbers:
            if not seen[n]:
                seen[n] = 1
                if now is None:
                    now = self._clock()
                    if self._t0 is None:
                        self._t0 = now
                    self._last = now
                self.records.append((n, ino, int((now - self._t0) * 1000)))
        if len(self.records) >= self.max_chunks:
            self.stop("chunk bound")

    def due(self) -> str | None:
        """Why recording should stop now, if it should (checked by a timer)."""
        if self.stopped is not None:
            return self.stopped
        now = self._clock()
        if now - self.started >= self.max_s:
            return "time bound"
        if self._t0 is not None and now - self._last >= self.quiet_s:
            return "quiet"
        return None

    def stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason

    def profile(self) -> Profile:
        """What was recorded, as a one-recording profile of the index. Reads that came by
        chunk number (EROFS's blob) are given the first file that holds the chunk."""
        records = self.records
        if any(ino == 0 for _c, ino, _t in records):
            owner = _chunk_owners(self.index, {c for c, ino, _t in records if ino == 0})
            records = [(c, ino or owner.get(c, 0), t) for c, ino, t in records]
        return Profile(self.index.digest, entries_from(records))

    def as_dict(self) -> dict[str, object]:
        return {"state": "recording" if self.stopped is None else f"stopped ({self.stopped})",
                "chunks": len(self.records)}


def _chunk_owners(index: Index, wanted: set[int]) -> dict[int, int]:
    """chunk number -> the first regular file (inode order) that holds it, for ``wanted``."""
    import stat

    owner: dict[int, int] = {}
    for node in index.inodes():
        if not stat.S_ISREG(node.mode) or node.size == 0:
            continue
        for c in index.file_chunk_numbers(node.ino):
            if c in wanted and c not in owner:
                owner[c] = node.ino
        if len(owner) == len(wanted):
            break
    return owner

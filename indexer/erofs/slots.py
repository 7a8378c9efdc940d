"""The virtual blob: a fixed, aligned slot for every distinct chunk of an index.

An EROFS mount of an image keeps its file data on an extra device, the *blob*, which
is not a file on disk but one that the imagefs daemon serves over FUSE. Chunk-based
EROFS files point into it by block address, so the blob's address space is laid out
once per index, here, and both sides use this one map: the metadata writer to fill in
chunk indexes, the daemon to turn a read of the blob back into chunks.

Layout: chunk ``n`` of the index (its chunk-table number; identical chunks are one
entry, so they share one slot and their bytes exist once) gets the slot
``[start(n), start(n) + slot_size(n))``. A slot's size is the smallest power of two
that holds the chunk (at least one 4 KiB block) and its start is a multiple of its
size, so a kernel read that stays within a chunk never straddles two slots, and a
slot's place follows from the chunk alone: files with different chunk sizes, when an
index has them, need nothing else here. Slots follow chunk-table order, which is
tree order (the order packs are laid out in), so the chunks of one file, and small
files of one directory, sit next to each other in the blob. Bytes between ``start +
ulen`` and the next slot are zeros that no EROFS file maps.

The reverse lookup (blob offset -> chunk number) is one C-level bisection over an
``array`` of slot starts: about a microsecond, with no per-chunk Python objects, on
the path of every blob read. The chunk number is what a profile recorder needs too.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from typing import TYPE_CHECKING, Sequence

from indexer.erofs.ondisk import BLOCK_BITS, BLOCK_SIZE, NULL_ADDR

if TYPE_CHECKING:
    from indexer.index import Index


class SlotSpaceError(ValueError):
    """The index's chunks do not fit the blob's 32-bit block address space."""


def slot_size(ulen: int) -> int:
    """The slot a chunk of ``ulen`` bytes gets: a power of two, at least one block."""
    return max(BLOCK_SIZE, 1 << (max(ulen, 1) - 1).bit_length())


class SlotMap:
    """Chunk number <-> blob offset for one index."""

    __slots__ = ("starts", "ulens", "size")

    def __init__(self, ulens: Sequence[int]) -> None:
        starts = array("Q")
        pos = 0
        for ulen in ulens:
            size = slot_size(ulen)
            pos = (pos + size - 1) & ~(size - 1)
            starts.append(pos)
            pos += size
        # Never empty: a device of zero blocks is not worth a special case anywhere.
        self.size = max(pos, BLOCK_SIZE)
        if self.size >> BLOCK_BITS >= NULL_ADDR:
            raise SlotSpaceError(f"{len(ulens)} chunks need {self.size} bytes of blob, more than EROFS's "
                                 f"32-bit block addresses reach ({NULL_ADDR << BLOCK_BITS})")
        self.starts = starts
        self.ulens = array("Q", ulens)

    @classmethod
    def of_index(cls, index: "Index") -> "SlotMap":
        return cls(index.chunk_ulens())

    def __len__(self) -> int:
        return len(self.starts)

    def offset(self, chunk_no: int) -> int:
        """Where chunk ``chunk_no``'s bytes start in the blob."""
        return self.starts[chunk_no]

    def block(self, chunk_no: int) -> int:
        """The blob block address of chunk ``chunk_no`` (what a chunk index holds)."""
        return self.starts[chunk_no] >> BLOCK_BITS

    def locate(self, offset: int) -> tuple[int, int, int]:
        """``(chunk number, offset in the chunk, bytes of the chunk from there)`` at a
        blob offset; chunk number -1 (and the bytes of zeros up to the next slot) when
        ``offset`` falls in no chunk's bytes."""
        i = bisect_right(self.starts, offset) - 1
        if i < 0:
            return -1, 0, (self.starts[0] if self.starts else self.size) - offset
        inside = offset - self.starts[i]
        left = self.ulens[i] - inside
        if left > 0:
            return i, inside, left
        nxt = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
        return -1, 0, nxt - offset


__all__ = ["SlotMap", "SlotSpaceError", "slot_size"]

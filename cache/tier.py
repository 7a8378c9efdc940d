"""The one interface every tier of the chunk chain answers to.

A tier holds verified chunk bytes by digest. ``get`` returns the uncompressed,
verified bytes or None on a miss; it never returns bytes it has not verified.
``put`` offers bytes that the caller has verified; a tier may decline (full, read-only).
Tiers are synchronous and thread-safe; the async chain runs them in worker threads
where they block (disk, network).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from cache.chunk import ChunkRef


class Tier(Protocol):
    name: str

    def get(self, ref: ChunkRef) -> bytes | None:
        """Verified bytes of ``ref``, or None if this tier does not have them."""

    def put(self, ref: ChunkRef, data: bytes) -> None:
        """Keep verified ``data`` for ``ref`` (best effort)."""


class ChunkReader(Protocol):
    """What the filesystem asks of the cache layer: chunks, by reference.

    ``neighbours`` are chunks stored right after ``ref`` in the same pack that the
    caller expects to need soon; a fetch from the blob store may bring them in the
    same ranged read and keep them in the tiers above.
    """

    async def get(self, ref: ChunkRef, neighbours: Sequence[ChunkRef] = ()) -> bytes: ...

"""Background prefetch: bring an image's chunks to the host while it starts.

A cold container reads files one after another, and each miss costs a blob-store
round trip (~200 ms in the cloud). Prefetching the image in pack order (tree order)
with a few ranged reads in flight turns those round trips into a stream that runs
ahead of the workload; the chain serves demand reads first, so prefetch only uses
what demand leaves. Without a profile every chunk is a candidate, in layout order,
up to a budget (a share of the SSD tier, so prefetch never evicts what it fetched).

With an AZ cache the prefetch stands by until a fetch has to go past the zone's
cache to the blob store, or the zone's cache says it read chunks through
(:meth:`cache.chain.ChunkChain.wait_until_prefetch_pays`): a warm zone cache answers
misses in ~1 ms, and the prefetch would only take CPU from the workload.
"""

from __future__ import annotations

import logging
import time

from cache.chain import ChunkChain
from cache.chunk import ChunkRef
from indexer.index import Index

log = logging.getLogger(__name__)


def plan(index: Index, budget: int) -> list[ChunkRef]:
    """The chunks to prefetch, in chunk-table (pack) order, within ``budget`` compressed bytes."""
    refs: list[ChunkRef] = []
    total = 0
    for ref in index.all_chunks():
        if total + ref.clen > budget:
            break
        refs.append(ref)
        total += ref.clen
    return refs


class Progress:
    """Where a mount's prefetch stands, for ``imagefs stats``: ``state`` is ``pending``
    (waiting for the mount to answer), ``standby`` (the AZ cache answers every miss),
    ``running``, ``done`` or ``failed``; ``planned``
    chunks in the plan, ``fetched`` of them brought in by the prefetch (chunks already
    held locally, or brought by demand reads, are not counted)."""

    __slots__ = ("state", "planned", "fetched")

    def __init__(self) -> None:
        self.state = "pending"
        self.planned = 0
        self.fetched = 0

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state, "planned": self.planned, "fetched": self.fetched}


async def prefetch_image(index: Index, chain: ChunkChain, budget: int, progress: Progress | None = None) -> int:
    """Prefetch ``index``'s chunks into the local tiers; returns how many were fetched."""
    import trio

    progress = progress or Progress()
    progress.state = "standby"
    await chain.wait_until_prefetch_pays()
    progress.state = "running"
    refs = await trio.to_thread.run_sync(plan, index, budget)  # ~50 ms for 30k chunks: off the loop
    progress.planned = len(refs)
    if not refs:
        progress.state = "done"
        return 0
    start = time.monotonic()
    fetched = progress.fetched = await chain.prefetch(refs)
    progress.state = "done"
    log.info("prefetched %d of %d chunks (%.1f MiB compressed planned) in %.1f s", fetched, len(refs),
             sum(r.clen for r in refs) / (1 << 20), time.monotonic() - start)
    return fetched

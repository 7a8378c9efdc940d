"""Background fetching: what a mount brings to the host besides what its readers ask for.

The policy, in order:

1. **The startup profile** (:mod:`imagefs.replay`), when the image has one: exactly the
   chunks its workload read first, streamed in that order from the moment the daemon
   starts.
   Its SSD copies are written once the workload is quiet (memory holds them until then).
2. **The rest of the image**, up to a budget (a share of the SSD tier, so prefetch
   never evicts what it fetched), in pack order. After a profile it is worth having but
   never worth the workload's CPU or link: it starts once no demand read has gone below
   memory for a quiet period, reads one range at a time, and pauses whenever a demand
   read is fetching. Without a profile it is what hides the blob store's round trips
   from a cold workload that reads files one after another, so it starts as soon as
   the mount answers and runs a few ranged reads at once (today's first start).

With an AZ cache the prefetch stands by until a fetch has to go past the zone's
cache to the blob store, or the zone's cache says it read chunks through
(:meth:`cache.chain.ChunkChain.wait_until_prefetch_pays`): a warm zone cache answers
misses in ~1 ms, and the prefetch would only take CPU from the workload.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Container

import trio

from cache.chain import ChunkChain
from cache.chunk import ChunkRef
from indexer.index import Index

log = logging.getLogger(__name__)


def plan(index: Index, budget: int, exclude: Container[bytes] = ()) -> list[ChunkRef]:
    """The chunks to prefetch, in chunk-table (pack) order, within ``budget`` compressed
    bytes, leaving out the digests in ``exclude``."""
    refs: list[ChunkRef] = []
    total = 0
    for ref in index.all_chunks():
        if ref.digest in exclude:
            continue
        if total + ref.clen > budget:
            break
        refs.append(ref)
        total += ref.clen
    return refs


class Progress:
    """Where a mount's prefetch stands, for ``imagefs stats``: ``state`` is ``pending``
    (waiting for the mount to answer), ``standby`` (the AZ cache answers every miss),
    ``running``, then ``done`` (every chunk it fetched is on the SSD tier), ``incomplete``
    (some could not be fetched or stored) or ``failed`` (none could be stored, or an
    error ended it); ``planned`` chunks in the plan, ``fetched`` of them brought in by
    the prefetch (chunks already held locally, or brought by demand reads, are not
    counted), ``stored`` of those written to the SSD tier, and ``failed`` planned chunks
    that could not be fetched or stored. Why the last two: a prefetch exists to fill
    the SSD tier, and one whose every write failed (a full disk) said "done"."""

    __slots__ = ("state", "planned", "fetched", "stored", "failed")

    def __init__(self) -> None:
        self.state = "pending"
        self.planned = 0
        self.fetched = 0
        self.stored = 0
        self.failed = 0

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state, "planned": self.planned, "fetched": self.fetched, "stored": self.stored,
                "failed": self.failed}

    def finish(self) -> None:
        """Set the final state from the counts."""
        if self.planned and not self.stored:
            self.state = "failed"
        elif self.failed:
            self.state = "incomplete"
        else:
            self.state = "done"


async def prefetch_image(index: Index, chain: ChunkChain, budget: int, progress: Progress | None = None, *,
                         paced: bool = False, rate: float = 0.0, exclude: Container[bytes] = ()) -> int:
    """Prefetch ``index``'s chunks (but ``exclude``) into the local tiers; returns how
    many were fetched. ``paced``: see :meth:`cache.chain.ChunkChain.prefetch`."""
    progress = progress or Progress()
    progress.state = "standby"
    await chain.wait_until_prefetch_pays()
    progress.state = "running"
    refs = await trio.to_thread.run_sync(plan, index, budget, exclude)  # ~50 ms for 30k chunks: off the loop
    progress.planned = len(refs)
    if not refs:
        progress.state = "done"
        return 0
    start = time.monotonic()
    stored, store_failed = chain.background_stored, chain.background_store_failed
    fetch_failed = chain.stats().prefetch_failed
    fetched = progress.fetched = await chain.prefetch(refs, paced=paced, rate=rate)
    await chain.drain()  # what was fetched is only worth counting once it is on the SSD
    progress.stored = chain.background_stored - stored
    progress.failed = (chain.background_store_failed - store_failed) + (chain.stats().prefetch_failed - fetch_failed)
    progress.finish()
    log.log(logging.INFO if progress.state == "done" else logging.WARNING,
            "prefetch %s: fetched %d of %d planned chunks (%.1f MiB compressed), stored %d on the SSD tier, "
            "%d failed, in %.1f s", progress.state, fetched, len(refs), sum(r.clen for r in refs) / (1 << 20),
            progress.stored, progress.failed, time.monotonic() - start)
    return fetched


async def wait_until_quiet(chain: ChunkChain, quiet_s: float, poll: float = 0.25) -> None:
    """Return once no demand read has gone below memory for ``quiet_s`` seconds."""
    seen, since = chain.demand_cold, trio.current_time()
    while True:
        await trio.sleep(poll)
        if chain.demand_cold != seen or chain._demand_active:
            seen, since = chain.demand_cold, trio.current_time()
        elif trio.current_time() - since >= quiet_s:
            return


async def run_background(index: Index, chain: ChunkChain, store: Any, *, ready: trio.Event,
                         replay_status: Any = None, progress: Progress | None = None, budget: int = 0,
                         quiet_s: float = 5.0, cache_dir: str | None = None, rate: float = 0.0,
                         warm_root: str | None = None) -> None:
    """The policy of the module docstring. ``replay_status`` (an
    :class:`imagefs.replay.ReplayStatus`) turns the profile replay on; ``progress``
    with a ``budget`` the prefetch of the rest."""
    from imagefs import replay

    profiled = False
    if replay_status is not None:
        profiled = await replay.replay(store, index, chain, replay_status, cache_dir, warm_root=warm_root,
                                       ready=ready)
    if not profiled:
        if progress is None or budget <= 0:
            return
        await ready.wait()  # the mount answers first; prefetch never delays that
        await prefetch_image(index, chain, budget, progress)
        return
    if progress is not None:
        progress.state = "waiting for quiet"
    await wait_until_quiet(chain, quiet_s)
    await chain.save_deferred()  # the replay's SSD copies, now that the workload is quiet
    if progress is None or budget <= 0:
        return
    await prefetch_image(index, chain, budget, progress, paced=True, rate=rate)  # the replay's chunks are skipped

"""Stream a list of chunks into the local tiers, in order, a few large ranged reads at a time.

This is how a startup profile is replayed (:mod:`imagefs.replay`): the chunks a workload
will read, in the order it will read them, brought in before it asks. The physics
(DESIGN.md): a blob-store round trip costs ~200 ms whatever its size up to several MiB,
and at 1 Gbit/s the link holds ~25 MB in flight, so the stream

- merges chunks of one pack into ranges, reading over small gaps between them (a gap
  of a few hundred KiB costs milliseconds of link time; another round trip costs 200);
- issues the ranges in the order of their earliest chunk, several in flight, the first
  ones small so the first chunks arrive after one round trip, later ones large;
- claims a range's chunks in the chain's single-flight table only when the range
  starts: a demand read of a chunk on its way joins it; a demand read of a chunk whose
  range has not started fetches it itself, at once (demand never queues behind the
  stream);
- asks the zone's cache server first when there is one (as a background request, so
  the server fills itself for the zone's next host), then the blob store for the rest;
- loads what the host's SSD tier holds into memory, so a warm host replays too.

Everything here is best effort: a chunk the stream cannot bring is fetched on demand
later, as if there were no stream. :class:`StreamTracker` counts what the stream did
for ``imagefs stats``: chunks planned, brought, and how many first demand reads of
planned chunks it served or missed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import trio

from cache.chunk import ChunkRef

if TYPE_CHECKING:
    from cache.chain import ChunkChain

log = logging.getLogger(__name__)

# A range reads over gaps up to this many bytes between wanted chunks of one pack.
DEFAULT_MAX_GAP = 512 << 10
# The largest range: what the blob tier reads in one request.
DEFAULT_MAX_RANGE = 8 << 20
# The first range issued; each next one may be twice as large, up to DEFAULT_MAX_RANGE.
DEFAULT_FIRST_RANGE = 1 << 20
# Ranges in flight at once: 8 x 8 MiB covers a 1 Gbit/s x 200 ms link twice over, and
# a laid-out profile reads some runs where they are (indexer/optimize.py) besides its
# startup packs: more, shorter reads, which must not queue behind each other.
DEFAULT_IN_FLIGHT = 8
# SSD copies are loaded this many per worker-thread call, this many calls at once.
SSD_BATCH = 16
SSD_BATCHES = 2


@dataclass(frozen=True, slots=True)
class Span:
    """One ranged read: ``refs`` (one pack, offset order) and its rank (the position in
    the stream of its earliest chunk)."""

    rank: int
    refs: tuple[ChunkRef, ...]

    @property
    def pack(self) -> str:
        return self.refs[0].pack

    @property
    def start(self) -> int:
        return self.refs[0].offset

    @property
    def end(self) -> int:
        return self.refs[-1].offset + self.refs[-1].clen

    @property
    def wanted_bytes(self) -> int:
        return sum(r.clen for r in self.refs)


def plan_spans(refs: Sequence[ChunkRef], *, max_range: int = DEFAULT_MAX_RANGE, max_gap: int = DEFAULT_MAX_GAP,
               first_range: int = DEFAULT_FIRST_RANGE) -> list[Span]:
    """Ranged reads covering ``refs`` (in wanted order; repeats ignored), issued order.

    Chunks of one pack are sorted by offset and joined while the gap to the next is at
    most ``max_gap`` and the whole read at most the size allowed at its place in the
    order: ``first_range`` for the first read, doubling up to ``max_range``.
    """
    rank: dict[bytes, int] = {}
    by_pack: dict[str, list[ChunkRef]] = {}
    for i, r in enumerate(refs):
        if r.digest in rank:
            continue
        rank[r.digest] = i
        by_pack.setdefault(r.pack, []).append(r)
    # Runs joined over small gaps, whatever their length; then cut into reads, in order,
    # each at most the size allowed at its place (the ramp, then max_range).
    runs: list[list[ChunkRef]] = []
    for members in by_pack.values():
        members.sort(key=lambda r: r.offset)
        run = [members[0]]
        for r in members[1:]:
            prev_end = run[-1].offset + run[-1].clen
            if r.offset >= prev_end and r.offset - prev_end <= max_gap:
                run.append(r)
            else:
                runs.append(run)
                run = [r]
        runs.append(run)
    runs.sort(key=lambda run: min(rank[r.digest] for r in run))
    out: list[Span] = []
    limit = max(1, first_range)
    for run in runs:
        while run:
            piece = [run[0]]
            for r in run[1:]:
                if r.offset + r.clen - piece[0].offset > limit:
                    break
                piece.append(r)
            run = run[len(piece):]
            out.append(Span(min(rank[r.digest] for r in piece), tuple(piece)))
            limit = min(max_range, limit * 2)
    out.sort(key=lambda s: s.rank)
    return out


class StreamTracker:
    """What one stream did, and what it did for demand reads (single-threaded: trio).

    ``pending`` digests are planned and not brought yet; ``brought`` were brought by the
    stream and not read since. The chain calls :meth:`hit`, :meth:`joined` and
    :meth:`cold` on each demand get, so ``served`` counts first demand reads of planned
    chunks the stream answered (from memory, or by a read already on its way) and
    ``missed`` those that had to fetch the chunk themselves.
    """

    __slots__ = ("state", "planned", "fetched", "held", "failed", "served", "missed", "bytes", "requests",
                 "pending", "brought", "fill_wait_s")

    def __init__(self, digests: Iterable[bytes] = ()) -> None:
        self.state = "pending"
        self.pending: set[bytes] = set()
        self.brought: set[bytes] = set()
        self.planned = 0
        self.plan(digests)
        self.fetched = 0  # brought in from below the local tiers
        self.held = 0  # already in memory or in the SSD tier (the SSD ones loaded into memory)
        self.failed = 0
        self.served = 0
        self.missed = 0
        self.bytes = 0  # compressed bytes the stream's reads moved (gaps included)
        self.requests = 0
        self.fill_wait_s = 0.0  # time reads waited for room in the SSD write-behind queue

    def plan(self, digests: Iterable[bytes]) -> None:
        """Add ``digests`` to what the stream will bring."""
        self.pending.update(digests)
        self.planned = len(self.pending) + len(self.brought)

    def arrived(self, digest: bytes) -> None:
        if digest in self.pending:
            self.pending.discard(digest)
            self.brought.add(digest)

    def hit(self, digest: bytes) -> None:
        """A demand read found ``digest`` in memory."""
        if digest in self.brought:
            self.brought.discard(digest)
            self.served += 1

    def joined(self, digest: bytes) -> None:
        """A demand read waited on the stream's read of ``digest``."""
        if digest in self.pending or digest in self.brought:
            self.pending.discard(digest)
            self.brought.discard(digest)
            self.served += 1

    def cold(self, digest: bytes) -> None:
        """A demand read had to fetch ``digest`` itself."""
        if digest in self.pending:
            self.pending.discard(digest)
            self.missed += 1

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state, "planned": self.planned, "fetched": self.fetched, "held": self.held,
                "failed": self.failed, "served": self.served, "missed": self.missed,
                "bytes": self.bytes, "requests": self.requests, "fill_wait_s": round(self.fill_wait_s, 3)}


async def stream_chunks(chain: "ChunkChain", refs: Sequence[ChunkRef], tracker: StreamTracker, *,
                        in_flight: int = DEFAULT_IN_FLIGHT, max_range: int = DEFAULT_MAX_RANGE,
                        max_gap: int = DEFAULT_MAX_GAP, first_range: int = DEFAULT_FIRST_RANGE,
                        on_arrived: Callable[[list[bytes]], None] | None = None) -> None:
    """Bring ``refs`` into the chain's local tiers, in order (see the module docstring).

    ``on_arrived`` is told (on the trio thread) the digests each read brought, and those
    of ``refs`` that were already held. Returns when every chunk is held or has failed;
    cancelling stops it cleanly (chunks of reads in flight are released to whoever waits
    for them)."""
    tracker.state = "running"
    tell = on_arrived or (lambda digests: None)
    todo = [r for r in refs if not chain.held_locally(r.digest)]
    tracker.held += len(refs) - len(todo)
    held_now = [r.digest for r in refs if chain.held_locally(r.digest)]
    if held_now:
        tell(held_now)
    if chain.ssd is not None and todo:
        on_ssd = await chain.ssd_holds(todo)
        if on_ssd:
            ssd_refs = [r for r in todo if r.digest in on_ssd]
            todo = [r for r in todo if r.digest not in on_ssd]
        else:
            ssd_refs = []
    else:
        ssd_refs = []
    spans = plan_spans(todo, max_range=max_range, max_gap=max_gap, first_range=first_range)
    slots = trio.Semaphore(max(1, in_flight))
    async with trio.open_nursery() as nursery:
        if ssd_refs:
            nursery.start_soon(_load_from_ssd, chain, ssd_refs, tracker, tell)
        for span in spans:
            await slots.acquire()
            nursery.start_soon(_run_span, chain, span, tracker, slots, tell)
    tracker.state = "done"


async def _load_from_ssd(chain: "ChunkChain", refs: Sequence[ChunkRef], tracker: StreamTracker,
                         tell: Callable[[list[bytes]], None]) -> None:
    """Read the SSD tier's copies into memory, in order, a batch per worker thread and a
    few batches at once (one thread hop per chunk would cost more than the read)."""
    slots = trio.Semaphore(SSD_BATCHES)

    async def batch(part: Sequence[ChunkRef]) -> None:
        try:
            got = await chain.load_from_ssd(part)
            for d in got:
                tracker.held += 1
                tracker.arrived(d)
            tell(got)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for i in range(0, len(refs), SSD_BATCH):
            await slots.acquire()
            nursery.start_soon(batch, refs[i:i + SSD_BATCH])


async def _run_span(chain: "ChunkChain", span: Span, tracker: StreamTracker, slots: trio.Semaphore,
                    tell: Callable[[list[bytes]], None]) -> None:
    try:
        t0 = trio.current_time()
        await chain.wait_for_fill_room()
        tracker.fill_wait_s += trio.current_time() - t0
        claimed = chain.claim_background(span.refs)
        if not claimed:
            return
        got: dict[bytes, bytes] = {}
        try:
            got, moved, requests = await chain.fetch_span_below([r for r, _f in claimed])
            tracker.bytes += moved
            tracker.requests += requests
        except Exception as e:  # best effort: demand reads fetch what we could not
            log.debug("stream: %s..%s of %s: %r", span.start, span.end, span.pack, e)
        finally:
            chain.settle_background(claimed, got)
        for r, _f in claimed:
            if r.digest in got:
                tracker.fetched += 1
                tracker.arrived(r.digest)
            else:
                tracker.failed += 1
        tell([r.digest for r, _f in claimed if r.digest in got])
    finally:
        slots.release()


__all__ = ["Span", "plan_spans", "StreamTracker", "stream_chunks"]

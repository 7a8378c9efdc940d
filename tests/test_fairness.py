"""The parts that keep a zone fair and the store safe, on their own and in the chain
(trio's MockClock: waits are counted, never timed):

- :class:`~cache.classlimit.ClassLimiter`: demand before background, background within
  its share, a queued background claim promoted when demand joins it;
- :class:`~cache.storebudget.StoreBudget`: a burst, then a rate; background reads leave
  a reserve to demand;
- the chain: what the zone lacks goes to the store within the budget, asking the zone
  again after each wait; a slow zone tier that bounds its own waits gets no batch
  deadline; a verifying tier's rejected chunks show as its tier's ``corrupt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest
import trio
import trio.testing

from cache.blobtier import BlobTier
from cache.chain import ChunkChain
from cache.chunk import ChunkRef
from cache.classlimit import ClassLimiter, Ticket
from cache.memory import MemoryTier
from cache.storebudget import StoreBudget, parse_budget
from tests.support.chunks import CountingStore, random_chunks, write_pack


def mock_run(fn):  # type: ignore[no-untyped-def]
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


# ---- ClassLimiter -------------------------------------------------------------------

def test_demand_is_served_before_background_and_background_keeps_to_its_share() -> None:
    order: list[str] = []

    async def main() -> None:
        lim = ClassLimiter(total=3, background_max=2)
        holders = [Ticket(False), Ticket(False)]
        for t in holders:
            await lim.acquire(t)
        assert lim.in_use == 2 and lim.background_in_use == 2
        async with trio.open_nursery() as n:
            async def want(name: str, demand: bool) -> None:
                t = Ticket(demand)
                await lim.acquire(t)
                order.append(name)
                await trio.sleep(1)
                lim.release(t)

            n.start_soon(want, "bg-late", False)  # the background share is full: it waits
            await trio.sleep(0.1)
            assert lim.waiting == (0, 1)
            n.start_soon(want, "demand", True)  # a slot is kept for demand: at once
            await trio.sleep(0.1)
            assert order == ["demand"]
            for t in holders:
                lim.release(t)
        assert order == ["demand", "bg-late"]

    mock_run(main)


def test_waiting_demand_goes_first_and_a_promoted_claim_moves_ahead() -> None:
    order: list[str] = []

    async def main() -> None:
        lim = ClassLimiter(total=1, background_max=1)
        first = Ticket(True)
        await lim.acquire(first)
        promoted = Ticket(False)
        async with trio.open_nursery() as n:
            async def want(name: str, t: Ticket) -> None:
                await lim.acquire(t)
                order.append(name)
                lim.release(t)

            n.start_soon(want, "bg-1", Ticket(False))
            await trio.sleep(0.1)
            n.start_soon(want, "bg-2 (promoted)", promoted)
            await trio.sleep(0.1)
            n.start_soon(want, "demand", Ticket(True))
            await trio.sleep(0.1)
            assert lim.waiting == (1, 2)
            lim.promote(promoted)  # a demand request joined the read behind this claim
            assert lim.waiting == (2, 1)
            lim.release(first)
        assert order == ["demand", "bg-2 (promoted)", "bg-1"]

    mock_run(main)


def test_a_cancelled_wait_holds_no_slot() -> None:
    async def main() -> None:
        lim = ClassLimiter(total=1, background_max=1)
        t = Ticket(True)
        await lim.acquire(t)
        with trio.move_on_after(1):
            await lim.acquire(Ticket(True))
        assert lim.waiting == (0, 0)
        lim.release(t)
        assert lim.in_use == 0

    mock_run(main)


# ---- StoreBudget ---------------------------------------------------------------------

def test_store_budget_is_a_burst_then_a_rate_with_a_reserve_for_demand() -> None:
    now = [0.0]
    b = StoreBudget(4, 2.0, clock=lambda: now[0])
    assert [b.take(background=True) for _ in range(2)] == [0.0, 0.0]  # down to the reserve (2)
    assert b.take(background=True) == pytest.approx(0.5)  # background waits for a token above it
    assert [b.take() for _ in range(2)] == [0.0, 0.0]  # demand may spend the reserve
    assert b.take() == pytest.approx(0.5)
    now[0] += 0.5
    assert b.take() == 0.0
    now[0] += 100
    assert b.tokens() == 4  # never more than the burst
    assert (b.taken, b.waited) == (5, 2)
    assert parse_budget("8") == (8, 16.0) and parse_budget("8,0.5") == (8, 0.5)
    for bad in ("", "0", "x,1", "4,0", "4,-1"):
        with pytest.raises(ValueError):
            parse_budget(bad)


# ---- the chain -----------------------------------------------------------------------

class DownZone:
    """A zone tier whose servers are all down: no request, nothing back."""

    name = "az"
    bounds_waits = True

    def __init__(self) -> None:
        self.up = False
        self.calls = 0
        self.chunks: dict[bytes, bytes] = {}

    def healthy(self) -> bool:
        return self.up

    async def fetch(self, refs: Sequence[ChunkRef], *, background: bool = False) -> dict[bytes, bytes]:
        self.calls += 1
        return {r.digest: self.chunks[r.digest] for r in refs if r.digest in self.chunks}


def test_the_zone_down_every_read_completes_within_the_store_budget(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path / "store"))
    chunks = [random_chunks(1, 20_000, seed=i)[0] for i in range(12)]
    refs = [write_pack(store, [c])[0] for c in chunks]  # a pack each: one store read each
    zone = DownZone()
    chain = ChunkChain(BlobTier(store), None, MemoryTier(1 << 20), remote_tiers=[zone],
                       store_budget=StoreBudget(3, 2.0))

    async def main() -> float:
        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            for r, c in zip(refs[:8], chunks[:8]):
                async def get(r: ChunkRef = r, c: bytes = c) -> None:
                    assert await chain.get(r) == c
                n.start_soon(get)
        elapsed = trio.current_time() - t0
        # The zone comes back: the reads waiting for the budget go to it, not the store.
        zone.up = True
        zone.chunks = {r.digest: c for r, c in zip(refs[8:], chunks[8:])}
        for r, c in zip(refs[8:], chunks[8:]):
            assert await chain.get(r) == c
        return elapsed

    elapsed = mock_run(main)
    s = chain.stats()
    assert store.range_reads == 8 == s.direct_reads
    assert elapsed == pytest.approx((8 - 3) / 2.0, abs=0.5), "a burst of 3, then 2 a second"
    assert s.direct_waits > 0
    assert zone.calls == 4, "the zone was not asked while it had no server; then it served the rest"


class SlowZone:
    """A zone tier that takes 10 s (of mock time) to answer, as a server reading a
    burst through from a slow store does, and says it bounds its waits."""

    name = "az"
    verifies = True
    bounds_waits = True
    corrupt = 0

    def __init__(self, chunks: dict[bytes, bytes]) -> None:
        self.chunks = chunks

    async def fetch(self, refs: Sequence[ChunkRef], *, background: bool = False) -> dict[bytes, bytes]:
        await trio.sleep(10)
        self.corrupt += 1  # and it dropped one bad frame on the way
        return {r.digest: self.chunks[r.digest] for r in refs if r.digest in self.chunks}


def test_a_slow_zone_that_bounds_its_waits_gets_no_batch_deadline(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path / "store"))
    chunks = random_chunks(2, 20_000, seed=3)
    refs = write_pack(store, chunks)
    chain = ChunkChain(BlobTier(store), None, MemoryTier(1 << 20), remote_timeout=2.0,
                       remote_tiers=[SlowZone({r.digest: c for r, c in zip(refs, chunks)})])

    async def main() -> None:
        assert await chain.get(refs[0]) == chunks[0]

    mock_run(main)
    assert store.range_reads == 0, "waited for the zone instead of going to the store at the 2 s timeout"
    s = chain.stats()
    assert s.direct_reads == 0 and s.tier("az").hits >= 1
    assert s.tier("az").corrupt == 1, "the tier's own rejections show as az.corrupt"


class JustDownZone(DownZone):
    """A zone whose servers all went down ``down_for`` seconds ago (mock time)."""

    def __init__(self, since: float) -> None:
        super().__init__()
        self.since = since

    def unhealthy_for(self) -> float:
        return 0.0 if self.up else trio.current_time() - self.since


def test_background_reads_wait_for_a_zone_that_just_went_down(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path / "store"))
    chunks = random_chunks(4, 20_000, seed=8)
    refs = write_pack(store, chunks)

    async def main() -> tuple[int, int, float]:
        zone = JustDownZone(trio.current_time() - 1)  # its last server went down a second ago
        chain = ChunkChain(BlobTier(store), None, MemoryTier(1 << 20), remote_tiers=[zone])
        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            n.start_soon(chain.prefetch, refs[1:])
            await trio.sleep(5)  # the server is restarted 5 s later (6 s after it went down)
            assert store.range_reads == 0, "the prefetch did not go to the store meanwhile"
            assert await chain.get(refs[0]) == chunks[0]  # a demand read does, within the budget
            assert store.range_reads == 1
            zone.up = True
            zone.chunks = {r.digest: c for r, c in zip(refs, chunks)}
        s = chain.stats()
        return s.prefetched, s.direct_waits, trio.current_time() - t0

    # (The clock jumps only after 50 ms of real idleness: with a zero threshold it would
    # race through the 30 s grace while the demand read runs in a worker thread.)
    prefetched, held, took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.05))
    assert prefetched == 3 and store.range_reads == 1, "the prefetch came through the zone once it was back"
    assert held > 0 and took < 6

    async def long_down() -> int:
        zone = JustDownZone(trio.current_time() - 60)  # down for a minute: not coming back soon
        chain = ChunkChain(BlobTier(store), None, MemoryTier(1 << 20), remote_tiers=[zone])
        return await chain.prefetch(refs[1:])

    before = store.range_reads
    assert mock_run(long_down) == 3 and store.range_reads == before + 1, "then background uses the budget"


def test_a_profile_replay_span_waits_for_a_zone_that_just_went_down(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path / "store"))
    chunks = random_chunks(4, 20_000, seed=9)
    refs = write_pack(store, chunks)

    async def main() -> dict[bytes, bytes]:
        zone = JustDownZone(trio.current_time() - 1)
        chain = ChunkChain(BlobTier(store), None, MemoryTier(1 << 20), remote_tiers=[zone])
        async with trio.open_nursery() as n:
            result: dict[bytes, bytes] = {}

            async def span() -> None:
                result.update((await chain.fetch_span_below(refs))[0])

            n.start_soon(span)
            await trio.sleep(5)
            assert store.range_reads == 0, "the replay did not go around the zone to the store"
            zone.up = True
            zone.chunks = {r.digest: c for r, c in zip(refs, chunks)}
        return result

    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.05))
    assert got == {r.digest: c for r, c in zip(refs, chunks)} and store.range_reads == 0

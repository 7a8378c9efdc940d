"""The blob tier and the read-through chain against real packs in a real LocalStore
(and a real SSD tier on disk): ranged reads, single flight, demand before prefetch,
retries, verification at every step, write-behind fills."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import pytest
import trio
import trio.testing

from cache.blobtier import BlobTier
from cache.chain import ChunkChain, ChunkUnavailable
from cache.chunk import ChunkRef, CorruptChunk, digest_of
from cache.localstore import LocalStore
from cache.memory import MemoryTier
from cache.ssd import SSDTier
from tests.support.chunks import CountingStore, overwrite_in_pack, random_chunks, write_pack

KIB = 1024


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


def lying(ref: ChunkRef) -> ChunkRef:
    """A ref whose digest does not match what its pack range holds (an index/pack
    mismatch): the bytes decompress fine but must never be served."""
    return dataclasses.replace(ref, digest=digest_of(b"something else " + ref.digest))


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(str(tmp_path / "store"))


# ---- blob tier -------------------------------------------------------------------

def test_blob_reads_contiguous_neighbours_in_one_range(store: CountingStore) -> None:
    chunks = random_chunks(8, 64 * KIB)
    refs = write_pack(store, chunks)
    blob = BlobTier(store)
    got = blob.fetch(refs[0], refs[1:])
    assert got == {r.digest: c for r, c in zip(refs, chunks)}
    assert store.calls == [(refs[0].pack, 0, refs[-1].offset + refs[-1].clen)]
    s = blob.stats()
    assert (s.requests, s.hits, s.bytes) == (1, 8, refs[-1].offset + refs[-1].clen)


def test_blob_range_stops_at_gap_other_pack_and_max_range(store: CountingStore) -> None:
    chunks = random_chunks(4, 64 * KIB, seed=1)
    refs = write_pack(store, chunks)
    other = write_pack(store, random_chunks(1, 64 * KIB, seed=2))
    blob = BlobTier(store)
    assert set(blob.fetch(refs[0], [refs[1], refs[3]])) == {refs[0].digest, refs[1].digest}
    assert store.calls[-1] == (refs[0].pack, 0, refs[0].clen + refs[1].clen)
    assert set(blob.fetch(refs[2], [other[0]])) == {refs[2].digest}
    small = BlobTier(store, max_range=refs[1].clen + refs[2].clen)
    assert set(small.fetch(refs[1], refs[2:])) == {refs[1].digest, refs[2].digest}
    assert blob.stats().requests == 2 and small.stats().requests == 1


def test_blob_drops_a_corrupt_neighbour_and_refuses_a_corrupt_chunk(store: CountingStore) -> None:
    chunks = random_chunks(3, 64 * KIB, seed=3)
    refs = write_pack(store, chunks)
    blob = BlobTier(store)
    got = blob.fetch(refs[0], [lying(refs[1]), refs[2]])
    assert got == {refs[0].digest: chunks[0], refs[2].digest: chunks[2]}
    assert blob.stats().corrupt == 1
    before = store.range_reads
    overwrite_in_pack(store, refs[1], b"\x00" * refs[1].clen)  # real damage on disk
    with pytest.raises(CorruptChunk, match=refs[1].hex[:16]):
        blob.fetch(refs[1], [refs[2]])
    assert store.range_reads - before == 2  # the range, then the chunk once more by itself


class FlipOnceStore(CountingStore):
    """Damages the first ranged read it serves (a transfer error), then behaves."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.flipped = False

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = super().get_range(key, offset, length)
        if not self.flipped:
            self.flipped = True
            data = data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]
        return data


def test_blob_rereads_a_chunk_damaged_in_transit(tmp_path: Path) -> None:
    store = FlipOnceStore(str(tmp_path / "store"))
    chunks = random_chunks(2, 64 * KIB, seed=4)
    refs = write_pack(store, chunks)
    assert BlobTier(store).fetch(refs[0], refs[1:])[refs[0].digest] == chunks[0]
    assert store.range_reads == 2


# ---- the chain ---------------------------------------------------------------------

def make_chain(store: CountingStore, tmp_path: Path | None = None, *, memory: int = 64 << 20,
               ssd_bytes: int = 64 << 20, **kw: object) -> ChunkChain:
    ssd = SSDTier(str(tmp_path / "ssd"), ssd_bytes) if tmp_path is not None else None
    return ChunkChain(BlobTier(store), ssd, MemoryTier(memory), **kw)  # type: ignore[arg-type]


def test_single_flight_64_concurrent_gets_one_range_read(store: CountingStore, tmp_path: Path) -> None:
    store.delay = 0.05
    chunk = random_chunks(1, 256 * KIB, seed=5)[0]
    ref = write_pack(store, [chunk])[0]
    chain = make_chain(store, tmp_path)
    results: list[bytes] = []

    async def main() -> None:
        async def one() -> None:
            results.append(await chain.get(ref))
        async with trio.open_nursery() as n:
            for _ in range(64):
                n.start_soon(one)
        await chain.drain()

    run(main)
    assert results == [chunk] * 64
    assert store.range_reads == 1
    s = chain.stats()
    assert s.gets == 64 and s.joined == 63 and s.fetches == 1
    assert chain.ssd is not None and chain.ssd.contains(ref.digest)


def test_neighbours_come_in_one_read_and_are_then_served_locally(store: CountingStore, tmp_path: Path) -> None:
    chunks = random_chunks(8, 64 * KIB, seed=6)
    refs = write_pack(store, chunks)
    # Memory holds one chunk only: the neighbours must come back from the SSD.
    chain = make_chain(store, tmp_path, memory=64 * KIB)

    async def main() -> None:
        assert await chain.get(refs[0], refs[1:]) == chunks[0]
        await chain.drain()
        for r, c in zip(refs[1:], chunks[1:]):
            assert await chain.get(r, refs[refs.index(r) + 1:]) == c

    run(main)
    assert store.range_reads == 1
    s = chain.stats()
    assert s.tier("ssd").hits == 7
    assert s.tier("blob").hits == 8


def test_a_neighbour_being_fetched_counts_as_in_flight(store: CountingStore) -> None:
    store.delay = 0.2
    chunks = random_chunks(6, 32 * KIB, seed=7)
    refs = write_pack(store, chunks)
    chain = make_chain(store)
    got: dict[int, bytes] = {}

    async def main() -> None:
        async def get(i: int, neighbours: Sequence[ChunkRef]) -> None:
            got[i] = await chain.get(refs[i], neighbours)
        async with trio.open_nursery() as n:
            n.start_soon(get, 0, refs[1:])
            await trio.sleep(0.05)  # the range read is under way
            n.start_soon(get, 3, refs[4:])
            n.start_soon(get, 5, ())

    run(main)
    assert got == {0: chunks[0], 3: chunks[3], 5: chunks[5]}
    assert store.range_reads == 1
    assert chain.stats().joined == 2


def test_a_range_stops_before_a_chunk_already_held(store: CountingStore) -> None:
    chunks = random_chunks(6, 32 * KIB, seed=19)
    refs = write_pack(store, chunks)
    chain = make_chain(store)

    async def main() -> None:
        assert await chain.get(refs[3]) == chunks[3]
        assert await chain.get(refs[0], refs[1:]) == chunks[0]

    run(main)
    # refs[3] is held, so the second read covers refs[0..2] only.
    assert store.calls[1] == (refs[0].pack, 0, refs[3].offset)


def test_demand_does_not_wait_behind_prefetch(store: CountingStore) -> None:
    store.delay = 0.1
    prefetch_refs = [write_pack(store, [c])[0] for c in random_chunks(8, 16 * KIB, seed=8)]
    wanted = random_chunks(1, 16 * KIB, seed=9)[0]
    demand_ref = write_pack(store, [wanted])[0]
    chain = make_chain(store, max_fetches=1, max_prefetches=1)
    took: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(chain.prefetch, prefetch_refs)
            await trio.sleep(0.05)
            t0 = trio.current_time()
            assert await chain.get(demand_ref) == wanted
            took.append(trio.current_time() - t0)

    run(main)
    keys = [k for k, _, _ in store.calls]
    assert keys.index(demand_ref.pack) <= 2  # not after the eight prefetch reads
    assert took[0] < 0.5
    assert chain.stats().prefetched == 8


def test_prefetch_brings_a_pack_in_one_read_and_fails_quietly(store: CountingStore, tmp_path: Path) -> None:
    chunks = random_chunks(8, 32 * KIB, seed=10)
    refs = write_pack(store, chunks)
    gone = write_pack(store, random_chunks(2, 32 * KIB, seed=11))
    store.delete(gone[0].pack)
    chain = make_chain(store, tmp_path, retries=1, backoff=0.01)

    async def main() -> None:
        assert await chain.prefetch(refs) == 8
        assert await chain.prefetch(gone) == 0
        reads = store.range_reads
        for r, c in zip(refs, chunks):
            assert await chain.get(r) == c
        assert store.range_reads == reads
        assert await chain.prefetch(refs) == 0  # all held already: nothing to read
        assert store.range_reads == reads
        await chain.aclose()

    run(main)
    s = chain.stats()
    assert s.prefetched == 8 and s.prefetch_failed == 2
    assert s.tier("memory").hits == 8


def test_missing_pack_raises_chunk_unavailable_after_retries(store: CountingStore) -> None:
    ref = write_pack(store, random_chunks(1, 16 * KIB, seed=12))[0]
    store.delete(ref.pack)
    chain = make_chain(store, retries=2, backoff=0.01)
    errors: list[ChunkUnavailable] = []

    async def main() -> None:
        async def one() -> None:
            with pytest.raises(ChunkUnavailable) as e:
                await chain.get(ref)
            errors.append(e.value)
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(one)

    run(main)
    assert len(errors) == 3
    assert ref.hex[:16] in str(errors[0]) and "3 times" in str(errors[0])
    assert errors[0].ref == ref
    assert store.range_reads == 3  # one first try and two retries, shared by all three gets
    s = chain.stats()
    assert s.retries == 2 and s.unavailable == 1 and s.tier("blob").errors == 3


def test_a_corrupt_pack_chunk_is_never_returned(store: CountingStore, tmp_path: Path) -> None:
    chunks = random_chunks(3, 32 * KIB, seed=13)
    refs = write_pack(store, chunks)
    bad = lying(refs[1])
    damaged = write_pack(store, random_chunks(1, 32 * KIB, seed=18))[0]
    chain = make_chain(store, tmp_path, retries=1, backoff=0.01)

    async def main() -> None:
        # As a neighbour it is dropped; the good neighbour after it still arrives.
        assert await chain.get(refs[0], [bad, refs[2]]) == chunks[0]
        await chain.drain()
        assert bad.digest not in chain.memory and refs[2].digest in chain.memory
        assert chain.ssd is not None and not chain.ssd.contains(bad.digest)
        # Asked for directly, it is an error, not wrong bytes.
        with pytest.raises(ChunkUnavailable, match="corrupt"):
            await chain.get(bad)
        assert bad.digest not in chain.memory
        # Damaged on disk in the store: the same.
        overwrite_in_pack(store, damaged, b"\xff" * damaged.clen)
        with pytest.raises(ChunkUnavailable, match=damaged.hex[:16]):
            await chain.get(damaged)
        assert damaged.digest not in chain.memory

    run(main)
    assert chain.stats().tier("blob").corrupt >= 3


def test_a_corrupt_ssd_copy_is_fetched_again(store: CountingStore, tmp_path: Path) -> None:
    chunk = random_chunks(1, 128 * KIB, seed=14)[0]
    ref = write_pack(store, [chunk])[0]
    first = make_chain(store, tmp_path)

    async def fill() -> None:
        await first.get(ref)
        await first.drain()

    run(fill)
    assert first.ssd is not None
    path = Path(first.ssd.path_of(ref.digest))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    second = ChunkChain(BlobTier(store), first.ssd, MemoryTier(1 << 20))  # cold memory

    async def read() -> None:
        assert await second.get(ref) == chunk
        await second.drain()

    run(read)
    assert store.range_reads == 2
    assert second.stats().tier("ssd").corrupt == 1
    assert first.ssd.get(ref) == chunk  # refilled


class DictRemote:
    """A working remote tier: serves what it was given."""

    def __init__(self, name: str, chunks: dict[bytes, bytes]) -> None:
        self.name = name
        self.chunks = chunks
        self.calls = 0

    async def fetch(self, refs: Sequence[ChunkRef], *, background: bool = False) -> dict[bytes, bytes]:
        self.calls += 1
        await trio.sleep(0)
        return {r.digest: self.chunks[r.digest] for r in refs if r.digest in self.chunks}


class BrokenRemote:
    name = "broken"

    async def fetch(self, refs: Sequence[ChunkRef], *, background: bool = False) -> dict[bytes, bytes]:
        raise ConnectionRefusedError("cache server down")


class HangingRemote:
    name = "hanging"

    async def fetch(self, refs: Sequence[ChunkRef], *, background: bool = False) -> dict[bytes, bytes]:
        await trio.sleep_forever()
        return {}


class LyingRemote:
    name = "lying"

    async def fetch(self, refs: Sequence[ChunkRef], *, background: bool = False) -> dict[bytes, bytes]:
        return {r.digest: b"\0" * r.ulen for r in refs}


def test_failing_remote_tiers_cost_latency_not_correctness(store: CountingStore) -> None:
    chunks = random_chunks(2, 32 * KIB, seed=15)
    refs = write_pack(store, chunks)
    good = DictRemote("az", {refs[0].digest: chunks[0]})
    chain = ChunkChain(BlobTier(store), None, MemoryTier(1 << 20), remote_timeout=0.1,
                       remote_tiers=[BrokenRemote(), HangingRemote(), LyingRemote(), good])

    async def main() -> None:
        assert await chain.get(refs[0], refs[1:]) == chunks[0]  # from the good remote
        assert store.range_reads == 0
        assert await chain.get(refs[1]) == chunks[1]  # nobody remote has it: the store
        assert store.range_reads == 1

    run(main)
    s = chain.stats()
    assert s.tier("broken").errors == 2 and s.tier("hanging").errors == 2
    assert s.tier("lying").corrupt == 3 and s.tier("lying").hits == 0
    assert s.tier("az").hits == 1 and good.calls == 2
    json.dumps(s.as_dict())  # what `imagefs stats` prints


class RecordingRemote(DictRemote):
    """A working remote tier that notes what each fetch asked for."""

    def __init__(self, name: str, chunks: dict[bytes, bytes]) -> None:
        super().__init__(name, chunks)
        self.asked: list[list[ChunkRef]] = []

    async def fetch(self, refs: Sequence[ChunkRef], *, background: bool = False) -> dict[bytes, bytes]:
        self.asked.append(list(refs))
        return await super().fetch(refs, background=background)


def test_a_demand_fetch_asks_a_remote_tier_for_few_neighbours_and_the_store_for_its_range(
        store: CountingStore) -> None:
    chunks = random_chunks(4, 400 * KIB, seed=17, compressible=False)
    refs = write_pack(store, chunks)
    az = RecordingRemote("az", {refs[0].digest: chunks[0], refs[1].digest: chunks[1]})
    chain = ChunkChain(BlobTier(store), None, MemoryTier(8 << 20), remote_tiers=[az], remote_demand_bytes=1 << 20)

    async def main() -> None:
        assert await chain.get(refs[0], refs[1:]) == chunks[0]
        assert [r.digest for r in az.asked[0]] == [refs[0].digest, refs[1].digest], "~1 MiB of the run"
        assert await chain.get(refs[1], refs[2:]) == chunks[1]  # came along: no fetch
        assert len(az.asked) == 1 and store.range_reads == 0
        assert await chain.get(refs[2], refs[3:]) == chunks[2]  # the zone lacks it: the store's range
        assert store.range_reads == 1
        assert await chain.get(refs[3]) == chunks[3]  # came along with the range
        assert store.range_reads == 1

    run(main)


def test_prefetch_pays_only_once_a_fetch_goes_past_the_remote_tiers(store: CountingStore) -> None:
    chunks = random_chunks(3, 16 * KIB, seed=16)
    refs = write_pack(store, chunks)
    alone = ChunkChain(BlobTier(store), None, MemoryTier(1 << 20))
    zone = ChunkChain(BlobTier(store), None, MemoryTier(1 << 20),
                      remote_tiers=[DictRemote("az", {r.digest: c for r, c in zip(refs[:2], chunks[:2])})])

    async def main() -> None:
        with trio.fail_after(5):
            await alone.wait_until_prefetch_pays()  # no zone cache: at once
        assert await zone.get(refs[0]) == chunks[0] and await zone.get(refs[1]) == chunks[1]
        with trio.move_on_after(0.2) as waited:
            await zone.wait_until_prefetch_pays()
        assert waited.cancelled_caught, "the zone cache answered every miss: no prefetch yet"
        assert await zone.get(refs[2]) == chunks[2]  # the zone cache lacks it: the blob store
        with trio.fail_after(5):
            await zone.wait_until_prefetch_pays()

    run(main)
    assert store.range_reads == 1


class ReadingThroughRemote(DictRemote):
    """A remote tier that has every chunk but says it had to read them from the blob store."""

    read_through = 0

    async def fetch(self, refs: Sequence[ChunkRef], *, background: bool = False) -> dict[bytes, bytes]:
        got = await super().fetch(refs, background=background)
        self.read_through += len(got)
        return got


def test_prefetch_pays_once_the_remote_tier_reads_chunks_through(store: CountingStore) -> None:
    chunks = random_chunks(1, 16 * KIB, seed=18)
    refs = write_pack(store, chunks)
    zone = ChunkChain(BlobTier(store), None, MemoryTier(1 << 20),
                      remote_tiers=[ReadingThroughRemote("az", {refs[0].digest: chunks[0]})])

    async def main() -> None:
        assert await zone.get(refs[0]) == chunks[0]
        with trio.fail_after(5):
            await zone.wait_until_prefetch_pays()

    run(main)
    assert store.range_reads == 0, "the zone's cache served it: only its word says the zone is cold"


class SlowSSD(SSDTier):
    """A real SSD tier on a disk that takes its time writing."""

    def put_many(self, items):  # type: ignore[no-untyped-def]
        time.sleep(0.5)
        return super().put_many(items)


def test_write_behind_does_not_hold_up_the_reader(store: CountingStore, tmp_path: Path) -> None:
    chunks = random_chunks(2, 32 * KIB, seed=16)
    refs = write_pack(store, chunks)
    ssd = SlowSSD(str(tmp_path / "ssd"), 1 << 20)
    # A memory tier too small for either chunk: a re-read must come from the fill queue.
    chain = ChunkChain(BlobTier(store), ssd, MemoryTier(1 * KIB))
    took: list[float] = []

    async def main() -> None:
        t0 = trio.current_time()
        assert await chain.get(refs[0], refs[1:]) == chunks[0]
        assert await chain.get(refs[1]) == chunks[1]
        took.append(trio.current_time() - t0)
        assert chain.stats().fill_pending > 0
        await chain.drain()
        assert chain.stats().fill_pending == 0

    run(main)
    assert took[0] < 0.45  # well under the SSD's 0.5 s write
    assert store.range_reads == 1
    assert ssd.contains(refs[0].digest) and ssd.contains(refs[1].digest)


def test_a_cancelled_get_does_not_cancel_the_shared_fetch(store: CountingStore) -> None:
    store.delay = 0.2
    chunk = random_chunks(1, 16 * KIB, seed=17)[0]
    ref = write_pack(store, [chunk])[0]
    chain = make_chain(store)
    got: list[bytes] = []

    async def main() -> None:
        async def patient() -> None:
            got.append(await chain.get(ref))
        async with trio.open_nursery() as n:
            with trio.move_on_after(0.05) as scope:
                n.start_soon(patient)
                await chain.get(ref)  # the first caller gives up
            assert scope.cancelled_caught

    run(main)
    assert got == [chunk] and store.range_reads == 1


class PacedSSD(SSDTier):
    """A real SSD tier on a disk slower than the network: each batch takes a while."""

    def put_many(self, items):  # type: ignore[no-untyped-def]
        time.sleep(0.05)
        return super().put_many(items)


def test_prefetch_waits_for_write_behind_room_instead_of_dropping(store: CountingStore, tmp_path: Path) -> None:
    """Prefetch is background work: when the SSD is slower than the fetches, it waits
    for the write-behind queue, so everything it fetched lands on the SSD."""
    chunks = random_chunks(40, 64 * KIB, seed=21, compressible=False)
    refs = write_pack(store, chunks[:20]) + write_pack(store, chunks[20:])
    ssd = PacedSSD(str(tmp_path / "ssd"), 64 << 20)
    chain = ChunkChain(BlobTier(store, max_range=256 * KIB), ssd, MemoryTier(64 << 20),
                       max_fill_pending=256 * KIB)  # room for 4 chunks

    async def main() -> int:
        fetched = await chain.prefetch(refs)
        await chain.drain()
        return fetched

    assert trio.run(main) == 40
    s = chain.stats()
    assert s.fill_dropped == 0 and s.fill_pending == 0
    assert ssd.contains_many(r.digest for r in refs) == {r.digest for r in refs}


# ---- deadlines (issue 12: a stalled store costs a reader the deadline, no more) ------

class StalledStore(CountingStore):
    """A real LocalStore whose ranged reads hang until released, as a SIGSTOPped server
    would: the reading thread blocks, and nothing the chain does can end it."""

    def __init__(self, root: str, *, retries_itself: bool = False) -> None:
        super().__init__(root)
        self.release = threading.Event()
        self.retries_itself = retries_itself

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        with self._lock:
            self.calls.append((key, offset, length))
        self.release.wait()
        return LocalStore.get_range(self, key, offset, length)


@pytest.mark.parametrize("retries_itself", [False, True])
def test_a_stalled_store_costs_a_get_its_deadline_once(tmp_path: Path, retries_itself: bool) -> None:
    store = StalledStore(str(tmp_path / "store"), retries_itself=retries_itself)
    refs = write_pack(store, random_chunks(3, 16 * KIB, seed=30))
    chain = make_chain(store, retries=3, backoff=0.01, deadline=30.0, failure_hold=1.0)
    seen: dict[str, object] = {}

    async def main() -> None:
        t0 = trio.current_time()
        with pytest.raises(ChunkUnavailable, match=f"{refs[0].hex[:16]}.*within 30 s"):
            await chain.get(refs[0], refs[1:])
        seen["waited"] = trio.current_time() - t0
        # The kernel's immediate re-read of a failed readahead: answered at once, no new read.
        t1 = trio.current_time()
        with pytest.raises(ChunkUnavailable, match=refs[0].hex[:16]):
            await chain.get(refs[0])
        await trio.sleep(0.1)
        with pytest.raises(ChunkUnavailable, match="failed again at once"):
            await chain.get(refs[0])
        seen["hold_wait"] = trio.current_time() - t1
        await trio.sleep(1.5)  # past the hold: a real new attempt, with its own deadline
        with pytest.raises(ChunkUnavailable, match="within 30 s"):
            await chain.get(refs[0])

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        store.release.set()  # let the abandoned reading threads finish
    assert seen["waited"] == 30.0  # virtual time: exactly the deadline
    assert seen["hold_wait"] == pytest.approx(0.1)  # no wait but the test's own sleep
    for _ in range(100):  # the abandoned threads run in real time: let them record their calls
        if store.range_reads >= 2:
            break
        time.sleep(0.02)
    time.sleep(0.1)
    # One call per fetch however many retries are configured: the first, and the one after the hold.
    assert store.range_reads == 2
    assert chain.stats().unavailable == 2


def test_a_store_that_retries_itself_is_called_once_per_fetch(store: CountingStore) -> None:
    ref = write_pack(store, random_chunks(1, 16 * KIB, seed=31))[0]
    store.delete(ref.pack)
    store.retries_itself = True  # type: ignore[attr-defined]
    chain = make_chain(store, retries=3, backoff=0.01)

    async def main() -> None:
        for _ in range(2):  # a quick failure is not held: the second get tries again
            with pytest.raises(ChunkUnavailable, match="blob store failed 1 time:"):
                await chain.get(ref)

    run(main)
    assert store.range_reads == 2 and chain.stats().retries == 0

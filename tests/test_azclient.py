"""The AZ cache client against real cache-server processes: spreading by rendezvous
hashing, hedging past dead and silent servers, a slow server kept (progress, not a
deadline), recovery through the health probe, wrong bytes and wrong secrets treated as
misses (and wrong bytes reported to the server).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

import pytest
import trio

from cache.azclient import AZCacheTier, make_az_tier, parse_servers
from cache.blobtier import BlobTier
from cache.chunk import ChunkRef
from cache.localstore import LocalStore
from cache.rendezvous import Rendezvous
from tests.support.cacheserver import (CacheServerProcess, FlipProxy, cache_servers,  # noqa: F401
                                       start_cache_server)
from tests.support.chunks import random_chunks, write_pack
from tests.support.seaweed import Seaweed

pytestmark = pytest.mark.timeout(90)
T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn)


def local_pack(root: Path, n: int, size: int, *, packs: int = 1) -> tuple[LocalStore, list[bytes], list[ChunkRef]]:
    """``n`` chunks in ``packs`` packs (servers own chunks by pack segment: several packs
    spread them over several servers)."""
    store = LocalStore(str(root / "store"))
    chunks = random_chunks(n, size, seed=3, compressible=False)
    per = -(-n // packs)
    refs = [r for i in range(0, n, per) for r in write_pack(store, chunks[i:i + per])]
    return store, chunks, refs


# ---- pure parts -------------------------------------------------------------------------

def test_rendezvous_is_stable_balanced_and_moves_only_the_lost_servers_chunks() -> None:
    servers = [f"10.0.0.{i}:7000" for i in range(1, 6)]
    digests = [os.urandom(32) for _ in range(5000)]
    ring = Rendezvous(servers)
    owners = [ring.owner(d) for d in digests]
    assert owners == [Rendezvous(list(reversed(servers))).owner(d) for d in digests], "order-independent"
    counts = {s: owners.count(s) for s in servers}
    assert all(800 <= c <= 1200 for c in counts.values()), counts
    smaller = Rendezvous(servers[1:])
    for d, o in zip(digests, owners):
        if o != servers[0]:
            assert smaller.owner(d) == o  # untouched
        else:
            assert smaller.owner(d) == ring.rank(d)[1]  # moved to its second choice
    assert sorted(ring.rank(digests[0])) == sorted(servers)


def test_parse_servers() -> None:
    assert parse_servers("a:1, b:2,a:1,") == ["a:1", "b:2"]
    assert parse_servers("[::1]:8080") == ["[::1]:8080"]
    for bad in ("", "a", "a:b", "a:0", "::1:80", "a:70000"):
        with pytest.raises(ValueError, match="--az-cache"):
            parse_servers(bad)
    tier = make_az_tier("127.0.0.1:9,127.0.0.1:10", "s")
    assert tier.name == "az" and tier.servers == ["127.0.0.1:9", "127.0.0.1:10"]


# ---- against real servers ----------------------------------------------------------------

def test_chunks_spread_over_two_servers_each_from_its_owner(tmp_path: Path,
                                                             cache_servers: list[CacheServerProcess]) -> None:
    store, chunks, refs = local_pack(tmp_path, 48, 8000, packs=16)
    a = start_cache_server(tmp_path / "a", store.root)
    b = start_cache_server(tmp_path / "b", store.root)
    cache_servers += [a, b]
    tier = AZCacheTier([a.address, b.address])
    owned = {a.address: 0, b.address: 0}
    for r in refs:
        owned[tier.owner(r)] += 1
    assert all(n >= 9 for n in owned.values()), owned
    assert all(len({tier.owner(r) for r in refs if r.pack == p}) == 1 for p in {r.pack for r in refs}), \
        "a pack's neighbours stay on one server"

    async def twice() -> list[dict[bytes, bytes]]:
        return [await tier.fetch(refs), await tier.fetch(refs)]

    for got in run(twice):
        assert got == {r.digest: c for r, c in zip(refs, chunks)}
    for srv in (a, b):
        m = srv.metrics()
        p = "imagefs_cache_server_"
        assert m[p + "misses_total"] == owned[srv.address], "each chunk read through by its owner only"
        assert m[p + "hits_total"] == owned[srv.address], "and served again from the owner's disk"
        assert m[p + "requests_total"] == 2, "one batch per owner per fetch"
    s = tier.stats()
    assert (s.hits, s.misses, s.errors, s.corrupt) == (96, 0, 0, 0)


def test_chunks_cross_the_wire_as_their_compressed_frames(tmp_path: Path,
                                                         cache_servers: list[CacheServerProcess]) -> None:
    store = LocalStore(str(tmp_path / "store"))
    chunks = random_chunks(16, 256 * 1024, seed=5, compressible=True)
    refs = write_pack(store, chunks)
    srv = start_cache_server(tmp_path, store.root)
    cache_servers.append(srv)
    tier = AZCacheTier([srv.address])

    async def twice() -> list[tuple[dict[bytes, bytes], int]]:
        first = await tier.fetch(refs)
        read_through = tier.read_through
        return [(first, read_through), (await tier.fetch(refs), tier.read_through)]

    # A read-through (the server says so for every chunk), then hits from the server's disk.
    results = run(twice)
    assert [n for _, n in results] == [len(refs), len(refs)]
    for got, _ in results:
        assert got == {r.digest: c for r, c in zip(refs, chunks)}
    frames = sum(r.clen for r in refs)
    assert frames < sum(map(len, chunks)) // 4, "the test's chunks compress"
    assert srv.metric("served_bytes_total") == 2 * frames, "the server sent frames, not chunks"
    deadline = time.monotonic() + 10  # the fill is written behind the responses
    while srv.metric("cache_bytes") != frames and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.metric("cache_bytes") == frames, "and keeps them compressed"
    assert tier.stats().bytes == 2 * frames, "the client counts what crossed the network"


def test_reads_survive_servers_killed_and_stalled_mid_read(tmp_path: Path,
                                                           cache_servers: list[CacheServerProcess]) -> None:
    store, chunks, refs = local_pack(tmp_path, 32, 16_000, packs=32)
    expected = {r.digest: c for r, c in zip(refs, chunks)}
    blob = BlobTier(store)
    a = start_cache_server(tmp_path / "a", store.root)
    b = start_cache_server(tmp_path / "b", store.root)
    cache_servers += [a, b]
    stall = 0.5
    tier = AZCacheTier([a.address, b.address], stall_timeout=stall, probe_interval=0.2)
    a_owned = [r for r in refs if tier.owner(r) == a.address]
    assert 4 <= len(a_owned) <= 28, "each server owns some of the 32 packs"
    rng = random.Random(5)

    async def read(batch: list[ChunkRef]) -> tuple[dict[bytes, bytes], float]:
        """What a chain does: the AZ tier (timed), then the blob store for what it missed."""
        t0 = time.monotonic()
        got = await tier.fetch(batch)
        took = time.monotonic() - t0
        for r in batch:
            if r.digest not in got:
                got.update(await trio.to_thread.run_sync(blob.fetch, r))
        return got, took

    async def main() -> None:
        # Warm, then kill A while a reader is running.
        timings: list[tuple[float, float]] = []
        stop = trio.Event()

        async def reader() -> None:
            while not stop.is_set():
                batch = rng.sample(refs, 8)
                got, took = await read(batch)
                assert {r.digest: got[r.digest] for r in batch} == {r.digest: expected[r.digest] for r in batch}
                timings.append((time.monotonic(), took))
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.3)
            killed_at = time.monotonic()
            a.kill()
            await trio.sleep(0.5)
            stop.set()
        after = [took for at, took in timings if at > killed_at]
        assert len(after) >= 5
        assert max(after) < stall, "a killed server refuses or resets: no waiting for it"
        state = {s.address: s for s in tier.server_states()}
        assert not state[a.address].healthy and state[b.address].healthy
        # A's chunks come from B now (hedged to the next server in rendezvous order).
        got = await tier.fetch(a_owned)
        assert got == {r.digest: expected[r.digest] for r in a_owned}

        # A server that hangs (SIGSTOP): nothing comes, so the request is given up once it
        # has been silent for the stall bound, and the server is marked down.
        os.kill(b.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            got = await tier.fetch(refs[:4])
            took = time.monotonic() - t0
            assert got == {}, "every server down or hung: all misses"
            assert stall <= took < stall + 1.0
            b_state = {s.address: s for s in tier.server_states()}[b.address]
            assert not b_state.healthy and b_state.stalls == 1
            t0 = time.monotonic()
            assert await tier.fetch(refs[:4]) == {}
            assert time.monotonic() - t0 < 0.05, "unhealthy servers are skipped without a request"
        finally:
            os.kill(b.pid, signal.SIGCONT)

        # The probe brings B back; a restarted A (same port) comes back too.
        a2 = start_cache_server(tmp_path / "a2", store.root, port=a.port)
        cache_servers.append(a2)
        with trio.fail_after(5):
            while not all(s.healthy for s in tier.server_states()):
                await trio.sleep(0.05)
        got = await tier.fetch(refs)
        assert got == expected
        assert tier.stats().errors >= 2

    run(main)


def test_wrong_bytes_from_a_server_are_a_counted_miss(tmp_path: Path, cache_servers: list[CacheServerProcess],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    store, chunks, refs = local_pack(tmp_path, 3, 5000)
    srv = start_cache_server(tmp_path, store.root)
    cache_servers.append(srv)
    with FlipProxy(srv.port) as proxy:
        tier = AZCacheTier([proxy.address])

        async def main() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
            out = await tier.fetch(refs), await tier.fetch(refs[:1])
            for _ in range(100):  # the reports go out in the background
                if srv.metric("corrupt_reports_total") >= 2:
                    break
                await trio.sleep(0.05)
            return out

        with caplog.at_level(logging.WARNING, logger="cache.azclient"):
            three, one = run(main)
        assert proxy.flipped == 2
    # The proxy damaged the last byte of each response: the last chunk of the batch.
    assert three == {r.digest: c for r, c in zip(refs[:2], chunks[:2])}
    assert one == {}
    s = tier.stats()
    assert s.corrupt == 2 and s.hits == 2 and tier.corrupt == 2
    assert tier.server_states()[0].healthy, "a bad chunk is a miss, not a dead server"
    assert "did not verify" in caplog.text
    # Each bad frame was reported: the server checks its copy again before sending it.
    assert srv.metric("corrupt_reports_total") == 2


def test_wrong_or_missing_secret_is_a_logged_miss(tmp_path: Path, cache_servers: list[CacheServerProcess],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    store, chunks, refs = local_pack(tmp_path, 2, 5000)
    srv = start_cache_server(tmp_path, store.root, secret="right")
    cache_servers.append(srv)
    wrong = AZCacheTier([srv.address], secret="wrong", probe_interval=0.1)
    anonymous = AZCacheTier([srv.address])
    right = AZCacheTier([srv.address], secret="right")

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="cache.azclient"):
            assert await wrong.fetch(refs) == {}
            assert await anonymous.fetch(refs) == {}
        await trio.sleep(0.3)  # probes ran, with the wrong secret: still refused
        st = wrong.server_states()[0]
        assert not st.healthy and st.unauthorized == 1 and "401" in st.reason
        assert await wrong.fetch(refs) == {}
        assert await right.fetch(refs) == {r.digest: c for r, c in zip(refs, chunks)}

    run(main)
    assert "401" in caplog.text and "secret" in caplog.text
    assert any(r.levelno == logging.ERROR for r in caplog.records), "a wrong secret is logged as an error"
    assert srv.metric("unauthorized_total") >= 3


def test_pooled_connection_survives_a_server_restart(tmp_path: Path,
                                                     cache_servers: list[CacheServerProcess]) -> None:
    store, chunks, refs = local_pack(tmp_path, 4, 5000)
    srv = start_cache_server(tmp_path, store.root)
    cache_servers.append(srv)
    tier = AZCacheTier([srv.address])

    async def main() -> None:
        assert len(await tier.fetch(refs)) == 4  # leaves a keep-alive connection in the pool
        await trio.to_thread.run_sync(srv.terminate)  # closes it at the server's end
        again = await trio.to_thread.run_sync(lambda: start_cache_server(tmp_path, store.root, port=srv.port))
        cache_servers.append(again)
        assert await tier.fetch(refs) == {r.digest: c for r, c in zip(refs, chunks)}
        assert tier.server_states()[0].healthy, "a stale pooled connection is retried, not a failure"
        assert again.metric("hits_total") == 4  # the restarted server kept its disk cache

    run(main)


def test_the_chain_reads_through_the_az_tier_and_falls_back_when_it_dies(
        tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    from cache.chain import ChunkChain
    from cache.memory import MemoryTier
    from tests.support.chunks import CountingStore

    counting = CountingStore(str(tmp_path / "store"))
    chunks = random_chunks(12, 20_000, seed=9, compressible=False)
    refs = write_pack(counting, chunks)
    srv = start_cache_server(tmp_path, counting.root)
    cache_servers.append(srv)
    tier = AZCacheTier([srv.address], stall_timeout=0.3)
    chain = ChunkChain(BlobTier(counting), None, MemoryTier(0), remote_tiers=[tier])

    async def main() -> None:
        for r, c in zip(refs, chunks):  # the server reads through its own store handle
            assert await chain.get(r) == c
        assert counting.range_reads == 0, "this host never touched the blob store"
        srv.kill()
        t0 = time.monotonic()
        for r, c in zip(refs, chunks):
            assert await chain.get(r) == c
        assert time.monotonic() - t0 < 2.0
        assert counting.range_reads == len(refs), "with the server gone, every chunk came from the store"
        stats = chain.stats()
        az = stats.tier("az")
        # The first miss marked the server down; later reads do not ask a tier with no
        # server up. Every store read was a direct one, counted against the budget.
        assert az.hits == len(refs) and az.misses >= 1
        assert stats.direct_reads == len(refs) and stats.direct_waits == 0

    run(main)


def test_a_slow_but_alive_server_is_waited_for_not_dropped(tmp_path: Path, seaweed: "Seaweed",
                                                          cache_servers: list[CacheServerProcess]) -> None:
    """The server's store answers after 2 s, four times the client's stall bound: the
    server streams progress while it reads through, so the client waits for it and gets
    every chunk (no miss, no mark-down, no hedge) instead of sending its host to the store."""
    from tests.support.faultproxy import FaultProxy

    prefix = f"slow-{os.urandom(4).hex()}"
    chunks = random_chunks(6, 20_000, seed=11, compressible=False)
    refs = write_pack(seaweed.store(prefix), chunks)
    with FaultProxy("127.0.0.1", seaweed.s3_port) as proxy:
        srv = start_cache_server(tmp_path, f"s3://{seaweed.bucket}/{prefix}", s3_endpoint=proxy.url,
                                 env={"AWS_ACCESS_KEY_ID": seaweed.access_key,
                                      "AWS_SECRET_ACCESS_KEY": seaweed.secret_key, "AWS_DEFAULT_REGION": "us-east-1"})
        cache_servers.append(srv)
        proxy.reset_counters()
        proxy.delay(1000)  # each way: 2 s a round trip
        tier = AZCacheTier([srv.address], stall_timeout=0.5)
        got = run(lambda: tier.fetch(refs))
        assert proxy.requests >= 1, "the server did read through the slow store"
    assert got == {r.digest: c for r, c in zip(refs, chunks)}
    state = tier.server_states()[0]
    assert state.healthy and state.stalls == 0 and state.failures == 0 and state.hedged == 0
    assert state.progress >= 2, "the server said it was busy while it waited"
    assert tier.read_through == len(refs)
    assert srv.metric("heartbeats_total") >= 2


def test_an_index_comes_through_the_zone_verified_else_from_the_store(
        tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    from cache.chunk import digest_of
    from cache.zoneblobs import ZoneBlobStore
    from tests.support.chunks import CountingStore

    store = CountingStore(str(tmp_path / "store"))
    blob = os.urandom(300_000)
    key = f"indexes/{digest_of(blob).hex()}"
    store.put(key, blob)
    store.put("refs/app", b"not content-addressed\n")
    srv = start_cache_server(tmp_path, store.root)
    cache_servers.append(srv)
    gets: list[str] = []

    class Counting(CountingStore):
        def get(self, k: str) -> bytes:
            gets.append(k)
            return super().get(k)

    host_store = Counting(store.root)
    zone = ZoneBlobStore(host_store, [srv.address])
    assert zone.get(key) == blob and zone.get(key) == blob
    assert gets == [] and zone.zone_hits == 2, "both from the zone"
    assert srv.metric("blob_fetches_total") == 1, "read from the store once, then from the server"
    assert zone.get("refs/app") == b"not content-addressed\n" and gets == ["refs/app"]
    with FlipProxy(srv.port) as proxy:  # wrong bytes from the zone: the store's copy instead
        assert ZoneBlobStore(host_store, [proxy.address]).get(key) == blob
        assert proxy.flipped == 1
    srv.kill()  # the zone gone: the store
    assert ZoneBlobStore(host_store, [srv.address]).get(key) == blob
    assert gets == ["refs/app", key, key]


def test_a_read_through_reads_ahead_in_the_pack_demand_a_little_background_a_range(
        tmp_path: Path, cache_servers: list[CacheServerProcess]) -> None:
    store = LocalStore(str(tmp_path / "store"))
    chunks = random_chunks(40, 100_000, seed=21, compressible=False)  # 4 MB in one pack
    refs = write_pack(store, chunks)
    srv = start_cache_server(tmp_path, store.root)
    cache_servers.append(srv)
    tier = AZCacheTier([srv.address])

    async def main() -> tuple[dict[bytes, bytes], dict[bytes, bytes], dict[bytes, bytes], dict[bytes, bytes]]:
        first = await tier.fetch(refs[:1])  # the pack's first read: its table loads meanwhile
        demand = await tier.fetch(refs[1:2])
        background = await tier.fetch(refs[21:], background=True)  # two batches of ~1 MiB
        return first, demand, await tier.fetch(refs[2:21]), background

    first, demand, brought, background = run(main)
    assert first == {refs[0].digest: chunks[0]} and demand == {refs[1].digest: chunks[1]}
    assert brought == {r.digest: c for r, c in zip(refs[2:21], chunks[2:21])}
    assert background == {r.digest: c for r, c in zip(refs[21:], chunks[21:])}
    m = srv.metrics()
    # The second demand read spanned 2 MiB (its chunk and the 19 after it); the first
    # background batch read the rest of the pack in the same GET (up to 8 MiB), so the
    # second batch, and the demand read of chunks 2-20, were served from the server.
    assert m["imagefs_cache_server_blob_fetches_total"] == 3
    assert m["imagefs_cache_server_read_ahead_total"] == 19 + 9
    assert m['imagefs_cache_server_class_requests_total{class="background"}'] == 2
    assert tier.read_through == 1 + 1 + 10

"""Startup profiles on real mounts: recorded by one mount, stored, replayed by the next.

Every mount is a real daemon (tests.support.mounts.mounted); stores are a local
directory and, where a zone's cache server is involved, SeaweedFS behind a real
``imagefs cache-server``. Assertions count what crossed each tier (``imagefs stats``),
never milliseconds.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import trio

from cache.blobtier import BlobTier
from cache.chain import ChunkChain
from cache.localstore import LocalStore
from cache.memory import MemoryTier
from cache.stream import StreamTracker, stream_chunks
from imagefs.mount import MountOptions, query_stats
from indexer import profile as profiles
from indexer.catalog import open_image
from indexer.optimize import optimize
from tests.support.cacheserver import CacheServerProcess, cache_servers, start_cache_server  # noqa: F401
from tests.support.faultproxy import FaultProxy
from tests.support.mounts import ImageBuilder, mounted
from tests.support.seaweed import Seaweed, seaweed  # noqa: F401

CS = 64 * 1024
FILES = {f"app/m{i:02d}.py": random.Random(i).randbytes(2 * CS + 1000 * i) for i in range(16)}
SHARED = random.Random(99).randbytes(3 * CS)
WORKLOAD = ["app/m03.py", "app/m11.py", "app/m07.py", "app/m00.py"]  # what "starts the app" reads
OTHER = ["app/m14.py", "app/m02.py"]
FS_MODES = ("fuse", "erofs")


@pytest.fixture()
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IMAGEFS_RUN_DIR", str(tmp_path / "run"))
    return tmp_path


def _build(store: LocalStore | object, name: str = "app", extra: dict[str, bytes] | None = None) -> str:
    b = ImageBuilder(chunk_size=CS, pack_size=128 * 1024)  # many packs: an unoptimized replay needs several reads
    for path, data in {**FILES, **(extra or {})}.items():
        b.file(path, data)
    b.file("shared.bin", SHARED)
    return b.write(store, name).digest  # type: ignore[arg-type]


def _opts(base: Path, store: str, tag: str, fs: str, **kw: object) -> MountOptions:
    return MountOptions(store=store, cache_dir=str(base / f"cache-{tag}"), cache_size=1 << 30,
                        memory_size=64 << 20, fs=fs, prefetch=False, **kw)  # type: ignore[arg-type]


def _read(mp: str, paths: list[str]) -> None:
    for p in paths:
        with open(os.path.join(mp, p), "rb") as f:
            assert f.read() == FILES[p]


def _wait_replay(mp: str, timeout: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        rp = query_stats(mp)["replay"]
        if rp["state"] not in ("loading", "pending", "running") or time.monotonic() > deadline:
            return rp
        time.sleep(0.05)


def _record(base: Path, store: str, paths: list[str], fs: str, tag: str, **kw: object) -> None:
    with mounted("app", str(base / f"mnt-{tag}"), _opts(base, store, tag, fs, record=True, **kw)) as m:
        _read(m.path, paths)
    # the daemon saved the recording as it exited


@pytest.mark.parametrize("fs", FS_MODES)
def test_a_recorded_profile_is_stored_and_replayed(run_dir: Path, fs: str) -> None:
    store_dir = str(run_dir / "store")
    store = LocalStore(store_dir)
    _build(store)
    index = open_image(store, "app")
    _record(run_dir, store_dir, WORKLOAD, fs, "rec")
    found = profiles.load(store, index)
    assert found is not None and found.recordings == 1
    want = [c for p in WORKLOAD for c in index.chunk_numbers(index.resolve(p) or 0, 0, len(FILES[p]))]
    assert [e.chunk for e in found.entries] == want  # every chunk read, in first-read order
    assert found.entries[0].ino == index.resolve(WORKLOAD[0])  # EROFS's blob reads: found from the chunk

    # A fresh host: the next mount streams the profile, and the workload's reads are served by it.
    with mounted("app", str(run_dir / "mnt-replay"), _opts(run_dir, store_dir, "replay", fs)) as m:
        rp = _wait_replay(m.path)
        assert rp["state"] == "done" and rp["planned"] == len(want) and rp["fetched"] == len(want)
        assert rp["source"] == "host copy"  # fetched beside the index, before the daemon needed it
        blob_before = query_stats(m.path)["cache"]["tiers"]["blob"]["requests"]
        deadline = time.monotonic() + 30
        while query_stats(m.path)["replay"].get("page_cache", {}).get("ranges", 0) < len(want):
            assert time.monotonic() < deadline, query_stats(m.path)["replay"]
            time.sleep(0.05)
        reads_before = query_stats(m.path)["requests"]["ops"].get("read", 0)
        _read(m.path, WORKLOAD)
        st = query_stats(m.path)
        # The replay read the workload's ranges into the page cache: its reads never reach us.
        assert st["requests"]["ops"].get("read", 0) == reads_before
        assert st["replay"]["served"] == len(want) and st["replay"]["missed"] == 0
        assert st["cache"]["tiers"]["blob"]["requests"] == blob_before  # nothing more from the store
        assert rp["requests"] < len(want)  # ranged reads, not one per chunk


def test_two_recordings_merge_and_replace_starts_afresh(run_dir: Path) -> None:
    store_dir = str(run_dir / "store")
    store = LocalStore(store_dir)
    _build(store)
    index = open_image(store, "app")
    _record(run_dir, store_dir, WORKLOAD, "fuse", "a")
    _record(run_dir, store_dir, OTHER + WORKLOAD[:1], "fuse", "b")
    merged = profiles.load(store, index)
    assert merged is not None and merged.recordings == 2
    chunks_of = {p: set(index.chunk_numbers(index.resolve(p) or 0, 0, len(FILES[p]))) for p in FILES}
    got = {e.chunk for e in merged.entries}
    assert got == set().union(*(chunks_of[p] for p in WORKLOAD + OTHER))
    seen = {e.chunk: e.seen for e in merged.entries}
    assert all(seen[c] == 2 for c in chunks_of[WORKLOAD[0]])  # read by both recordings
    _record(run_dir, store_dir, OTHER, "fuse", "c", record_merge=False)
    replaced = profiles.load(store, index)
    assert replaced is not None and replaced.recordings == 1
    assert {e.chunk for e in replaced.entries} == set().union(*(chunks_of[p] for p in OTHER))


@pytest.mark.parametrize("kind", ["damaged", "foreign", "missing-chunks"])
def test_an_unusable_profile_is_refused_and_the_mount_works(run_dir: Path, kind: str) -> None:
    store_dir = str(run_dir / "store")
    store = LocalStore(store_dir)
    _build(store)
    _build(store, "other", extra={"x": b"different"})
    index, other = open_image(store, "app"), open_image(store, "other")
    key = profiles.profile_key(index.digest)
    if kind == "damaged":
        blob = bytearray(profiles.encode(profiles.Profile(index.digest, (profiles.Entry(0, 2, 0),))))
        blob[-3] ^= 0xFF
        store.put(key, bytes(blob))
    elif kind == "foreign":
        store.put(key, profiles.encode(profiles.Profile(other.digest, (profiles.Entry(0, 2, 0),))))
    else:
        store.put(key, profiles.encode(profiles.Profile(index.digest, (profiles.Entry(index.n_chunks + 5, 2, 0),))))
    with mounted("app", str(run_dir / "mnt"), _opts(run_dir, store_dir, "m", "fuse")) as m:
        rp = _wait_replay(m.path)
        assert rp["state"] == "refused" and rp["reason"]
        _read(m.path, WORKLOAD)  # the mount works as if there were no profile
    assert store.get(key)  # a refused profile is left alone (a new recording replaces it)


def test_an_optimized_profile_mounts_byte_identical_and_dedup_holds(run_dir: Path) -> None:
    store_dir = str(run_dir / "store")
    store = LocalStore(store_dir)
    digest = _build(store)
    _build(store, "sibling", extra={"y": b"only here"})
    index, sibling = open_image(store, "app"), open_image(store, "sibling")
    shared_before = {r.digest: r for r in index.all_chunks()}.keys() & {r.digest for r in sibling.all_chunks()}
    _record(run_dir, store_dir, WORKLOAD, "fuse", "rec")
    found = profiles.load(store, index)
    assert found is not None
    head = sum(index.chunk(e.chunk).clen for e in found.entries[:3])
    res = optimize(store, index, found, head_budget=head)  # the first three chunks come inline
    assert res.changed and res.packs == 1
    laid = profiles.load(store, index)
    assert laid is not None and laid.packs and laid.head_chunks == 3
    assert open_image(store, "app").digest == digest  # the image is the same image
    shared_after = {r.digest for r in open_image(store, "app").all_chunks()} & {r.digest for r in sibling.all_chunks()}
    assert shared_after == shared_before and shared_before  # dedup with the sibling holds
    startup = profiles.referenced_packs(laid)[0]
    with mounted("app", str(run_dir / "mnt-opt"), _opts(run_dir, store_dir, "opt", "fuse")) as m:
        rp = _wait_replay(m.path)
        assert rp["state"] == "done" and rp["inline"] == 3 and rp["fetched"] == len(laid.entries) - 3
        assert rp["requests"] == 1  # the rest of the working set in one ranged read of the startup pack
        for p, data in FILES.items():
            with open(os.path.join(m.path, p), "rb") as f:
                assert f.read() == data
        with open(os.path.join(m.path, "shared.bin"), "rb") as f:
            assert f.read() == SHARED
    assert store.exists(startup)


def test_a_demand_read_of_the_last_chunk_goes_before_the_replay(seaweed: Seaweed, tmp_path: Path) -> None:  # noqa: F811
    """The replay reads one range at a time through a store 150 ms away; a demand read of
    the profile's last chunk fetches it at once instead of waiting for the stream."""
    prefix = f"profile-{uuid.uuid4().hex[:8]}"
    _build(seaweed.store(prefix))
    with FaultProxy("127.0.0.1", seaweed.s3_port) as proxy:
        proxy.delay(150)
        store = seaweed.store(prefix, endpoint_url=proxy.url)
        index = open_image(store, "app")
        refs = [index.chunk(n) for n in range(index.n_chunks)]  # one per pack range: many spans
        last = refs[-1]

        async def main() -> tuple[StreamTracker, int]:
            chain = ChunkChain(BlobTier(store), None, MemoryTier(64 << 20))
            tracker = StreamTracker(r.digest for r in refs)
            chain.tracker = tracker
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: stream_chunks(chain, refs, tracker, in_flight=1, max_range=128 * 1024,
                                                         first_range=128 * 1024))
                await trio.sleep(0.05)
                data = await chain.get(last)
                assert len(data) == last.ulen
                fetched_when_answered = tracker.fetched
            return tracker, fetched_when_answered

        tracker, fetched_then = trio.run(main)
    assert tracker.missed == 1  # the demand read fetched the last chunk itself ...
    assert fetched_then < len(refs) // 2  # ... while the stream had brought less than half
    assert tracker.state == "done" and tracker.fetched + tracker.held + 1 >= len(refs) - 1


def test_a_replay_through_the_zone_server_leaves_it_warm_for_the_next_host(
        seaweed: Seaweed, run_dir: Path, cache_servers: list[CacheServerProcess],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"profile-az-{uuid.uuid4().hex[:8]}"
    s3 = seaweed.store(prefix)
    _build(s3)
    index = open_image(s3, "app")
    env = {"AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
           "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{seaweed.bucket}/{prefix}"
    want = [c for p in WORKLOAD for c in index.chunk_numbers(index.resolve(p) or 0, 0, len(FILES[p]))]
    profiles.save(s3, profiles.Profile(index.digest, tuple(profiles.Entry(c, 0, i) for i, c in enumerate(want))))
    srv = start_cache_server(run_dir / "az", url, s3_endpoint=seaweed.endpoint, env=env)
    cache_servers.append(srv)

    def host(tag: str) -> dict[str, object]:
        opts = MountOptions(store=url, s3_endpoint=seaweed.endpoint, cache_dir=str(run_dir / f"cache-{tag}"),
                            cache_size=1 << 30, memory_size=64 << 20, fs="fuse", prefetch=False,
                            az_cache=[srv.address])
        with mounted("app", str(run_dir / f"mnt-{tag}"), opts) as m:
            rp = _wait_replay(m.path)
            assert rp["state"] == "done" and rp["fetched"] == len(want)
            _read(m.path, WORKLOAD)
            return query_stats(m.path)

    first = host("first")
    assert first["replay"]["served"] == len(want)
    second = host("second")
    tiers = second["cache"]["tiers"]
    assert tiers["blob"]["requests"] == 0  # the second host never reached the store
    assert tiers["az"]["hits"] >= len(want)
    assert second["replay"]["served"] == len(want) and second["replay"]["missed"] == 0


def test_a_stale_host_copy_is_replayed_once_and_refreshed(run_dir: Path) -> None:
    from imagefs import profile_cache

    store_dir = str(run_dir / "store")
    store = LocalStore(store_dir)
    _build(store)
    index = open_image(store, "app")
    chunks_of = {p: index.chunk_numbers(index.resolve(p) or 0, 0, len(FILES[p])) for p in FILES}
    old = profiles.Profile(index.digest, tuple(profiles.Entry(c, 0, 0) for c in chunks_of[WORKLOAD[0]]))
    new = profiles.Profile(index.digest, tuple(profiles.Entry(c, 0, 0) for c in chunks_of[OTHER[0]]))
    cache = str(run_dir / "cache-host")
    profiles.save(store, old)
    opts = MountOptions(store=store_dir, cache_dir=cache, cache_size=1 << 30, memory_size=64 << 20, fs="fuse",
                        prefetch=False)
    with mounted("app", str(run_dir / "mnt1"), opts) as m:
        assert _wait_replay(m.path)["planned"] == len(old.entries)
    profiles.save(store, new)  # re-recorded elsewhere
    copy_path = os.path.join(cache, "profiles", index.digest.split(":")[1] + ".profile")
    os.utime(copy_path, (time.time() - 3600, time.time() - 3600))  # a copy from an hour ago
    with mounted("app", str(run_dir / "mnt2"), opts) as m:
        rp = _wait_replay(m.path)
        assert rp["source"] == "host copy" and rp["planned"] == len(old.entries)  # this mount: the copy
    copy = profile_cache.read_copy(cache, index)
    assert copy is not None and copy.entries == new.entries  # the next one: the store's


def test_the_replay_writes_its_ssd_copies_after_the_start_and_the_next_mount_finds_them(run_dir: Path) -> None:
    """A replay keeps its chunks in memory while the workload starts and writes their SSD
    copies once it is quiet (or at unmount at the latest): a second mount on the same
    host replays from its SSD tier and asks the store nothing."""
    store_dir = str(run_dir / "store")
    store = LocalStore(store_dir)
    _build(store)
    _record(run_dir, store_dir, WORKLOAD, "fuse", "rec")
    opts = _opts(run_dir, store_dir, "host", "fuse")
    with mounted("app", str(run_dir / "mnt1"), opts) as m:
        rp = _wait_replay(m.path)
        assert rp["fetched"] == rp["planned"] > 0
        first = query_stats(m.path)["cache"]["tiers"]["ssd"]
    with mounted("app", str(run_dir / "mnt2"), opts) as m:
        rp = _wait_replay(m.path)
        st = query_stats(m.path)
        assert rp["held"] == rp["planned"] and rp["fetched"] == 0  # all from the SSD tier
        assert st["cache"]["tiers"]["blob"]["requests"] == 0
        assert st["cache"]["tiers"]["ssd"]["hits"] >= rp["planned"]
    assert first["hits"] == 0

"""SSDTier on a real directory: bounded, LRU, verified on serve, crash-safe, and shared
by several real processes at once."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cache.chunk import ChunkRef, compress, digest_of
from cache.ssd import FormMismatch, SSDTier
from tests.support.chunks import random_chunks

KIB = 1024


def ref_for(data: bytes) -> ChunkRef:
    return ChunkRef(digest_of(data), "packs/x", 0, len(data), len(data))


def files_on_disk(root: Path) -> dict[str, int]:
    out = {}
    for p in (root / "chunks").rglob("*"):
        if p.is_file():
            out[p.name] = p.stat().st_size
    return out


def test_fill_then_hit_is_a_plain_uncompressed_file(tmp_path: Path) -> None:
    data = random_chunks(1, 100 * KIB)[0]
    r = ref_for(data)
    with SSDTier(str(tmp_path), 10 << 20) as ssd:
        assert ssd.get(r) is None
        ssd.put(r, data)
        path = tmp_path / "chunks" / r.hex[:2] / r.hex
        assert path.read_bytes() == data
        assert ssd.get(r) == data
        assert ssd.usage() == (len(data), 1)
        s = ssd.stats()
        assert (s.requests, s.hits, s.misses, s.bytes, s.stored_bytes) == (2, 1, 1, len(data), len(data))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_stays_under_bound_while_writing_much_more(tmp_path: Path) -> None:
    bound = 1 << 20
    chunks = random_chunks(96, 64 * KIB, seed=1)  # 6 MiB through a 1 MiB cache
    with SSDTier(str(tmp_path), bound) as ssd:
        for i in range(0, len(chunks), 4):
            ssd.put_many([(ref_for(c), c) for c in chunks[i:i + 4]])
            total, count = ssd.usage()
            assert total <= bound
            on_disk = files_on_disk(tmp_path)
            assert sum(on_disk.values()) == total and len(on_disk) == count
        assert ssd.stats().evictions == 96 - count
        # The newest survive; every survivor still verifies.
        assert ssd.get(ref_for(chunks[-1])) == chunks[-1]
        assert ssd.get(ref_for(chunks[0])) is None


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 8 MiB file system (tmpfs), much smaller than the tier's bound."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_disk_smaller_than_the_bound_evicts_instead_of_failing(small_disk: Path) -> None:
    """Issue 12: a cache disk smaller than --cache-size filled once and then every
    fill failed with ENOSPC, for good. Fills now keep a reserve free and make room."""
    chunks = random_chunks(64, 256 * KIB, seed=7)  # 16 MiB through an 8 MiB disk, bound 1 GiB
    with SSDTier(str(small_disk / "cache"), 1 << 30) as ssd:
        for i in range(0, len(chunks), 4):
            batch = [(ref_for(c), c) for c in chunks[i:i + 4]]
            assert ssd.put_many(batch) == 4, f"batch {i // 4} was not stored"
            assert all(ssd.get(r) == c for r, c in batch)  # the newest are there and verify
        total, count = ssd.usage()
        assert total <= 8 << 20 and count < 64
        assert ssd.stats().evictions == 64 - count
        assert sum(files_on_disk(small_disk / "cache").values()) == total
        free = os.statvfs(small_disk)
        assert free.f_bavail * free.f_frsize > 0  # the reserve: LMDB can still commit
        assert ssd.get(ref_for(chunks[0])) is None


def test_a_disk_filled_by_someone_else_makes_room_for_a_fill(small_disk: Path) -> None:
    chunks = random_chunks(8, 256 * KIB, seed=8)
    with SSDTier(str(small_disk / "cache"), 1 << 30) as ssd:
        ssd.put_many([(ref_for(c), c) for c in chunks[:6]])
        with open(small_disk / "other", "wb") as f:  # another user of the disk fills it up
            try:
                while True:
                    f.write(b"\0" * (64 * KIB))
                    f.flush()
            except OSError:
                pass
        assert ssd.put_many([(ref_for(c), c) for c in chunks[6:]]) == 2
        assert ssd.get(ref_for(chunks[7])) == chunks[7]
        assert ssd.stats().evictions >= 2


def test_evicts_least_recently_used_first(tmp_path: Path) -> None:
    a, b, c, d, e = random_chunks(5, 256 * KIB, seed=2)
    with SSDTier(str(tmp_path), 1 << 20, touch_after=0, touch_batch=1) as ssd:
        for x in (a, b, c, d):
            ssd.put(ref_for(x), x)
        assert ssd.get(ref_for(a)) == a  # a becomes the most recent; b is the oldest
        ssd.put(ref_for(e), e)
        assert ssd.contains(ref_for(a).digest)
        assert not ssd.contains(ref_for(b).digest)
        assert not (tmp_path / "chunks" / ref_for(b).hex[:2] / ref_for(b).hex).exists()
        assert ssd.usage() == (4 * 256 * KIB, 4)


def test_access_times_are_batched_not_written_per_hit(tmp_path: Path) -> None:
    a = random_chunks(1, 4 * KIB, seed=3)[0]
    with SSDTier(str(tmp_path), 1 << 20, touch_after=0, touch_batch=1000, touch_interval=1000) as ssd:
        ssd.put(ref_for(a), a)
        before = ssd._record(ref_for(a).digest)
        assert ssd.get(ref_for(a)) == a
        assert ssd._record(ref_for(a).digest) == before  # queued, not written
        ssd.flush()
        after = ssd._record(ref_for(a).digest)
        assert after is not None and before is not None and after[1] > before[1]


def test_corrupt_file_is_dropped_and_never_served(tmp_path: Path) -> None:
    good, other = random_chunks(2, 64 * KIB, seed=4)
    r = ref_for(good)
    with SSDTier(str(tmp_path), 1 << 20) as ssd:
        ssd.put_many([(r, good), (ref_for(other), other)])
        path = tmp_path / "chunks" / r.hex[:2] / r.hex
        raw = bytearray(path.read_bytes())
        raw[1000] ^= 0xFF
        path.write_bytes(bytes(raw))
        assert ssd.get(r) is None
        assert ssd.stats().corrupt == 1
        assert not path.exists() and not ssd.contains(r.digest)
        assert ssd.usage() == (len(other), 1)
        # A truncated file is caught too.
        op = tmp_path / "chunks" / ref_for(other).hex[:2] / ref_for(other).hex
        op.write_bytes(other[:-1])
        assert ssd.get(ref_for(other)) is None
        assert ssd.usage() == (0, 0)
        # Refilled, it is served again.
        ssd.put(r, good)
        assert ssd.get(r) == good


def test_record_without_file_is_a_miss_and_is_dropped(tmp_path: Path) -> None:
    a = random_chunks(1, 8 * KIB, seed=5)[0]
    with SSDTier(str(tmp_path), 1 << 20) as ssd:
        ssd.put(ref_for(a), a)
        os.unlink(ssd.path_of(ref_for(a).digest))
        assert ssd.get(ref_for(a)) is None
        assert ssd.usage() == (0, 0) and not ssd.contains(ref_for(a).digest)


def test_file_without_record_is_never_served(tmp_path: Path) -> None:
    a, b = random_chunks(2, 8 * KIB, seed=6)
    with SSDTier(str(tmp_path), 1 << 20) as ssd:
        # What a crash between rename and commit leaves: a file, no record.
        for data, content in ((a, a), (b, b"not the chunk at all")):
            p = Path(ssd.path_of(ref_for(data).digest))
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)
        assert ssd.get(ref_for(a)) is None
        assert ssd.get(ref_for(b)) is None
        assert ssd.usage() == (0, 0)
        ssd.put(ref_for(b), b)  # a refill replaces the orphan
        assert ssd.get(ref_for(b)) == b
        assert ssd.usage() == (len(b), 1)
        report = ssd.scrub()
        assert (report.orphan_files, report.missing_files) == (1, 0)
        assert not Path(ssd.path_of(ref_for(a).digest)).exists()
        assert ssd.usage() == (len(b), 1)


def test_leftover_temporaries_of_dead_processes_are_swept_at_open(tmp_path: Path) -> None:
    SSDTier(str(tmp_path), 1 << 20).close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / "tmp" / f"{int(dead.stdout)}.deadbeef"
    live = tmp_path / "tmp" / f"{os.getpid()}.cafef00d"
    stale.write_bytes(b"half a chunk")
    live.write_bytes(b"a fill in progress")
    with SSDTier(str(tmp_path), 1 << 20) as ssd:
        assert not stale.exists()
        assert live.exists()  # a live process's fill is left alone
        assert ssd.usage() == (0, 0)


# ---- real processes ----------------------------------------------------------------

def _crash_child(directory: str, mode: str) -> None:
    """Fill, then die (os._exit) at the worst moment, holding LMDB's writer lock."""
    import cache.ssd as ssdmod

    chunks = random_chunks(4, 256 * KIB, seed=7)
    ssd = ssdmod.SSDTier(directory, 1 << 20)
    if mode == "after-evict-unlink":
        for c in chunks[:4]:
            ssd.put(ref_for(c), c)
    real_rename, real_unlink = os.rename, os.unlink

    def rename_then_die(src: str, dst: str) -> None:
        real_rename(src, dst)
        os._exit(9)

    def unlink_then_die(path: str) -> None:
        real_unlink(path)
        if "/chunks/" in path:
            os._exit(9)

    if mode == "after-rename":
        setattr(os, "rename", rename_then_die)  # this process only: it is about to die
        ssd.put(ref_for(chunks[0]), chunks[0])
    else:
        setattr(os, "unlink", unlink_then_die)
        extra = random_chunks(1, 256 * KIB, seed=8)[0]
        ssd.put(ref_for(extra), extra)
    os._exit(0)  # not reached if the crash happened


def _run_crash(directory: str, mode: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_crash_child, args=(directory, mode))
    p.start()
    p.join(30)
    assert p.exitcode == 9


def test_crash_after_rename_before_commit(tmp_path: Path) -> None:
    _run_crash(str(tmp_path), "after-rename")
    c0 = random_chunks(4, 256 * KIB, seed=7)[0]
    with SSDTier(str(tmp_path), 1 << 20) as ssd:
        assert Path(ssd.path_of(ref_for(c0).digest)).exists()  # the orphan is there...
        assert ssd.get(ref_for(c0)) is None  # ...and not served
        assert ssd.usage() == (0, 0)
        other = random_chunks(1, 8 * KIB, seed=9)[0]
        ssd.put(ref_for(other), other)  # the dead writer's lock was recovered
        assert ssd.get(ref_for(other)) == other
        assert ssd.scrub().orphan_files == 1


def test_crash_during_eviction_before_commit(tmp_path: Path) -> None:
    _run_crash(str(tmp_path), "after-evict-unlink")
    chunks = random_chunks(4, 256 * KIB, seed=7)
    with SSDTier(str(tmp_path), 1 << 20) as ssd:
        # The eviction was never committed: 4 records, one file gone.
        assert ssd.usage() == (4 * 256 * KIB, 4)
        served = [ssd.get(ref_for(c)) for c in chunks]
        assert served.count(None) == 1
        assert all(s == c for s, c in zip(served, chunks) if s is not None)
        assert ssd.usage() == (3 * 256 * KIB, 3)


def _sharing_child(directory: str, start: int, stop: int, bound: int, q: "multiprocessing.Queue[tuple[int, int, int]]") -> None:
    chunks = random_chunks(stop, 32 * KIB, seed=10)
    ssd = SSDTier(directory, bound)
    hits = wrong = over = 0
    for i in range(start, stop):
        batch = [(ref_for(chunks[i]), chunks[i])]
        ssd.put_many(batch)
        for j in range(max(0, i - 24), i + 1, 3):  # read back recent ones, the other's too
            got = ssd.get(ref_for(chunks[j]))
            if got is not None:
                hits += 1
                wrong += got != chunks[j]
        if ssd.usage()[0] > bound:
            over += 1
    ssd.close()
    q.put((hits, wrong, over))


def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    bound = 1 << 20
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_sharing_child, args=(str(tmp_path), lo, hi, bound, q))
             for lo, hi in ((0, 120), (60, 180))]  # overlapping chunk sets
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for hits, wrong, over in results:
        assert wrong == 0 and over == 0 and hits > 0
    chunks = random_chunks(180, 32 * KIB, seed=10)
    with SSDTier(str(tmp_path), bound) as ssd:
        total, count = ssd.usage()
        assert 0 < total <= bound
        on_disk = files_on_disk(tmp_path)
        assert sum(on_disk.values()) == total and len(on_disk) == count
        report = ssd.scrub()
        assert (report.orphan_files, report.missing_files, report.total) == (0, 0, total)
        held = [c for c in chunks if ssd.get(ref_for(c)) is not None]
        assert len(held) == count
    assert list((tmp_path / "tmp").iterdir()) == []


def test_threads_share_one_tier(tmp_path: Path) -> None:
    bound = 512 * KIB
    chunks = random_chunks(64, 16 * KIB, seed=11)
    problems: list[str] = []
    with SSDTier(str(tmp_path), bound, fsync=False) as ssd:
        def worker(k: int) -> None:
            # Each thread reads every chunk three times in a row: the repeats must
            # hit, because at most a few other puts can land in between and the
            # bound holds 32 chunks. A plain cyclic scan wider than the bound would
            # make hits depend on how the threads happen to interleave.
            for n in range(150):
                i = ((n // 3) * 7 + k * 13) % len(chunks)
                got = ssd.get(ref_for(chunks[i]))
                if got is None:
                    ssd.put(ref_for(chunks[i]), chunks[i])
                elif got != chunks[i]:
                    problems.append(f"wrong bytes for {i}")

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert problems == []
        total, count = ssd.usage()
        assert total <= bound
        assert sum(files_on_disk(tmp_path).values()) == total
        assert ssd.stats().hits > 0


def test_one_directory_opened_twice_in_a_process_shares_the_environment(tmp_path: Path) -> None:
    a = random_chunks(1, 8 * KIB, seed=12)[0]
    one = SSDTier(str(tmp_path), 1 << 20)
    two = SSDTier(str(tmp_path), 1 << 20)
    one.put(ref_for(a), a)
    assert two.get(ref_for(a)) == a
    one.close()
    assert two.get(ref_for(a)) == a  # still open for the other instance
    two.close()


def test_rejects_negative_bound(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        SSDTier(str(tmp_path), -1)


def test_frame_form_keeps_and_checks_zstd_frames(tmp_path: Path) -> None:
    """The AZ cache server's form: files are the chunks' zstd frames, checked by
    decompressing them against the digest, whatever size a request claims."""
    data = random_chunks(1, 100 * KIB, seed=21)[0]
    frame = compress(data)
    r = ChunkRef(digest_of(data), "packs/x", 0, len(frame), len(data))
    with SSDTier(str(tmp_path), 10 << 20, frames=True) as ssd:
        ssd.put(r, frame)
        assert (tmp_path / "chunks" / r.hex[:2] / r.hex).read_bytes() == frame
        assert ssd.get(r) == frame
        assert ssd.usage() == (len(frame), 1), "bounded by the bytes on disk"
        # A request naming a wrong size neither gets the chunk dropped nor changes it.
        liar = ChunkRef(r.digest, r.pack, r.offset, r.clen, r.ulen + 1)
        assert ssd.get(liar) == frame and ssd.stats().corrupt == 0
        # A frame of other bytes under this digest is found out and dropped.
        other = random_chunks(1, 100 * KIB, seed=22)[0]
        wrong = ChunkRef(digest_of(b"not it"), "packs/x", 0, len(frame), len(other))
        ssd.put(wrong, compress(other))
        assert ssd.get(wrong) is None and ssd.stats().corrupt == 1
        assert not (tmp_path / "chunks" / wrong.hex[:2] / wrong.hex).exists()
        # So is a file that is not a frame at all (an uncompressed chunk).
        raw = ChunkRef(digest_of(other), "packs/x", 0, len(other), len(other))
        ssd.put(raw, other)
        assert ssd.get(raw) is None and ssd.stats().corrupt == 2


def test_a_directory_keeps_the_form_it_was_made_with(tmp_path: Path) -> None:
    data = random_chunks(1, 8 * KIB, seed=23)[0]
    host, server, legacy = tmp_path / "host", tmp_path / "server", tmp_path / "legacy"
    SSDTier(str(host), 1 << 20).close()
    SSDTier(str(server), 1 << 20, frames=True).close()
    with pytest.raises(FormMismatch, match="holds uncompressed chunks .* not zstd chunk frames"):
        SSDTier(str(host), 1 << 20, frames=True)
    with pytest.raises(FormMismatch, match="holds zstd chunk frames .* not uncompressed chunks"):
        SSDTier(str(server), 1 << 20)
    SSDTier(str(host), 1 << 20).close()  # the same form opens again
    SSDTier(str(server), 1 << 20, frames=True).close()
    # A cache written before the form was recorded holds uncompressed chunks.
    with SSDTier(str(legacy), 1 << 20) as ssd:
        ssd.put(ref_for(data), data)
        with ssd._e.env.begin(write=True, db=ssd._e.meta) as txn:
            txn.delete(b"form")
    with pytest.raises(FormMismatch):
        SSDTier(str(legacy), 1 << 20, frames=True)
    with SSDTier(str(legacy), 1 << 20) as ssd:
        assert ssd.get(ref_for(data)) == data


def test_touch_refreshes_lru_positions_without_reading(tmp_path: Path) -> None:
    """What the cache server does for files it sends itself: the touched chunk outlives
    older ones although nobody read it through the tier."""
    a, b, c, d = random_chunks(4, 100 * KIB, seed=24)
    with SSDTier(str(tmp_path), 350 * KIB) as ssd:
        for data in (a, b, c):
            ssd.put(ref_for(data), data)
            time.sleep(0.002)
        ssd.touch([ref_for(a).digest])
        before = ssd.stats().requests
        time.sleep(0.002)
        ssd.put(ref_for(d), d)  # over the bound: the least recently used goes
        assert ssd.contains(ref_for(a).digest) and not ssd.contains(ref_for(b).digest)
        assert ssd.stats().requests == before, "touching read nothing"

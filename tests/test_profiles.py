"""Startup profiles without a mount: format, merging, recording, range planning, layout,
and the per-file chunk size that gives profiles their grain.

Real mounts that record and replay are in tests/test_profile_mount.py.
"""

from __future__ import annotations

import io
import os
import random
import struct
from dataclasses import replace

import pytest
import zstandard

from cache.chunk import ChunkRef, open_chunk
from cache.localstore import LocalStore
from cache.stream import plan_spans
from imagefs.recorder import Recorder
from indexer import profile as profiles
from indexer.chunker import ELF_MAGIC, RANDOM_ACCESS_MIN_SIZE, ChunkSpill
from indexer.format import HEADER, INODE, INODE_V1, parse_header, seal
from indexer.index import Index
from indexer.optimize import is_laid_out, optimize
from indexer.profile import NO_PACK, Entry, Profile, ProfileError
from tests.support.mounts import ImageBuilder

CS = 64 * 1024


@pytest.fixture()
def image(tmp_path: os.PathLike[str]) -> tuple[LocalStore, Index]:
    store = LocalStore(os.path.join(tmp_path, "store"))
    b = ImageBuilder(chunk_size=CS, pack_size=256 * 1024)
    rng = random.Random(3)
    for i in range(12):
        b.file(f"f{i:02d}", rng.randbytes(3 * CS + 17))
    return store, b.write(store, "img")


def _profile(index: Index, chunks: list[int]) -> Profile:
    return Profile(index.digest, tuple(Entry(c, 2, t) for t, c in enumerate(chunks)))


# -- format ---------------------------------------------------------------------------


def test_a_profile_round_trips_and_is_checked_against_its_index(image: tuple[LocalStore, Index]) -> None:
    store, index = image
    p = _profile(index, [5, 1, 9])
    profiles.save(store, p)
    got = profiles.load(store, index)
    assert got is not None and got.entries == p.entries and got.index_digest == index.digest


def test_a_damaged_profile_is_refused(image: tuple[LocalStore, Index]) -> None:
    store, index = image
    blob = bytearray(zstandard.ZstdDecompressor().decompress(profiles.encode(_profile(index, [1, 2, 3]))))
    blob[profiles.HEADER.size + 2] ^= 1  # one bit of the first entry
    store.put(profiles.profile_key(index.digest), zstandard.ZstdCompressor().compress(bytes(blob)))
    with pytest.raises(ProfileError, match="damaged"):
        profiles.load(store, index)
    store.put(profiles.profile_key(index.digest), b"not zstd at all")
    with pytest.raises(ProfileError, match="not a valid profile"):
        profiles.load(store, index)


def test_a_profile_of_another_index_or_naming_missing_chunks_is_refused(image: tuple[LocalStore, Index]) -> None:
    store, index = image
    other = "blake3:" + "ab" * 32
    store.put(profiles.profile_key(index.digest), profiles.encode(Profile(other, (Entry(1, 2, 0),))))
    with pytest.raises(ProfileError, match="recorded for index"):
        profiles.load(store, index)
    profiles.save(store, _profile(index, [1, index.n_chunks]))
    with pytest.raises(ProfileError, match=f"names chunk {index.n_chunks}"):
        profiles.load(store, index)
    profiles.save(store, _profile(index, [1, 1]))
    with pytest.raises(ProfileError, match="twice"):
        profiles.load(store, index)


def test_no_profile_is_none(image: tuple[LocalStore, Index]) -> None:
    store, index = image
    assert profiles.load(store, index) is None


def test_merge_is_the_union_at_the_earliest_first_access(image: tuple[LocalStore, Index]) -> None:
    _store, index = image
    a = Profile(index.digest, (Entry(1, 2, 0), Entry(2, 2, 50), Entry(3, 2, 90)))
    b = Profile(index.digest, (Entry(4, 3, 0), Entry(2, 3, 10)))
    m = profiles.merge([a, b])
    assert [e.chunk for e in m.entries] == [1, 4, 2, 3]  # ties keep the earlier profile first
    assert {e.chunk: e.seen for e in m.entries} == {1: 1, 4: 1, 2: 2, 3: 1}
    assert m.recordings == 2
    with pytest.raises(ProfileError):
        profiles.merge([a, Profile("blake3:" + "cd" * 32, ())])


def test_merge_keeps_startup_pack_copies(image: tuple[LocalStore, Index]) -> None:
    _store, index = image
    laid = Profile(index.digest, (Entry(1, 2, 0, pack=0, offset=100), Entry(2, 2, 5, pack=0, offset=0)),
                   packs=(b"\x01" * 32,))
    new = Profile(index.digest, (Entry(7, 2, 1),))
    m = profiles.merge([laid, new])
    by = {e.chunk: e for e in m.entries}
    assert m.packs == (b"\x01" * 32,)
    assert (by[1].pack, by[1].offset) == (0, 100) and by[7].pack == NO_PACK


# -- recording -------------------------------------------------------------------------


def test_the_recorder_keeps_first_accesses_in_order_and_stops_when_quiet(image: tuple[LocalStore, Index]) -> None:
    _store, index = image
    now = [100.0]
    rec = Recorder(index, quiet_s=5.0, max_s=60.0, clock=lambda: now[0])
    f3 = index.resolve("f03")
    f1 = index.resolve("f01")
    assert f3 is not None and f1 is not None
    assert rec.due() is None  # nothing read yet: not quiet, just waiting
    rec.saw(f3, CS + 1, 10)  # the second chunk of f03
    now[0] += 0.25
    rec.saw(f1, 0, 2 * CS)  # two chunks of f01
    rec.saw(f3, CS, 5)  # seen already
    assert [r[0] for r in rec.records] == [index.chunk_no(f3, CS), index.chunk_no(f1, 0), index.chunk_no(f1, CS)]
    assert [r[2] for r in rec.records] == [0, 250, 250]
    now[0] += 4.9
    assert rec.due() is None
    now[0] += 0.2
    assert rec.due() == "quiet"
    rec.stop("quiet")
    rec.saw(f1, 3 * CS, 1)  # after the stop: not recorded
    assert len(rec.records) == 3
    p = rec.profile()
    assert p.index_digest == index.digest and [e.ino for e in p.entries] == [f3, f1, f1]


def test_the_recorder_stops_at_its_bounds(image: tuple[LocalStore, Index]) -> None:
    _store, index = image
    now = [0.0]
    rec = Recorder(index, quiet_s=100.0, max_s=10.0, max_chunks=3, clock=lambda: now[0])
    ino = index.resolve("f00")
    assert ino is not None
    rec.saw(ino, 0, 4 * CS)  # four chunks: the bound is three
    assert rec.stopped == "chunk bound"
    rec2 = Recorder(index, quiet_s=100.0, max_s=10.0, clock=lambda: now[0])
    now[0] = 10.0
    assert rec2.due() == "time bound"


# -- range planning --------------------------------------------------------------------


def _ref(pack: str, offset: int, clen: int) -> ChunkRef:
    return ChunkRef(os.urandom(32), pack, offset, clen, clen)


def test_spans_read_over_small_gaps_and_not_over_large_ones() -> None:
    a = _ref("p", 0, 100)
    b = _ref("p", 150, 100)  # 50-byte gap
    c = _ref("p", 10_000, 100)  # 9,750-byte gap
    spans = plan_spans([c, a, b], max_gap=1000, max_range=1 << 20, first_range=1 << 20)
    assert [[r.offset for r in s.refs] for s in spans] == [[10_000], [0, 150]]  # c is wanted first


def test_spans_ramp_up_from_a_small_first_read() -> None:
    refs = [_ref("p", i * 1000, 1000) for i in range(64)]  # 64 KB back to back
    spans = plan_spans(refs, max_gap=0, max_range=16_000, first_range=2000)
    sizes = [s.end - s.start for s in spans]
    assert sizes[:4] == [2000, 4000, 8000, 16_000] and max(sizes) == 16_000
    assert sum(len(s.refs) for s in spans) == 64


def test_spans_group_by_pack_and_skip_repeats() -> None:
    a, b = _ref("p1", 0, 10), _ref("p2", 0, 10)
    spans = plan_spans([a, b, a], max_gap=1 << 20)
    assert [s.pack for s in spans] == ["p1", "p2"]


# -- layout -----------------------------------------------------------------------------


def test_optimize_copies_the_profile_into_startup_packs_in_order(image: tuple[LocalStore, Index]) -> None:
    store, index = image
    digest_before = index.digest
    order = [30, 2, 17, 5, 11, 0]
    profiles.save(store, _profile(index, order))
    found = profiles.load(store, index)
    assert found is not None and not is_laid_out(found)
    res = optimize(store, index, found, pack_size=3 * CS)  # small packs: several of them
    assert res.changed and res.packs >= 2 and res.chunks == len(order)
    assert res.startup_bytes == sum(index.chunk(c).clen for c in order) + len(res.profile.head)
    assert 0 < res.extra_ratio < 1
    laid = profiles.load(store, index)
    assert laid is not None and is_laid_out(laid) and [e.chunk for e in laid.entries] == order
    for ref, e in zip(profiles.replay_refs(laid, index), laid.entries):
        assert ref.pack.startswith("packs/") and ref.pack != index.chunk(e.chunk).pack
        raw = store.get_range(ref.pack, ref.offset, ref.clen)
        assert open_chunk(ref, raw) == open_chunk(index.chunk(e.chunk), store.get_range(
            index.chunk(e.chunk).pack, index.chunk(e.chunk).offset, index.chunk(e.chunk).clen))
    assert index.digest == digest_before  # the index is untouched
    again = optimize(store, index, laid)
    assert not again.changed


# -- the grain: a chunk size per file --------------------------------------------------------


def _spill_digests(data: bytes, *, small: int = 64 << 10) -> tuple[list[bytes], ChunkSpill]:
    spill = ChunkSpill(set(), 1 << 20, random_access_chunk_size=small)
    digests = spill.add_file(b"f", len(data), io.BytesIO(data))
    spill.finish()
    return digests, spill


def test_large_elf_files_get_small_chunks_and_others_do_not() -> None:
    rng = random.Random(5)
    elf = ELF_MAGIC + rng.randbytes(RANDOM_ACCESS_MIN_SIZE + 100)
    other = b"PK\x03\x04" + rng.randbytes(RANDOM_ACCESS_MIN_SIZE + 100)
    small_elf = ELF_MAGIC + rng.randbytes(RANDOM_ACCESS_MIN_SIZE // 2)
    d_elf, s1 = _spill_digests(elf)
    d_other, s2 = _spill_digests(other)
    d_small, s3 = _spill_digests(small_elf)
    try:
        assert len(d_elf) == -(-len(elf) // (64 << 10))
        assert len(d_other) == -(-len(other) // (1 << 20))
        assert len(d_small) == -(-len(small_elf) // (1 << 20))
        # The content is cut where it says: the first small chunk is the file's first 64 KiB.
        from cache.chunk import digest_of

        assert d_elf[0] == digest_of(elf[: 64 << 10]) and d_other[0] == digest_of(other[: 1 << 20])
    finally:
        for s in (s1, s2, s3):
            s.close()


def test_the_index_keeps_a_chunk_size_per_file(tmp_path: os.PathLike[str]) -> None:
    store = LocalStore(os.path.join(tmp_path, "store"))
    b = ImageBuilder(chunk_size=1 << 20)
    rng = random.Random(6)
    big = rng.randbytes(3 << 20)
    small_chunked = rng.randbytes(5 * 4096 + 7)
    b.file("big", big)
    b.file_from_chunks("elf", [small_chunked[i:i + 4096] for i in range(0, len(small_chunked), 4096)],
                       len(small_chunked))
    index = b.write(store, "x")
    elf, bigi = index.resolve("elf"), index.resolve("big")
    assert elf is not None and bigi is not None
    assert index.file_chunk_size(elf) == 4096 and index.file_chunk_size(bigi) == 1 << 20
    spans = index.chunks_for_range(elf, 4096 * 2 + 5, 4096)
    assert [off for off, _r in spans] == [8192, 12288]
    assert index.chunk_numbers(elf, 0, len(small_chunked)) == list(index.file_chunk_numbers(elf))
    got = b"".join(open_chunk(r, store.get_range(r.pack, r.offset, r.clen))
                   for _o, r in index.chunks_for_range(elf, 0, len(small_chunked)))
    assert got == small_chunked


def test_a_version_1_index_still_opens(image: tuple[LocalStore, Index]) -> None:
    _store, index = image
    body = bytes(index._body)
    h = parse_header(body)
    # Rewrite the inode table in version 1's shorter records; shift everything after it.
    old = [INODE.unpack_from(body, h.inodes_off + i * INODE.size) for i in range(h.n_inodes)]
    table = b"".join(INODE_V1.pack(*r[:12]) for r in old)
    table += bytes(-(len(old) * INODE.size - len(table)) % 8)  # keep the later sections 8-aligned
    shrink = len(old) * INODE.size - len(table)
    sections = body[h.inodes_off + len(old) * INODE.size:]
    fields = list(HEADER.unpack_from(body, 0))
    fields[1] = 1
    offsets = fields[10:18]
    fields[10:18] = [offsets[0]] + [o - shrink for o in offsets[1:]]
    v1 = HEADER.pack(*fields) + body[HEADER.size:h.inodes_off] + table + sections
    digest, blob = seal(v1)
    old_index = Index.from_blob(blob, digest)
    ino = old_index.resolve("f04")
    assert ino is not None and old_index.file_chunk_size(ino) == index.chunk_size
    assert [r for _o, r in old_index.chunks_for_range(ino, 0, 4 * CS)] == \
        [r for _o, r in index.chunks_for_range(index.resolve("f04") or 0, 0, 4 * CS)]


def test_the_rest_of_the_image_is_fetched_within_its_rate(image: tuple[LocalStore, Index]) -> None:
    """A paced prefetch (the rest of an image after its profile) spends at most its
    budget of bytes per second: with trio's MockClock the virtual time it takes is the
    bytes over the rate (no wall-clock bound)."""
    import trio
    import trio.testing

    from cache.blobtier import BlobTier
    from cache.chain import ChunkChain
    from cache.memory import MemoryTier

    store, index = image
    refs = list(index.all_chunks())
    total = sum(r.clen for r in refs)
    rate = total / 10  # ten seconds' worth

    async def main() -> tuple[int, float]:
        chain = ChunkChain(BlobTier(store), None, MemoryTier(64 << 20))
        t0 = trio.current_time()
        n = await chain.prefetch(refs, paced=True, rate=rate)
        return n, trio.current_time() - t0

    n, took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert n == len(refs)
    assert 9.0 <= took <= 10.5  # the budget, not the disk, set the pace


def test_a_profile_head_brings_its_chunks_and_a_bad_frame_in_it_is_dropped(image: tuple[LocalStore, Index]) -> None:
    """The head's frames (inline in the profile) are verified like any chunk: good ones
    are kept, a frame that does not hash to its digest is dropped (fetched later)."""
    import trio

    from cache.blobtier import BlobTier
    from cache.chain import ChunkChain
    from cache.memory import MemoryTier

    store, index = image
    order = [4, 9, 1]
    profiles.save(store, _profile(index, order))
    found = profiles.load(store, index)
    assert found is not None
    res = optimize(store, index, found)  # the whole (small) working set fits the default head
    laid = profiles.load(store, index)
    assert laid is not None and laid.head_chunks == 3 and res.changed
    frames = profiles.head_frames(laid, index)
    bad_ref, bad_frame = frames[1]
    frames[1] = (bad_ref, bytes(reversed(bad_frame)))  # right length, wrong bytes

    async def main() -> tuple[list[bytes], MemoryTier]:
        memory = MemoryTier(64 << 20)
        chain = ChunkChain(BlobTier(store), None, memory)
        return await chain.accept_frames(frames), memory

    kept, memory = trio.run(main)
    assert kept == [frames[0][0].digest, frames[2][0].digest]
    assert bad_ref.digest not in memory and frames[0][0].digest in memory
    # A profile whose head does not match its chunks' sizes is refused whole.
    store.put(profiles.profile_key(index.digest), profiles.encode(replace(laid, head=laid.head[:-1])))
    with pytest.raises(ProfileError, match="head"):
        profiles.load(store, index)


def test_optimize_leaves_long_runs_where_they_are(tmp_path: os.PathLike[str]) -> None:
    """Chunks already in a run of their pack long enough for one ranged read are not
    copied (a copy would cost store bytes and save no round trip); scattered ones are."""
    store = LocalStore(os.path.join(tmp_path, "store"))
    b = ImageBuilder(chunk_size=CS, pack_size=64 << 20)  # one pack: the big file's chunks back to back
    rng = random.Random(8)
    b.file("a/big.so", rng.randbytes(24 * CS))  # 1.5 MiB, read whole
    for i in range(20):
        b.file(f"b/small{i:02d}", rng.randbytes(3000))
        b.file(f"b/small{i:02d}x", rng.randbytes(3 * CS))  # never read: a gap no read spans
    index = b.write(store, "runs")
    big = index.chunk_numbers(index.resolve("a/big.so") or 0, 0, 24 * CS)
    smalls = [index.chunk_numbers(index.resolve(f"b/small{i:02d}") or 0, 0, 1)[0] for i in (17, 3, 11)]
    profiles.save(store, _profile(index, smalls[:1] + big + smalls[1:]))
    found = profiles.load(store, index)
    assert found is not None
    res = optimize(store, index, found, head_budget=0)
    laid = profiles.load(store, index)
    assert laid is not None and laid.optimized and is_laid_out(laid)
    kept = {e.chunk for e in laid.entries if e.pack == profiles.NO_PACK}
    assert kept == set(big) and res.chunks == len(smalls)  # only the scattered ones were copied
    assert res.startup_bytes == sum(index.chunk(c).clen for c in smalls)
    # The replay reads the big file's run where it is and the rest from the startup pack.
    refs = profiles.replay_refs(laid, index)
    assert {r.pack for r in refs if r.digest in {index.chunk(c).digest for c in big}} == {index.chunk(big[0]).pack}

"""The first pass's memory budget and the pack writer: where the compressed chunks wait
(in memory, in the spill file, or some of each) must never change what is stored."""

from __future__ import annotations

import io
import os
import random

import pytest

from cache.chunk import decompress, digest_of
from cache.localstore import LocalStore
from indexer.build import build_image
from indexer.catalog import open_image
from indexer.chunker import ChunkSpill
from indexer.packer import write_packs
from tests.support.chunks import dir_snapshot
from tests.support.images import write_oci_layout
from tests.support.indexed import file_bytes
from tests.support.tars import file, generated_file, make_tar


def _contents(seed: int) -> list[bytes]:
    """Files of mixed sizes and compressibility: small ones (batched to the
    compressors), whole chunks, and a partial last chunk; a few repeats (dedup)."""
    rng = random.Random(seed)
    out = []
    for i in range(40):
        size = rng.choice([300, 5000, 70_000, 64 * 1024, 150_000])
        data = (rng.randbytes(size // 2) + bytes(size - size // 2)) if i % 3 else rng.randbytes(size)
        out.append(data)
    return out + out[:3]


class _PutOnlyStore(LocalStore):
    """A store that overrides ``put`` only: the packer must not go around it."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        assert type(data) is bytes
        self.puts.append(key)
        super().put(key, data)


@pytest.mark.parametrize("segment", [100_000, 32 << 20])
@pytest.mark.parametrize("budget", [0, 1, 600_000, 1 << 40])
def test_budget_boundary_gives_identical_packs(tmp_path, monkeypatch, budget: int, segment: int) -> None:  # type: ignore[no-untyped-def]
    contents = _contents(7)
    monkeypatch.setattr("indexer.chunker.SEGMENT_SIZE", segment)  # small: runs of held chunks break at segment ends

    def run(root: str, memory_budget: int, store_type: type[LocalStore] = LocalStore) -> tuple[dict[bytes, object], int, int]:
        with ChunkSpill(set(), 64 * 1024, memory_budget=memory_budget) as spill:
            order = []
            for data in contents:
                order += spill.add_file(b"f", len(data), io.BytesIO(data))
            spill.finish()
            spilled = spill.spilled_bytes
            held = spill.held_chunks
            # Tree order differs from arrival order: reverse it, so held and spilled
            # chunks interleave and spill-file runs are not all contiguous.
            order.reverse()
            locations, written = write_packs(store_type(root), spill, order, target_size=200_000)
        if memory_budget == 0:
            assert held == 0 and spilled == written
        elif memory_budget >= 1 << 40:
            assert spilled == 0
        return dict(locations), written, held

    ref_loc, ref_written, _ = run(str(tmp_path / "ref"), 1 << 40, _PutOnlyStore)  # every pack joined, through put
    loc, written, held = run(str(tmp_path / "b"), budget)
    if budget == 600_000:
        assert 0 < held < len(ref_loc)  # really a mix of held and spilled chunks
    assert loc == ref_loc and written == ref_written
    assert dir_snapshot(str(tmp_path / "b")) == dir_snapshot(str(tmp_path / "ref"))
    # And the packs hold what the locations say.
    store = LocalStore(str(tmp_path / "b"))
    for d, where in loc.items():
        blob = store.get_range("packs/" + where.pack.hex(), where.offset, where.clen)
        assert digest_of(decompress(blob, where.ulen)) == d


def test_build_stores_the_same_bytes_whatever_the_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    entries = [generated_file(f"usr/lib/big{i}.so", (1 << 20) + 4096 * i, seed=i) for i in range(4)]
    entries += [file(f"etc/small{i}", os.urandom(100 + i)) for i in range(50)]
    write_oci_layout(str(tmp_path / "img"), [make_tar(entries)])
    results = {}
    for budget in (0, 3 << 20, 1 << 30):
        root = str(tmp_path / f"s{budget}")
        r = build_image(f"oci:{tmp_path / 'img'}:latest", LocalStore(root), "img", memory_budget=budget)
        results[budget] = (r.digest, r.stored_bytes, dir_snapshot(root))
    assert len(set(map(repr, results.values()))) == 1
    index = open_image(LocalStore(str(tmp_path / "s0")), "img")
    assert len(file_bytes(index, LocalStore(str(tmp_path / "s0")), index.resolve("usr/lib/big3.so"))) == (1 << 20) + 4096 * 3


def test_put_parts_writes_what_put_would(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(3)
    parts: list[bytes | memoryview] = [rng.randbytes(rng.randrange(0, 300)) for _ in range(3000)]  # > IOV_MAX
    big = bytearray(rng.randbytes(1 << 20))
    parts += [memoryview(big)[10:600_000], b"", memoryview(big)[600_000:]]
    store = LocalStore(str(tmp_path / "s"))
    store.put_parts("packs/ab", parts)
    assert store.get("packs/ab") == b"".join(parts)
    assert not [n for n in os.listdir(tmp_path / "s" / "packs") if n.startswith(".tmp-")]


def test_a_store_that_overrides_put_gets_every_pack_through_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _PutOnlyStore(str(tmp_path / "s"))
    with ChunkSpill(set(), 64 * 1024) as spill:
        order = []
        for data in _contents(1):
            order += spill.add_file(b"f", len(data), io.BytesIO(data))
        spill.finish()
        write_packs(store, spill, order, target_size=300_000)
    packs = sorted(os.listdir(tmp_path / "s" / "packs"))
    assert len(packs) > 3 and sorted(k[len("packs/"):] for k in store.puts if k.startswith("packs/")) == packs

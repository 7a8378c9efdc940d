"""The prefetch says what it achieved: chunks fetched, stored on the SSD tier, failed
(issue 12: a prefetch whose every SSD write failed on a full disk reported "done").
A real chain over a real local store, a real SSD tier on a real (tiny, full) tmpfs."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import trio

from cache.blobtier import BlobTier
from cache.chain import ChunkChain
from cache.localstore import LocalStore
from cache.memory import MemoryTier
from cache.ssd import SSDTier
from imagefs.prefetch import Progress, prefetch_image
from indexer.index import Index
from tests.support.mounts import ImageBuilder

CS = 64 * 1024


@pytest.fixture
def image(tmp_path: Path) -> tuple[LocalStore, Index]:
    store = LocalStore(str(tmp_path / "store"))
    b = ImageBuilder(chunk_size=CS)
    for i in range(4):
        b.file(f"f{i}", random.Random(i).randbytes(4 * CS))
    return store, b.write(store, "pre")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _prefetch(store: LocalStore, index: Index, ssd: SSDTier) -> Progress:
    chain = ChunkChain(BlobTier(store), ssd, MemoryTier(64 << 20))
    progress = Progress()

    async def main() -> None:
        await prefetch_image(index, chain, 1 << 30, progress)

    trio.run(main)
    return progress


def test_a_prefetch_that_stores_everything_is_done(image: tuple[LocalStore, Index], tmp_path: Path) -> None:
    store, index = image
    with SSDTier(str(tmp_path / "ssd"), 1 << 30) as ssd:
        p = _prefetch(store, index, ssd)
        assert p.as_dict() == {"state": "done", "planned": 16, "fetched": 16, "stored": 16, "failed": 0}
        assert ssd.usage()[1] == 16


def test_a_prefetch_that_could_store_nothing_failed(image: tuple[LocalStore, Index], tiny_disk: Path) -> None:
    store, index = image
    with SSDTier(str(tiny_disk / "ssd"), 1 << 30) as ssd:
        with open(tiny_disk / "filler", "wb") as f:  # someone else fills the cache's disk
            try:
                while True:
                    f.write(bytes(CS))
                    f.flush()
            except OSError:
                pass
        p = _prefetch(store, index, ssd)
        assert p.as_dict() == {"state": "failed", "planned": 16, "fetched": 16, "stored": 0, "failed": 16}
        assert ssd.usage()[1] == 0

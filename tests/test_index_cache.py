"""A host's copies of indexes: used when good, refetched when damaged, never trusted blindly."""

from __future__ import annotations

import os

import pytest

from cache.localstore import LocalStore
from imagefs.index_cache import load_index
from indexer.catalog import ImageNotFound, index_key
from tests.support.mounts import ImageBuilder


@pytest.fixture
def setup(tmp_path):  # type: ignore[no-untyped-def]
    store = LocalStore(str(tmp_path / "store"))
    b = ImageBuilder()
    b.file("etc/hostname", b"cached\n")
    index = b.write(store, "img")
    return store, index.digest, str(tmp_path / "cache")


def test_a_digest_with_a_local_copy_needs_no_store(setup) -> None:  # type: ignore[no-untyped-def]
    store, digest, cache = setup
    assert load_index(store, digest, cache).digest == digest  # fetched, copy kept
    store.delete(index_key(digest))  # the store no longer has it: only the copy can answer
    again = load_index(store, digest, cache)
    assert again.digest == digest and again.resolve("etc/hostname") is not None


def test_a_name_is_always_resolved_by_the_store(setup) -> None:  # type: ignore[no-untyped-def]
    store, digest, cache = setup
    assert load_index(store, "img", cache).digest == digest
    store.delete("refs/img")
    with pytest.raises(ImageNotFound, match="img: no such image"):
        load_index(store, "img", cache)


def test_a_damaged_copy_is_refetched_or_refused(setup) -> None:  # type: ignore[no-untyped-def]
    store, digest, cache = setup
    load_index(store, digest, cache)
    copy = os.path.join(cache, "indexes", digest.split(":")[1])
    with open(copy, "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff")
    assert load_index(store, digest, cache).digest == digest  # refetched from the store...
    with open(copy, "rb") as f, open(os.path.join(store.root, index_key(digest)), "rb") as g:
        assert f.read() == g.read()  # ...and the copy repaired
    with open(copy, "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff")
    store.delete(index_key(digest))
    with pytest.raises(ImageNotFound):  # a damaged copy is never served
        load_index(store, digest, cache)


def test_without_a_cache_dir_nothing_is_kept(setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, digest, _cache = setup
    assert load_index(store, digest, None).digest == digest
    assert not os.path.exists(tmp_path / "cache")

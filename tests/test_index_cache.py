"""A host's copies of indexes: used when good, refetched when damaged, never trusted blindly."""

from __future__ import annotations

import mmap
import os

import pytest

from cache.localstore import LocalStore
from imagefs.index_cache import PAGE, load_index
from indexer.catalog import ImageNotFound, index_key
from indexer.format import unseal
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


def _copy_path(cache: str, digest: str) -> str:
    return os.path.join(cache, "indexes", digest.split(":")[1] + ".body")


def _stored_body(store: LocalStore, digest: str) -> bytes:
    with open(os.path.join(store.root, index_key(digest)), "rb") as g:
        return unseal(g.read(), digest)


@pytest.mark.parametrize("damage", ["flip a body byte", "flip a header byte", "truncate", "append"])
def test_a_damaged_copy_is_refetched_or_refused(setup, damage: str) -> None:  # type: ignore[no-untyped-def]
    store, digest, cache = setup
    load_index(store, digest, cache)
    copy = _copy_path(cache, digest)

    def spoil() -> None:
        with open(copy, "r+b") as f:
            if damage == "flip a body byte":
                f.seek(PAGE + 10)
                f.write(bytes([f.read(1)[0] ^ 0xFF]))
            elif damage == "flip a header byte":
                f.seek(20)
                f.write(bytes([f.read(1)[0] ^ 0xFF]))
            elif damage == "truncate":
                f.truncate(os.path.getsize(copy) - 1)
            else:
                f.seek(0, os.SEEK_END)
                f.write(b"x")

    spoil()
    assert load_index(store, digest, cache).digest == digest  # refetched from the store...
    with open(copy, "rb") as f:
        assert f.read()[PAGE:] == _stored_body(store, digest)  # ...and the copy repaired
    spoil()
    store.delete(index_key(digest))
    with pytest.raises(ImageNotFound):  # a damaged copy is never served
        load_index(store, digest, cache)


def test_a_good_copy_is_mapped_not_read(setup) -> None:  # type: ignore[no-untyped-def]
    store, digest, cache = setup
    first = load_index(store, digest, cache)  # from the store: a decompressed body in memory
    assert isinstance(first._body, bytes)
    again = load_index(store, digest, cache)
    assert isinstance(again._body, mmap.mmap)  # the copy, mapped: mounts share its pages
    assert bytes(again._body) == _stored_body(store, digest)
    assert again.resolve("etc/hostname") == first.resolve("etc/hostname")
    listing = list(again.readdir(1))
    assert listing == list(first.readdir(1)) and all(type(name) is bytes for _, name, _ in listing)


def test_without_a_cache_dir_nothing_is_kept(setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, digest, _cache = setup
    assert load_index(store, digest, None).digest == digest
    assert not os.path.exists(tmp_path / "cache")

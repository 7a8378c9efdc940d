"""One conformance suite for every BlobStore: the local directory and S3 (SeaweedFS).

Both implementations promise the same contract (cache/blobstore.py); running the same
tests against both is what keeps a caller from noticing which one it has.
"""

from __future__ import annotations

import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from cache.blobstore import BlobNotFound, BlobStore, BlobStoreError
from cache.localstore import LocalStore
from tests.support.seaweed import Seaweed  # the `seaweed` session fixture comes from conftest.py

pytestmark = pytest.mark.timeout(60)

KINDS = ["local", "s3"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> BlobStore:
    if kind == "local":
        return LocalStore(str(tmp_path / "store"))
    sw: Seaweed = request.getfixturevalue("seaweed")
    # A fresh prefix per test: the bucket is shared by the whole session.
    return sw.store(f"conformance/{uuid.uuid4().hex[:12]}", connect_timeout=2, read_timeout=10)


def _dead_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_implements_protocol(store: BlobStore) -> None:
    assert isinstance(store, BlobStore)
    assert store.url.startswith(("file://", "s3://"))


def test_put_get_roundtrip(store: BlobStore) -> None:
    payload = bytes(range(256)) * 1000
    store.put("packs/aa/one", payload)
    store.put("empty", b"")
    assert store.get("packs/aa/one") == payload
    assert store.get("empty") == b""
    assert store.size("packs/aa/one") == len(payload)
    assert store.size("empty") == 0


def test_get_range(store: BlobStore) -> None:
    data = b"0123456789"
    store.put("r", data)
    assert store.get_range("r", 0, 4) == b"0123"
    assert store.get_range("r", 3, 4) == b"3456"
    assert store.get_range("r", 8, 100) == b"89"  # short: the blob ends
    assert store.get_range("r", 10, 5) == b""  # exactly at the end
    assert store.get_range("r", 50, 5) == b""  # past the end
    assert store.get_range("r", 2, 0) == b""


def test_exists_and_size(store: BlobStore) -> None:
    assert not store.exists("idx/x")
    store.put("idx/x", b"abc")
    assert store.exists("idx/x")
    assert not store.exists("idx")  # a "directory" is not a blob
    assert store.size("idx/x") == 3


def test_missing_blob_is_blob_not_found(store: BlobStore) -> None:
    for call in (lambda: store.get("nope/x"), lambda: store.get_range("nope/x", 0, 10),
                 lambda: store.get_range("nope/x", 0, 0), lambda: store.size("nope/x")):
        with pytest.raises(BlobNotFound) as info:
            call()
        assert isinstance(info.value, KeyError) and isinstance(info.value, BlobStoreError)
        assert "nope/x" in str(info.value) and store.url in str(info.value)


def test_list_with_prefixes(store: BlobStore) -> None:
    keys = ["packs/aa/1", "packs/aa/2", "packs/ab/3", "packs/b", "packsfoo", "index/one"]
    for k in keys:
        store.put(k, k.encode())
    assert sorted(store.list("")) == sorted(keys)
    assert sorted(store.list("packs/")) == ["packs/aa/1", "packs/aa/2", "packs/ab/3", "packs/b"]
    assert sorted(store.list("packs/a")) == ["packs/aa/1", "packs/aa/2", "packs/ab/3"]
    assert sorted(store.list("packs")) == ["packs/aa/1", "packs/aa/2", "packs/ab/3", "packs/b", "packsfoo"]
    assert sorted(store.list("index/one")) == ["index/one"]
    assert list(store.list("missing/")) == []


def test_delete(store: BlobStore) -> None:
    store.put("d/1", b"x")
    store.put("d/2", b"y")
    store.delete("d/1")
    assert not store.exists("d/1")
    assert store.get("d/2") == b"y"
    assert sorted(store.list("d/")) == ["d/2"]
    store.delete("d/1")  # absent: no error
    with pytest.raises(BlobNotFound):
        store.get("d/1")


def test_put_is_idempotent_and_replaces(store: BlobStore) -> None:
    store.put("same", b"v1")
    store.put("same", b"v1")
    assert store.get("same") == b"v1"
    assert list(store.list("same")) == ["same"]
    store.put("same", b"version two")
    assert store.get("same") == b"version two"
    assert store.size("same") == len(b"version two")


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "..", "a//b", "./a", "a/.", "trail/", "nul\0byte"])
def test_invalid_keys_refused(store: BlobStore, bad: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.put(bad, b"x"), lambda: store.get(bad), lambda: store.get_range(bad, 0, 1),
        lambda: store.exists(bad), lambda: store.size(bad), lambda: store.delete(bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="invalid blob key"):
            call()
    assert list(store.list("")) == []  # nothing was written


def test_check_ok(store: BlobStore) -> None:
    store.check()
    store.put("k", b"v")
    store.check()


def test_check_bad_location(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "local":
        f = tmp_path / "a-file"
        f.write_bytes(b"not a directory")
        bad: BlobStore = LocalStore(str(f))
        expect = str(f)
    else:
        sw: Seaweed = request.getfixturevalue("seaweed")
        bad = sw.store(bucket="no-such-bucket-imagefs")
        expect = "s3://no-such-bucket-imagefs: no such bucket"
    with pytest.raises(BlobStoreError) as info:
        bad.check()
    assert expect in str(info.value)
    assert not isinstance(info.value, BlobNotFound)
    with pytest.raises(BlobStoreError) as info:
        bad.put("k", b"v")
    assert not isinstance(info.value, BlobNotFound)


def test_check_dead_endpoint_fails_fast(seaweed: Seaweed) -> None:  # noqa: F811
    port = _dead_port()
    bad = seaweed.store(endpoint_url=f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(BlobStoreError) as info:
        bad.check()
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"took {elapsed:.1f}s to report an unreachable endpoint"
    msg = str(info.value)
    assert bad.url in msg and f"127.0.0.1:{port}" in msg


def test_concurrent_puts_and_gets(store: BlobStore) -> None:
    blobs = {f"conc/{i:03d}": (f"blob {i} ".encode() * (i + 1)) for i in range(48)}

    def put(item: tuple[str, bytes]) -> None:
        store.put(*item)

    def get(key: str) -> tuple[str, bytes]:
        return key, store.get(key)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, blobs.items()))
        got = dict(pool.map(get, list(blobs) * 2))
        ranges = list(pool.map(lambda k: store.get_range(k, 2, 5), blobs))
    assert got == blobs
    assert ranges == [v[2:7] for v in blobs.values()]
    assert sorted(store.list("conc/")) == sorted(blobs)

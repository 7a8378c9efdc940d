"""Image names and digests in a store."""

from __future__ import annotations

import pytest

from cache.localstore import LocalStore
from indexer import catalog
from indexer.build import default_name


def test_valid_and_invalid_names() -> None:
    for good in ("demo", "library/debian:bookworm", "a.b-c_d/e:1.2"):
        assert catalog.validate_name(good) == good
    for bad in ("", "../x", "a//b", "/abs", "a b", "x:", "a/../b", "-lead"):
        with pytest.raises(catalog.InvalidImageName, match="invalid image name"):
            catalog.validate_name(bad)


def test_resolve_names_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = LocalStore(str(tmp_path))
    with pytest.raises(catalog.ImageNotFound, match="nope: no such image"):
        catalog.resolve(store, "nope")
    with pytest.raises(catalog.ImageNotFound, match="no such image"):
        catalog.resolve(store, "blake3:" + "0" * 64)
    with pytest.raises(catalog.InvalidImageName, match="invalid image digest"):
        catalog.resolve(store, "blake3:xyz")
    store.put("refs/broken", b"garbage")
    with pytest.raises(catalog.ImageNotFound, match="corrupt"):
        catalog.resolve(store, "broken")


def test_default_names_follow_the_source() -> None:
    assert default_name("docker://127.0.0.1:5000/lib/app:1.0") == "lib/app:1.0"
    assert default_name("docker://host/app") == "app:latest"
    assert default_name("docker://host/app@sha256:" + "a" * 64) == "app:latest"
    assert default_name("oci:/tmp/layouts/myimg:v2") == "myimg:v2"
    assert default_name("oci:/tmp/layouts/myimg") == "myimg:latest"
    assert default_name("docker-archive:/x/saved.tar") == "saved:latest"

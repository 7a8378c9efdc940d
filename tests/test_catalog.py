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
    # As docker and skopeo: the registry host stays; Docker Hub's names are the familiar ones.
    assert default_name("docker://127.0.0.1:5000/lib/app:1.0") == "127.0.0.1:5000/lib/app:1.0"
    assert default_name("docker://127.0.0.1:5055/np:gzip") == "127.0.0.1:5055/np:gzip"
    assert default_name("docker://reg.example.com/app") == "reg.example.com/app:latest"
    assert default_name("docker://docker.io/library/debian:12") == "debian:12"
    assert default_name("docker://debian") == "debian:latest"
    assert default_name("docker://host/app") == "host/app:latest"  # no dot or port: a Docker Hub user
    assert default_name("docker://reg.example.com/app@sha256:" + "a" * 64) == "reg.example.com/app@sha256:" + "a" * 64
    assert default_name("oci:/tmp/layouts/myimg:v2") == "myimg:v2"
    assert default_name("oci:/tmp/layouts/myimg") == "myimg:latest"
    assert default_name("docker-archive:/x/saved.tar") == "saved:latest"


def _index(store: LocalStore, hexd: str) -> str:
    store.put("indexes/" + hexd, b"x")
    return "blake3:" + hexd


def test_names_are_familiar_and_may_carry_a_digest() -> None:
    assert catalog.validate_name("docker.io/library/debian:12") == "debian:12"
    assert catalog.validate_name("docker.io/me/app:1") == "me/app:1"
    assert catalog.validate_name("127.0.0.1:5055/np:gzip") == "127.0.0.1:5055/np:gzip"
    assert catalog.validate_name("reg/app@sha256:" + "b" * 64) == "reg/app@sha256:" + "b" * 64
    for bad in ("reg/app@sha256:xyz", "reg/app@md5:" + "b" * 32, "@sha256:" + "b" * 64):
        with pytest.raises(catalog.InvalidImageName):
            catalog.validate_name(bad)


def test_short_digests_resolve_like_docker_ids(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = LocalStore(str(tmp_path))
    a = _index(store, "aa3a88d4" + "1" * 56)
    b = _index(store, "aa3a99" + "2" * 58)
    c = _index(store, "cafe" + "3" * 60)
    assert catalog.resolve(store, "blake3:aa3a88d4") == a
    assert catalog.resolve(store, "aa3a88") == a
    assert catalog.resolve(store, a) == a
    assert catalog.resolve(store, "blake3:c") == c  # any unique prefix after blake3:
    with pytest.raises(catalog.AmbiguousImage, match=r"aa3a: ambiguous short digest: 2 images"):
        catalog.resolve(store, "aa3a")
    with pytest.raises(catalog.ImageNotFound, match="no digest starts with"):
        catalog.resolve(store, "blake3:dead")
    with pytest.raises(catalog.ImageNotFound, match="abc: no such image"):
        catalog.resolve(store, "abc")  # too short to be taken as a digest: a name that does not exist
    # A name wins over a digest prefix, as in docker.
    catalog.set_ref(store, "cafe", b)
    assert catalog.resolve(store, "cafe") == b
    assert catalog.resolve(store, "blake3:cafe") == c


def test_refs_carry_their_origin_and_say_what_they_replaced(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = LocalStore(str(tmp_path))
    a = _index(store, "a" * 64)
    b = _index(store, "b" * 64)
    assert catalog.set_ref(store, "app:1", a, {"source": "oci:/x:1"}) is None
    assert catalog.set_ref(store, "app:1", a, {"source": "docker://r/app:1"}) is None  # same image: nothing replaced
    assert catalog.set_ref(store, "app:1", b) == a
    rec = catalog.read_ref(store, "app:1")
    assert rec is not None and rec.digest == b
    store.put("refs/old", (a + "\n").encode())  # a reference written before origins existed
    assert catalog.resolve(store, "old") == a
    catalog.set_ref(store, "src", a, {"source": "docker://r/app:1"})
    assert [r.origin.get("source") for r in catalog.list_images(store) if r.name == "src"] == ["docker://r/app:1"]
    assert catalog.names_of(store, a) == ["old", "src"]
    assert catalog.remove_ref(store, "old") == a
    with pytest.raises(catalog.ImageNotFound, match="no such image name"):
        catalog.remove_ref(store, "old")
    assert catalog.names_of(store, a) == ["src"]
